"""The shared threshold encoder (kernels/threshold.py): capacity growth, empty rows, chunking, opcheck and the
argument checks of relu_encode, jumprelu_encode and gated_encode."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import BACKENDS, DEVICE
from helpers import assert_close, assert_slots, f64, make_encoder, make_gated

import kernels
from kernels import gated, gemm, jumprelu, relu, threshold, torch_ops
from kernels import reference as R
from kernels.gemm import grouped_item


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_grows_and_fixed_capacity_raises(backend):
    """Row 3 has every latent active, far above the first capacity guess: nothing is lost."""
    B, d, n = 7, 12, 90
    x, W, b, _ = make_encoder(B, d, n)
    W[:, 0] = 1.0
    x[:, 0] = 0.0
    x[3, 0] = 100.0
    theta = torch.full((n,), 3.0, device=DEVICE)
    ref_f, ref_l0 = R.jumprelu(*f64(x, W, b, theta), 0.1)
    assert ref_l0[3] == n and ref_l0.sum() - n < 20
    with kernels.use_backend(backend):
        code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, hints=kernels.EncodeHints(capacity=4))
        assert code.k == n
        assert_close(code.to_dense(n), ref_f, torch.float32, "f")
        assert_slots(code, R.jumprelu_band(*f64(x, W, b, theta), 0.1))
        assert torch.equal(code.l0.double(), ref_l0)
        fixed = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, capacity=n + 5)
        assert fixed.k == n + 5 and torch.equal(fixed.to_dense(n), code.to_dense(n))
        with pytest.raises(ValueError, match=f"a row has {n} active latents, more than capacity=40"):
            kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, capacity=40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["relu", "jumprelu", "gated"])
def test_no_active_latents(op, backend):
    """Every row empty: one empty slot per row, zero outputs and zero (not NaN) gradients."""
    x, W, b, _ = make_encoder(5, 9, 30)
    low = torch.full_like(b, -100.0)
    inputs = [t.requires_grad_() for t in (x, W)]
    with kernels.use_backend(backend):
        if op == "relu":
            code = kernels.relu_encode(x, W, low)
        elif op == "jumprelu":
            code = kernels.jumprelu_encode(x, W, b, -low, bandwidth=1.0)
        else:
            code = kernels.gated_encode(x, W, low, b, b)
            assert (code.gate == 0).all()
        grads = torch.autograd.grad(code.values.sum(), inputs)
    assert code.k == 1 and (code.values == 0).all() and (code.indices == 0).all()
    assert all((g == 0).all() for g in grads)


MODES = [torch_ops.RELU, torch_ops.JUMPRELU, torch_ops.GATED]


@pytest.mark.parametrize("mode", MODES, ids=["relu", "jumprelu", "gated"])
def test_torch_backend_chunking_is_invisible(mode):
    B, d, n = 9, 10, 70
    x, W, b, _ = make_encoder(B, d, n)
    params = (b, 0.3 * torch.rand(n, device=DEVICE), *make_gated(n)[1:])
    whole = torch_ops.threshold_select_torch(mode, x, W, *params, 0.25, n)
    chunked = torch_ops.threshold_select_torch(mode, x, W, *params, 0.25, n, budget=32)
    assert (whole[1] is None) == (mode != torch_ops.GATED), "gate: gated only"
    for a, c in zip(whole, chunked, strict=True):  # matmul blocking may round differently
        if a is None:
            assert c is None
        elif a.is_floating_point():
            assert torch.allclose(a, c, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, c)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, W, b, t: torch.library.opcheck(jumprelu.jumprelu_select, (x, W, b, t, 0.5, 60, 8)),
        lambda x, W, b, t: torch.library.opcheck(relu.relu_select, (x, W, b, 60, 8, False)),
        lambda x, W, b, t: torch.library.opcheck(gated.gated_select, (x, W, b, t, b, 60, 8)),
    ],
    ids=["jumprelu", "relu", "gated"],
)
def test_custom_ops_pass_opcheck(call):
    x, W, b, _ = make_encoder(5, 8, 30)
    theta = (0.3 * torch.rand(30, device=DEVICE)).requires_grad_()
    with kernels.use_backend("torch"):
        call(x.requires_grad_(), W.requires_grad_(), b.requires_grad_(), theta)


@pytest.mark.parametrize("capacity", [None, 30], ids=["chosen", "fixed"])
def test_torch_compile_without_graph_breaks(capacity):
    """fullgraph=True: the three encoders with a hint object, decoded; under tracing the hints are left alone
    (updating them would need a host sync)."""
    x, W, b, _ = make_encoder(6, 12, 30)
    theta = 0.3 * torch.rand(30, device=DEVICE)
    b_gate, r_mag, b_mag = make_gated(30)
    W.requires_grad_()
    hints = kernels.EncodeHints(capacity=5)

    def loss(x):
        codes = [
            kernels.relu_encode(x, W, b - 0.5, capacity=capacity, hints=hints),
            kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.1, capacity=capacity, hints=hints),
            kernels.gated_encode(x, W, b_gate, r_mag, b_mag, capacity=capacity, hints=hints),
        ]
        return sum(kernels.sparse_decode(c, W).pow(2).sum() for c in codes) + codes[1].l0.sum()

    with kernels.use_backend("torch"):
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
        (got_grad,) = torch.autograd.grad(got, W)
        assert hints == kernels.EncodeHints(capacity=5)
        want = loss(x)
        (want_grad,) = torch.autograd.grad(want, W)
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def _bad(name):
    x, W, b, b_dec = make_encoder(7, 20, 50)
    theta = torch.rand(50, device=DEVICE)
    calls = {
        "bandwidth": lambda: kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.0),
        "threshold-shape": lambda: kernels.jumprelu_encode(x, W, b, theta[:-1], bandwidth=0.1),
        "threshold-type": lambda: kernels.jumprelu_encode(x, W, b, 0.5, bandwidth=0.1),
        "threshold-nan": lambda: kernels.jumprelu_encode(x, W, b, theta * float("nan"), bandwidth=0.1),
        "capacity": lambda: kernels.relu_encode(x, W, b, capacity=0),
        "hints": lambda: kernels.gated_encode(x, W, b, theta, b, hints=64),
        "W_gate": lambda: kernels.gated_encode(x, W.half(), b, theta, b),
        "b_gate": lambda: kernels.gated_encode(x, W, None, theta, b),
        "r_mag": lambda: kernels.gated_encode(x, W, b, theta[:3], b),
        "x": lambda: kernels.relu_encode(x[0], W, b),
        "b_dec": lambda: kernels.relu_encode(x, W, b, b_dec=b_dec[:-1]),
    }
    return calls[name]


@pytest.mark.parametrize(
    "name,exc,match",
    [
        ("bandwidth", ValueError, "bandwidth must be"),
        ("threshold-shape", ValueError, r"threshold must have shape \(50,\)"),
        ("threshold-type", TypeError, "threshold must be a torch.Tensor"),
        ("threshold-nan", ValueError, "threshold contains NaN"),
        ("capacity", ValueError, "capacity must be None or an int >= 1"),
        ("hints", TypeError, "hints must be a kernels.EncodeHints or None, got int"),
        ("W_gate", TypeError, "W_gate has dtype"),
        ("b_gate", TypeError, "b_gate must be a torch.Tensor"),
        ("r_mag", ValueError, "r_mag must have shape"),
        ("x", ValueError, "x must be 2-D"),
        ("b_dec", ValueError, "b_dec must have shape"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_bad_inputs(name, exc, match):
    with pytest.raises(exc, match=match):
        _bad(name)()


@triton.jit
def _visit_items(order_ptr, visits_ptr, row_blocks, splits, group_rows):
    """Persistent programs over row_blocks x splits items: order [items, 2] = (row block, split) of each item,
    visits [row_blocks, splits] += 1 per visit."""
    for item in tl.range(tl.program_id(0), row_blocks * splits, tl.num_programs(0)):
        m, s = grouped_item(item, row_blocks, splits, group_rows)
        tl.store(order_ptr + 2 * item, m)
        tl.store(order_ptr + 2 * item + 1, s)
        tl.atomic_add(visits_ptr + m * splits + s, 1)


@pytest.mark.parametrize(
    "row_blocks,splits,group_rows,programs", [(5, 7, 2, 3), (7, 3, 3, 4), (3, 1, 4, 2), (1, 5, 1, 5)]
)
def test_grouped_item_visits_each_item_once_in_groups(row_blocks, splits, group_rows, programs):
    """Odd grids, a short last group: every (row block, split) once; items walk group_rows row blocks (fastest)
    x every split, group after group."""
    items = row_blocks * splits
    order = torch.full((items, 2), -1, dtype=torch.int32, device=DEVICE)
    visits = torch.zeros(row_blocks, splits, dtype=torch.int32, device=DEVICE)
    _visit_items[(programs,)](order, visits, row_blocks, splits, group_rows)
    assert (visits == 1).all()
    want = [
        (first + r, s)
        for first in range(0, row_blocks, group_rows)
        for s in range(splits)
        for r in range(min(group_rows, row_blocks - first))
    ]
    assert [tuple(p) for p in order.tolist()] == want


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize(
    "dtype,d", [(torch.float32, 12), (torch.float32, 9), (torch.bfloat16, 24), (torch.bfloat16, 12)], ids=str
)
def test_descriptor_and_pointer_paths(dtype, d, tma, monkeypatch):
    """x and W through TMA descriptors where their rows are 16-byte aligned (fp32 d = 12, bf16 d = 24), else
    pointer loads; both against float64, with several row groups (a small L2) and programs looping over
    tiles. tma=False forces pointer loads on aligned rows too. (The interpreter's TF32 product is fp32.)"""
    B, n = 40, 100  # interpreter tiles 16 x 16: 3 row blocks (the last partial) x 7 tiles, 4 programs
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # IEEE fp32 (an FMA product) takes pointers; the fixture resets
    aligned = d * dtype.itemsize % 16 == 0
    taken = []
    monkeypatch.setattr(gemm, "l2_bytes", lambda device: 2 * 16 * d * dtype.itemsize)  # groups of one row block
    monkeypatch.setattr(threshold, "tma_ready", lambda t: taken.append(tma and gemm.tma_ready(t)) or taken[-1])
    x, W, b, _ = make_encoder(B, d, n, dtype)
    theta = 0.3 * torch.rand(n, device=DEVICE).to(dtype)
    b_gate, r_mag, b_mag = make_gated(n, dtype)
    for mode in MODES:
        gate_args = (b_gate, None, r_mag, b_mag) if mode == torch_ops.GATED else (b, theta, None, None)
        values, gate, aux, ids, counts = threshold.threshold_select_triton(mode, x, W, *gate_args, 0.1, n)
        assert taken[-1] == (tma and aligned)
        slots = ids.long().cpu()  # empty slots: id 0, value 0
        dense = lambda t, slots=slots: torch.zeros(B, n, dtype=torch.float64).scatter_add_(1, slots, t.double().cpu())
        if mode == torch_ops.RELU:
            want, mask = R.relu(*f64(x, W, b)), R.relu(*f64(x, W, b)) > 0
        elif mode == torch_ops.JUMPRELU:
            want, _ = R.jumprelu(*f64(x, W, b, theta), 0.2)
            mask = R.jumprelu_band(*f64(x, W, b, theta), 0.2)
        else:
            want, gate_ref = R.gated(*f64(x, W, b_gate, r_mag, b_mag))
            mask = gate_ref > 0
            assert_close(dense(gate), gate_ref, dtype, "gate")
        assert torch.equal(counts.cpu(), mask.sum(1).int().cpu())
        assert_close(dense(values), want, dtype, "values")
