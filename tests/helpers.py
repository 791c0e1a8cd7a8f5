"""Comparisons against the float64 reference (DESIGN section 6)."""

import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import reference as R

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    num, den = (out - ref).norm().item(), ref.norm().item()
    return num / den if den > 0 else num


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g}"


def assert_topk(code, f_ref: torch.Tensor, k: int, dtype):
    """code matches TopK of the float64 activations f_ref [B, n] (ReLU already applied).

    Values match; the selected ids hold the top values (a near-tie may swap ids); ids are distinct; and
    wherever the reference's k-th boundary and neighbours are separated by more than rounding, ids match.
    """
    f_ref = f_ref.double().cpu()
    values, indices = code.values.cpu(), code.indices.cpu().long()
    assert code.indices.dtype == torch.int32
    assert values.shape == indices.shape == (f_ref.shape[0], k)
    assert ((indices >= 0) & (indices < f_ref.shape[1])).all(), "ids out of range"
    assert all(len(set(r.tolist())) == k for r in indices), "repeated ids in a row"
    order = torch.sort(f_ref, dim=1, descending=True, stable=True)
    ref_vals, ref_idx = order.values[:, :k], order.indices[:, :k]
    assert_close(values, ref_vals, dtype, "values")
    assert_close(f_ref.gather(1, indices), ref_vals, dtype, "reference values at the chosen ids")
    # Exact ids wherever a slot's value is separated from its neighbours (incl. the (k+1)-th) by > tol.
    scale = f_ref.abs().amax().clamp_min(1e-30) * (1e-4 if dtype == torch.float32 else 3e-2)
    padded = torch.cat([order.values[:, :1] + 2 * scale + 1, order.values[:, : k + 1]], dim=1)
    if padded.shape[1] == k + 1:  # k == n: no (k+1)-th entry
        padded = torch.cat([padded, padded[:, -1:] - 2 * scale - 1], dim=1)
    gap_prev = padded[:, :-2] - padded[:, 1:-1]
    gap_next = padded[:, 1:-1] - padded[:, 2:]
    clear = (gap_prev > scale) & (gap_next > scale)
    assert torch.equal(indices[clear], ref_idx[clear]), "ids differ where the reference has no near-tie"


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), str(func)))
        return out


# Encoder inputs ---------------------------------------------------------------------------------------


def rand(*shape, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


def make_encoder(B, d, n, dtype=torch.float32):
    """x [B, d], W_enc [n, d], b_enc [n], b_dec [d]."""
    return (
        rand(B, d, dtype=dtype),
        rand(n, d, scale=d**-0.5, dtype=dtype),
        rand(n, scale=0.1, dtype=dtype),
        rand(d, scale=0.1, dtype=dtype),
    )


def make_gated(n, dtype=torch.float32):
    """b_gate, r_mag, b_mag [n]."""
    return rand(n, scale=0.1, dtype=dtype), rand(n, scale=0.5, dtype=dtype), rand(n, scale=0.1, dtype=dtype)


def f64(*ts):
    """float64 copies for the reference, requiring grad where the originals do (None stays None)."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def case_id(case):
    return "B{}-d{}-n{}".format(*case)


def thresholds(x, W, b, b_dec, bandwidth, margin=0.02):
    """theta [n], random in [0, 0.5) (above where no value there fits), with no z within `margin` of theta or
    of the band's edges, so the rounding of low-precision inputs (x - b_dec in fp16) flips no entry."""
    z = R.preactivations(*f64(x, W, b, b_dec))
    grid = torch.linspace(0, 2, 1001, device=DEVICE).to(x.dtype).double()  # candidates as x.dtype rounds them
    gap = (z[:, :, None] - grid).abs()  # [B, n, G]
    good = ~((gap < margin) | ((gap - bandwidth / 2).abs() < margin)).any(0)  # [n, G]
    assert good.any(1).all(), "no threshold in [0, 2) keeps its margin"
    weight = good * torch.where(grid < 0.5, 1.0, 1e-9)
    return grid[torch.multinomial(weight, 1)[:, 0]].to(x.dtype)


def assert_slots(code, mask):
    """code's slots hold exactly the entries of the [B, n] bool mask: by latent id, then empty slots
    (value 0, index 0)."""
    values, ids = code.values.cpu(), code.indices.cpu().long()
    mask = mask.cpu()
    assert code.indices.dtype == torch.int32
    counts = mask.sum(1)
    assert values.shape[1] >= max(int(counts.max()), 1)
    for row, count in enumerate(counts.tolist()):
        want = mask[row].nonzero().flatten()
        assert ids[row, :count].tolist() == want.tolist(), f"row {row}: slots differ"
        assert (ids[row, count:] == 0).all() and (values[row, count:] == 0).all(), f"row {row}: empty slots"


def assert_same_layout(a, b):
    """Two codes of the same call: same type, same slots (shape and ids), same values up to rounding."""
    assert type(a) is type(b)
    assert a.values.shape == b.values.shape and torch.equal(a.indices, b.indices)
    assert_close(a.values, b.values, a.values.dtype, "values")


def decode_loss(code, W_dec, b_dec, G):
    return (kernels.sparse_decode(code, W_dec, b_dec) * G).sum()


def word_tokenizer(words, specials=("[UNK]", "[EOS]"), model_max_length=16, **tokens):
    """A Hugging Face fast tokenizer over whitespace-separated words, no hub: ids are the specials, then the words.
    tokens: its special tokens by role (eos_token="[EOS]", ...)."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **tokens)
