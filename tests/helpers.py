"""Comparisons against the float64 reference (DESIGN section 6)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
