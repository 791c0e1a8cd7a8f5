"""The C++ CPU backend (csrc/, kernels._C): built in CI, bitwise the same for 1 and 2 threads, bf16 against the
float64 reference, bad inputs refused, and the PyTorch fallback with one warning where it is not built.

Every op's accuracy tests run on it through conftest.BACKENDS; these are the cpp-only properties.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import assert_close, assert_slots, assert_topk, make_encoder

import kernels
from kernels import backend
from kernels import reference as R

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernels run CPU tensors")
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="kernels._C is not built here")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_built_in_ci():
    """`make test` builds csrc/: under CI a missing extension is a failure, not a silent fallback."""
    assert backend.cpp_available() or os.environ.get("CI") != "true", "CI=true but kernels._C did not build"


def _every_op(dtype):
    """Outputs and gradients of every op with a C++ kernel, at shapes with several row blocks and splits."""
    B, d, n, k = 150, 40, 700, 9  # 150 rows: three row blocks of 64
    x, W, b, b_dec = make_encoder(B, d, n, dtype)
    theta = (0.3 * torch.rand(n)).to(dtype)
    r_mag, b_mag = (0.1 * torch.randn(n)).to(dtype), (0.1 * torch.randn(n)).to(dtype)
    W_dec = torch.randn(n, d).to(dtype)
    leaves = [t.requires_grad_() for t in (x, W, b, theta, r_mag, b_mag, W_dec)]
    codes = {
        "topk": kernels.topk_encode(x, W, b, k, b_dec=b_dec),
        "topk_small_batch": kernels.topk_encode(x[:3], W, b, k),  # one row block: column splits
        "batch_topk": kernels.batch_topk_encode(x, W, b, k),
        "relu": kernels.relu_encode(x, W, b - 0.5, capacity=n),
        "jumprelu": kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.05),
        "gated": kernels.gated_encode(x, W, b, r_mag, b_mag),
    }
    out = {}
    loss = 0
    for name, code in codes.items():
        x_hat = kernels.sparse_decode(code, W_dec, b_dec)
        out[name] = (code.values, code.indices, x_hat)
        loss = loss + x_hat.float().pow(2).mean()
    weights = torch.rand(n)
    loss = loss + kernels.prefix_losses(codes["topk"], W_dec, b_dec, x, weights).mean()
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach() for ts in out.values() for t in ts] + list(grads)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype):
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            with kernels.use_backend("cpp"):
                runs.append(_every_op(dtype))
    finally:
        torch.set_num_threads(previous)
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


@needs_cpp
@pytest.mark.parametrize("case", [(1, 24, 40, 1), (70, 33, 300, 7), (5, 17, 19, 19)], ids=str)
def test_bf16_topk_against_reference(case):
    B, d, n, k = case
    x, W, b, b_dec = make_encoder(B, d, n, torch.bfloat16)
    with kernels.use_backend("cpp"):
        code = kernels.topk_encode(x, W, b, k, b_dec=b_dec)
        x_hat = kernels.sparse_decode(code, W, b_dec)
    assert code.values.dtype == torch.bfloat16
    f = torch.relu(R.preactivations(x.double(), W.double(), b.double(), b_dec.double()))
    assert_topk(code, f, k, torch.bfloat16)
    ref = R.sparse_decode(kernels.SparseCode(code.values.double(), code.indices), W.double(), b_dec.double())
    assert_close(x_hat, ref, torch.bfloat16, "decode")


@needs_cpp
def test_bf16_threshold_against_reference():
    B, d, n = 70, 33, 300
    x, W, b, _ = make_encoder(B, d, n, torch.bfloat16)
    theta = (0.3 * torch.rand(n)).to(torch.bfloat16)
    with kernels.use_backend("cpp"):
        code = kernels.jumprelu_encode(x, W, b, theta, bandwidth=0.05)
    f, _ = R.jumprelu(x.double(), W.double(), b.double(), theta.double(), 0.05)
    assert_close(code.to_dense(n), f, torch.bfloat16, "jumprelu")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_panel_precheck_with_ties(dtype):
    """The selection skips 32-column panels by a vector pre-check. Integer data, n = 300 (three column splits at
    B = 70; each split's last panel is partly past n): many entries of a full panel equal a row's TopK floor or a
    JumpReLU threshold (or its band's edge), and zero rows tie everywhere; both selections are exact."""
    B, d, n, k = 70, 7, 300, 9
    x = torch.randint(-1, 2, (B, d)).to(dtype)
    W = torch.randint(-1, 2, (n, d)).to(dtype)
    x[[3, 40]] = 0
    theta = torch.randint(0, 3, (n,)).to(dtype)
    with kernels.use_backend("cpp"):
        code = kernels.topk_encode(x, W, None, k)
        jump = kernels.jumprelu_encode(x, W, None, theta, bandwidth=2.0)
    z = x.double() @ W.double().T
    f = torch.relu(z)
    assert (f == f.sort(1, descending=True).values[:, k - 1 : k]).sum(1).min() > 2  # ties at every row's floor
    order = f.sort(dim=1, descending=True, stable=True)  # equal values by lower id
    assert torch.equal(code.indices.long(), order.indices[:, :k])
    assert torch.equal(code.values.double(), order.values[:, :k])
    ref_f, ref_l0 = R.jumprelu(x.double(), W.double(), None, theta.double(), 2.0)
    assert (z - theta.double()).abs().eq(1).sum() > B  # entries on the band's edge (|z - theta| = 1: outside)
    assert torch.equal(jump.to_dense(n).double(), ref_f) and torch.equal(jump.l0.double(), ref_l0)
    assert_slots(jump, R.jumprelu_band(x.double(), W.double(), None, theta.double(), 2.0))


@needs_cpp
def test_bad_inputs_name_the_argument():
    x, W, b, _ = make_encoder(4, 8, 20)
    values, indices = torch.empty(4, 3), torch.empty(4, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x, W: expected one dtype"):
        torch.ops.sae_kernels_cpp.topk_select(x, W.double(), b, 3, values, indices)
    with pytest.raises(RuntimeError, match="k: expected"):
        torch.ops.sae_kernels_cpp.topk_select(x, W, b, 21, values, indices)
    with pytest.raises(RuntimeError, match="values: expected shape"):
        torch.ops.sae_kernels_cpp.topk_select(x, W, b, 2, values, indices)
    bad = torch.tensor([[0, 25]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"indices: expected ids in \[0, 20\)"):
        torch.ops.sae_kernels_cpp.gather_matmul(torch.ones(1, 2), bad, W, None, torch.empty(1, 8))
    with pytest.raises(RuntimeError, match="X: expected float32, float16 or bfloat16"):
        torch.ops.sae_kernels_cpp.scatter_rows(
            torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32), x.double(), 20,
            torch.empty(20, 8, dtype=torch.float64), torch.empty(0),
        )  # fmt: skip


def test_fallback_warns_once(monkeypatch):
    """Without kernels._C the CPU ops run on the PyTorch path after one warning; naming "cpp" is an error."""
    monkeypatch.setitem(sys.modules, "kernels._C", None)  # the import fails as if never built
    backend.cpp_available.cache_clear()
    try:
        x = torch.zeros(2, 3)
        with pytest.warns(UserWarning, match="C\\+\\+ CPU kernels .* are not built"):
            assert backend.resolve(x) == "torch"
        assert backend.resolve(x) == "torch"  # no second warning (pytest.warns above saw the only one)
        with kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="kernels._C is not built"):
            backend.resolve(x)
    finally:
        monkeypatch.delitem(sys.modules, "kernels._C")
        backend.cpp_available.cache_clear()


def test_build_without_a_compiler_installs_the_python_path(tmp_path):
    """setup.py's extension is optional: a compiler that fails leaves a message and no extension, not an error."""
    env = dict(os.environ, CC="false", CXX="false")
    args = ["build_ext", "--build-temp", str(tmp_path / "tmp"), "--build-lib", str(tmp_path / "lib")]
    done = subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the C++ CPU kernels (csrc/) did not build" in done.stdout
    assert not list((tmp_path / "lib").rglob("_C*.so"))
