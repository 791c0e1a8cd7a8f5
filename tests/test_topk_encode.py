import importlib

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import AllocationRecorder, assert_close, assert_topk

import kernels
from kernels import gemm, torch_ops, tuning, validate
from kernels import reference as R

topk_encode_module = importlib.import_module("kernels.topk_encode")  # the package re-exports the function

# (B, d, n, k): B = 1, 7, 33; d and n not powers of two; k = 1 and k = n; several column splits.
SHAPES = [(1, 24, 40, 1), (7, 33, 100, 5), (33, 20, 72, 8), (5, 17, 19, 19), (4, 16, 64, 16), (3, 9, 200, 3)]
DTYPES = [torch.float32, torch.float16]


def make(B, d, n, dtype, bias=True):
    x = torch.randn(B, d, device=DEVICE).to(dtype)
    W = (torch.randn(n, d, device=DEVICE) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None
    b_dec = (0.1 * torch.randn(d, device=DEVICE)).to(dtype)
    return x, W, b, b_dec


def ref_f(x, W, b, b_dec=None):
    d = lambda t: None if t is None else t.double()
    return torch.relu(R.preactivations(d(x), d(W), d(b), d(b_dec)))


def case_id(case):
    return "B{}-d{}-n{}-k{}".format(*case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_forward_matches_reference(case, dtype, backend):
    B, d, n, k = case
    x, W, b, b_dec = make(B, d, n, dtype)
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x, W, b, k, b_dec=b_dec)
    assert code.values.dtype == dtype
    assert_topk(code, ref_f(x, W, b, b_dec), k, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_no_centering(backend):
    x, W, _, _ = make(6, 20, 50, torch.float32)
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x, W, None, 4)
    assert_topk(code, ref_f(x, W, None), 4, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_index(backend):
    """Equal pre-activations (duplicated encoder rows) and all-zero rows order by latent id."""
    B, d, n, k = 5, 16, 48, 6
    x, W, b, _ = make(B, d, n, torch.float32)
    W[[7, 30, 41]] = W[3].clone()  # latents 3, 7, 30, 41 always tie
    b[[7, 30, 41]] = b[3].clone()
    b += 5.0  # make them win
    b[[3, 7, 30, 41]] += 100.0
    x[2] = 0.0  # row 2: z = b exactly
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x, W, b, k)
    assert code.indices[:, :4].tolist() == [[3, 7, 30, 41]] * B
    # All-negative rows: every value is zero, ids are the k lowest.
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x, W, torch.full_like(b, -1e3), k)
    assert (code.values == 0).all()
    assert code.indices.tolist() == [list(range(k))] * B


@pytest.mark.parametrize("api", ["new", "legacy"])
def test_fp32_encode_under_either_tf32_api(api):
    """torch's new TF32 API (fp32_precision) set, then an fp32 encode: reading the legacy switch would raise."""
    from kernels.gemm import precision

    if api == "new":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    assert precision(torch.float32) == "tf32" and precision(torch.bfloat16) == "tf32"
    x, W, b, b_dec = make(7, 33, 100, torch.float32)
    with kernels.use_backend("triton"):
        code = kernels.topk_encode(x, W, b, 5, b_dec=b_dec)
    assert_topk(code, ref_f(x, W, b, b_dec), 5, torch.float32)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert precision(torch.float32) == "ieee"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_positives_than_k(backend):
    """Zero slots after the positives hold the lowest ids among the non-positive latents."""
    B, d, n, k = 3, 12, 40, 8
    x, W, _, _ = make(B, d, n, torch.float32)
    b = torch.full((n,), -1e3, device=DEVICE)
    b[[5, 17, 33]] = torch.tensor([3.0, 2.0, 1.0], device=DEVICE) * 1e3
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x, W, b, k)
    assert code.indices.tolist() == [[5, 17, 33, 0, 1, 2, 3, 4]] * B
    assert (code.values[:, :3] > 0).all() and (code.values[:, 3:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(7, 33, 100, 5), (1, 24, 40, 1), (5, 17, 19, 19)], ids=case_id)
def test_gradients_match_reference(case, dtype, backend):
    B, d, n, k = case
    x, W, b, b_dec = make(B, d, n, dtype)
    inputs = [t.requires_grad_() for t in (x, W, b, b_dec)]
    with kernels.use_backend(backend):
        code = kernels.topk_encode(*inputs[:3], k, b_dec=inputs[3])
    g = torch.randn(B, k, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(code.values, inputs, g)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    z = R.preactivations(ref_inputs[0], ref_inputs[1], ref_inputs[2], ref_inputs[3])
    ref_vals = torch.relu(z).gather(1, code.indices.long())  # same selection: gradients of the same set
    ref_grads = torch.autograd.grad(ref_vals, ref_inputs, g.double())
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    x, W, b, b_dec = make(33, 20, 72, torch.float32)
    W.requires_grad_()
    runs = []
    for _ in range(2):
        with kernels.use_backend(backend):
            code = kernels.topk_encode(x, W, b, 8, b_dec=b_dec)
        (gW,) = torch.autograd.grad(code.values, W, torch.ones_like(code.values))
        runs.append(gW)
    assert torch.equal(runs[0], runs[1])
    untouched = torch.ones(W.shape[0], dtype=torch.bool)
    untouched[code.indices.long().flatten().cpu()] = False
    assert (runs[0][untouched.to(DEVICE)] == 0).all(), "rows of latents never selected must be zero"


@pytest.mark.parametrize(
    "backend,kwargs",
    [("triton", {}), ("torch", {"budget": 1024}), ("cpp", {})],
    ids=["fused", "chunked", "cpp"],
)
def test_never_allocates_batch_by_latents(backend, kwargs):
    if backend not in BACKENDS:
        pytest.skip("the C++ kernels are not built here")  # never under CI: test_cpp_backend.py
    B, d, n, k = 32, 12, 600, 8  # d < B: the weight gradient [n, d] is smaller than B x n
    x, W, b, b_dec = make(B, d, n, torch.float32)
    inputs = [t.requires_grad_() for t in (x, W, b)]
    with AllocationRecorder() as rec, kernels.use_backend(backend):
        if kwargs:
            values, _ = torch_ops.topk_select_torch(x, W, b, k, **kwargs)
        else:
            values = kernels.topk_encode(*inputs, k, b_dec=b_dec).values
            values.backward(torch.ones_like(values))
    assert rec.numels, "recorder saw no allocation"
    biggest = max(rec.numels)
    assert biggest[0] < B * n, f"{biggest[1]} allocated {biggest[0]} >= B*n = {B * n} elements"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x, W, b, _ = make(7, 20, 50, torch.float32)
    x_nc = torch.randn(20, 7, device=DEVICE).T  # stride (1, 7)
    x_nc.copy_(x)
    W_nc = torch.randn(50, 40, device=DEVICE)[:, ::2]
    W_nc.copy_(W)
    with kernels.use_backend(backend):
        code = kernels.topk_encode(x_nc, W_nc, b, 4)
    assert_topk(code, ref_f(x, W, b), 4, torch.float32)


def test_large_k_takes_the_chunked_path():
    """k above the fused kernel's largest KP runs the memory-bounded chunked path transparently."""
    x, W, b, _ = make(3, 8, 600, torch.float32)
    with kernels.use_backend("triton"):
        code = kernels.topk_encode(x, W, b, 300)
    assert_topk(code, ref_f(x, W, b), 300, torch.float32)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must be 2-D"),
        (lambda a: a.update(W_enc=a["W_enc"][:, :-1]), ValueError, "W_enc must have 20 columns"),
        (lambda a: a.update(W_enc=a["W_enc"].half()), TypeError, "W_enc has dtype"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "x must be float32"),
        (lambda a: a.update(b_enc=a["b_enc"][:-1]), ValueError, "b_enc must have shape"),
        (lambda a: a.update(b_dec=a["b_dec"].to("meta")), ValueError, "b_dec is on meta"),
        (lambda a: a.update(W_enc=a["W_enc"].to("meta")), ValueError, "W_enc is on meta"),
        (lambda a: a.update(k=0), ValueError, "k must be an int in"),
        (lambda a: a.update(k=51), ValueError, "k must be an int in"),
        (lambda a: a.update(k=2.0), ValueError, "k must be an int in"),
        (lambda a: a["x"].__setitem__((1, 2), float("nan")), ValueError, "x contains NaN"),
        (lambda a: a["W_enc"].__setitem__((1, 2), float("inf")), ValueError, "W_enc contains NaN or Inf"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    x, W, b, b_dec = make(7, 20, 50, torch.float32)
    args = {"x": x, "W_enc": W, "b_enc": b, "k": 4, "b_dec": b_dec}
    mutate(args)
    with pytest.raises(exc, match=match):
        kernels.topk_encode(args["x"], args["W_enc"], args["b_enc"], args["k"], b_dec=args["b_dec"])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_encode_decode_without_graph_breaks(compiler):
    """fullgraph=True fails on any graph break: encode -> decode forward and backward, and a SparseCode
    returned from the compiled function (a pytree)."""
    x, W, b, b_dec = make(6, 16, 40, torch.float32)
    W_dec = torch.randn(40, 16, device=DEVICE)
    inputs = [t.requires_grad_() for t in (W, b, W_dec)]

    def step(x):
        code = kernels.topk_encode(x, W, b, 4, b_dec=b_dec)
        return (kernels.sparse_decode(code, W_dec, b_dec) - x).pow(2).sum(), code

    with kernels.use_backend("torch"):
        loss, code = step(x)
        grads = torch.autograd.grad(loss, inputs)
        got, got_code = torch.compile(step, fullgraph=True, backend=compiler)(x)
        got_grads = torch.autograd.grad(got, inputs)
    assert type(got_code) is kernels.SparseCode and torch.equal(got_code.indices, code.indices)
    assert torch.allclose(got, loss, rtol=1e-5)
    for g, want in zip(got_grads, grads, strict=True):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6)


def test_k_check_names_k_and_what_n_is():
    """validate.k_of is the one k check (the SAE classes call it with n_name="d_sae")."""
    with pytest.raises(ValueError, match=r"k must be an int in \[1, d_sae=8\], got 9"):
        validate.k_of(9, 8, n_name="d_sae")
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n=8\], got True"):
        validate.k_of(True, 8)
    validate.k_of(8, 8)


def test_backend_switch():
    with pytest.raises(ValueError, match="backend='cuda'"):
        kernels.set_backend("cuda")
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1000, 768, 16384, 64), (4096, 2304, 65536, 128), (333, 1000, 5000, 256)])
def test_gpu_large(case, dtype):
    B, d, n, k = case
    x, W, b, b_dec = make(B, d, n, dtype)
    code = kernels.topk_encode(x, W, b, k, b_dec=b_dec)
    assert_topk(code, ref_f(x, W, b, b_dec), k, dtype)


def _adversarial(kind, B, d, n):
    """Inputs whose pre-activations rise (or fall) along the columns, tie over long runs, or are all zero."""
    x = torch.rand(B, d, device=DEVICE) + 0.5
    ramp = torch.arange(n, device=DEVICE, dtype=torch.float32) / n
    W = torch.zeros(n, d, device=DEVICE)
    if kind == "rising":
        W[:, 0] = ramp
    elif kind == "falling":
        W[:, 0] = ramp.flip(0)
    elif kind == "ties":
        W[:, 0] = (torch.arange(n, device=DEVICE) // 37 % 3).float()  # runs of 37 equal values on three levels
    elif kind == "zero-rows":
        W[:, 0] = ramp
        x[::2] = 0.0  # every other row: all pre-activations zero
    return x, W


def _exact_against_sort(x, W, k):
    """The fused kernel's ids and values against a stable float64 sort (ties to the lower id); -> its loop
    counts per program."""
    stats = torch.zeros(0, dtype=torch.int32)
    with kernels.use_backend("triton"):
        values, indices = topk_encode_module.topk_select_triton(x, W, None, k, stats=stats)
    order = torch.sort(ref_f(x, W, None), dim=1, descending=True, stable=True)
    assert indices.long().tolist() == order.indices[:, :k].tolist()
    assert_close(values, order.values[:, :k], torch.float32, "values")
    return stats


@pytest.mark.parametrize("kind", ["rising", "falling", "ties", "zero-rows"])
def test_adversarial_column_orders_exact(kind):
    """The epilogue's thresholds, append trips and merges against a stable float64 sort: the same ids, ties to
    the lower id. Rising columns make every entry of every tile qualify, so lane groups fill mid-tile and
    merge; ties and zero rows test the id order."""
    B, d, n, k = 5, 4, 160, 6  # 4 splits of 40 columns, tiles of 16, 8 candidate slots per lane group
    stats = _exact_against_sort(*_adversarial(kind, B, d, n), k)
    tiles, trips, full_trips, merges = stats.sum(0).tolist()
    assert 0 < trips + full_trips
    if kind == "rising":
        assert merges > 0 and full_trips > 0  # every entry beats the thresholds; lane groups fill and merge


@pytest.mark.parametrize("kind", ["rising", "ties", "zero-rows", "gaussian"])
def test_wide_tiles_exact(kind, monkeypatch):
    """128-column tiles (the GPU's: two mask words per lane group) at k = 1, 4, 19 (4 to 32 kept keys, 8
    candidate slots per lane group): on rising values every entry of a tile qualifies and a lane group fills
    and merges several times within one tile; nothing may be dropped, ties go to the lower id."""
    wide = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "programs": 2}
    monkeypatch.setattr(tuning, "config", lambda op, **shape: dict(wide))
    B, d, n = 3, 4, 300
    if kind == "gaussian":
        x, W, _, _ = make(B, d, n, torch.float32)
    else:
        x, W = _adversarial(kind, B, d, n)
    for k in (1, 4, 19):
        stats = _exact_against_sort(x, W, k)
        if kind == "rising":
            assert stats[:, 3].sum() > stats[:, 0].sum()  # more merges than tiles: several within a tile


@pytest.mark.parametrize("kind", ["rising", "ties", "zero-rows", "gaussian"])
def test_grouped_waves_exact(kind, monkeypatch):
    """An L2 too small for every row block of x: the plan takes 7 row blocks x 2 splits in groups of 3 row
    blocks (the last group one), in `grouped_item` order, by 6 persistent programs (one group per round),
    each taking 2-3 items and starting each with an emptied buffer; the result matches a stable float64 sort
    (ties to the lower id)."""
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "programs": 8}
    monkeypatch.setattr(tuning, "config", lambda op, **shape: dict(cfg))
    B, d, n, k = 100, 4, 200, 5
    tile = 16 * d * 4  # a row block of x, or a W tile, in bytes
    # rounds of 8 items: 1 round = 7 row blocks + 1 W tile, 2 = 4 + 2, 3 = 3 + 2 (fits 5 tiles), 7 = 1 + 8
    monkeypatch.setattr(gemm, "l2_bytes", lambda device: 2 * 5 * tile)
    plan = topk_encode_module.plan(B, n, d, k, torch.device(DEVICE), torch.float32)
    assert (plan["group_rows"], plan["S"], plan["cols_per_split"], plan["grid"]) == (3, 2, 112, 6)
    x, W = make(B, d, n, torch.float32)[:2] if kind == "gaussian" else _adversarial(kind, B, d, n)
    stats = _exact_against_sort(x, W, k)
    # items (row block, split) in order: (0,0) (1,0) (2,0) (0,1) (1,1) (2,1), the same for rows 3-5, (6,0) (6,1);
    # program p takes items p, p + 6, p + 12; split 0 has 7 tiles, split 1 6
    assert stats.shape == (6, 4) and stats[:, 0].tolist() == [21, 20, 14, 12, 12, 12]


def test_reference_plan_fits_the_l2(monkeypatch):
    """At the reference shape on an H100 (132 SMs, 50 MiB L2, 128x128 bf16 tiles) the plan takes the fewest
    rounds whose group of x plus a W tile per split fits half the L2: 4 rounds of 16 row blocks x 8 splits
    (16 + 8 MiB) by 128 programs, where one round (64 + 2 MiB), two (32 + 4) and three (22 + 6) do not fit."""
    monkeypatch.setattr(tuning, "_device_key", lambda op: "default")
    monkeypatch.setattr(gemm, "num_sms", lambda device: 132)
    B, d, n = 8192, 4096, 131072
    plan = topk_encode_module.plan(B, n, d, 64, torch.device("meta"), torch.bfloat16)
    assert (plan["BLOCK_M"], plan["BLOCK_N"]) == (128, 128)
    assert (plan["group_rows"], plan["S"], plan["cols_per_split"], plan["grid"]) == (16, 8, 16384, 128)
    mib = 2**20
    assert 16 * mib + 8 * mib <= gemm.l2_bytes(torch.device("meta")) // 2 < 22 * mib + 6 * mib
