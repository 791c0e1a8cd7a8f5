"""pytest-benchmark entries for every (op, provider), and tests of the suite itself.

`pytest bench/ --benchmark-only` times each entry (the device is synchronised inside the timed function;
device facts go to extra_info): the reference shape on CUDA, a tiny shape on the CPU. CI runs
`pytest bench --benchmark-disable`, which runs every entry once, checks included.
"""

from __future__ import annotations

import json

import pytest
import torch

import kernels
from bench import measure
from bench.__main__ import main
from bench.inputs import Inputs
from bench.ops import FAMILIES, FORWARDS, OPS, build
from bench.oracle import CheckError
from bench.providers import preactivations
from bench.providers_threshold import FAMILY_PROVIDERS, DenseGated, DenseGlobal, OursBatchTopK, OursJumpReLU
from bench.providers_topk import PROVIDERS, Dense, Ours, TorchSparse
from bench.shapes import GPU_REFERENCE, Shape
from kernels import SparseCode
from sae.registry import ARCHITECTURES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = GPU_REFERENCE if DEVICE == "cuda" else Shape(B=64, d=48, n=640, k=8, dtype="float32")
CLASSES = {f"{c.name}:{c.__name__}": c for c in (*PROVIDERS.values(), *FAMILY_PROVIDERS)}
CASES = [pytest.param(op, key, id=f"{op}-{key}") for op in OPS for key, cls in CLASSES.items() if op in cls.ops]


@pytest.fixture(scope="module", autouse=True)
def no_validation():
    previous = kernels.validation_enabled()
    kernels.set_validation(False)
    yield
    kernels.set_validation(previous)


@pytest.fixture(scope="module")
def inputs():
    return Inputs.make(SHAPE, DEVICE)


@pytest.mark.parametrize("op, provider", CASES)
def test_bench(benchmark, inputs, op, provider):
    cls = CLASSES[provider]
    if reason := cls.unavailable():
        pytest.skip(reason)
    fn = build(op, cls, inputs)

    def timed():
        fn()
        measure.sync(DEVICE)

    benchmark.extra_info.update(device=measure.device_facts(DEVICE), shape=SHAPE.asdict(), op=op)
    benchmark(timed)
    inputs.zero_grad()


class ShiftedIndices(Ours):
    """Selects the neighbour of every latent: a wrong encoder."""

    def encode(self, x):
        code = super().encode(x)
        return SparseCode(code.values, (code.indices + 1) % self.p.W_enc.shape[0])


class ScaledGradient(Ours):
    """Right forward, backward 1.5x too large."""

    def encode(self, x):
        code = super().encode(x)
        return SparseCode(code.values.detach() + 1.5 * (code.values - code.values.detach()), code.indices)


class ScaledDecode(Dense):
    def decode(self, f):
        return 1.01 * super().decode(f)


class DroppedBias(TorchSparse):
    def encode(self, x):
        return super().encode(x + self.p.b_dec.detach())  # forgets the input centering


class ShiftedThreshold(OursJumpReLU):
    """Encodes with thresholds 10% too high: a wrong selection."""

    def encode(self, x):
        p = self.p
        theta = 1.1 * self.fam.threshold
        return kernels.jumprelu_encode(x, p.W_enc, p.b_enc, theta, bandwidth=1e-3, b_dec=p.b_dec)


class ThresholdGradientOff(OursJumpReLU):
    """Right loss and selection, threshold gradient off by 0.1 for every latent."""

    def loss(self, x):
        extra = 0.1 * self.fam.threshold.float().sum()
        return super().loss(x) + extra - extra.detach()


class NoAuxLoss(DenseGated):
    """Forgets the gated SAE's auxiliary reconstruction."""

    def loss(self, x):
        act = self.encode(x)
        return ((self.decode(act).float() - x.float()) ** 2).sum(-1).mean() + act[1].float().sum(-1).mean()


class PerRowTopK(OursBatchTopK):
    """k per row instead of B * k over the batch."""

    def encode(self, x):
        p = self.p
        return kernels.topk_encode(x, p.W_enc, p.b_enc, p.k, b_dec=p.b_dec)


class ZeroThreshold(DenseGlobal):
    """Forgets the global inference threshold (a ReLU forward)."""

    def encode(self, x):
        return torch.relu(preactivations(self.p, x, self.p.b_enc)), None


WRONG = [
    ("encode", ShiftedIndices),
    ("encode", DroppedBias),
    ("encode_bwd", ScaledGradient),
    ("decode", ScaledDecode),
    ("decode_bwd", ScaledDecode),
    ("step", ScaledGradient),
    ("step", ScaledDecode),
    ("jumprelu_encode", ShiftedThreshold),
    ("jumprelu_step", ShiftedThreshold),
    ("jumprelu_step", ThresholdGradientOff),
    ("gated_step", NoAuxLoss),
    ("batchtopk_encode", PerRowTopK),
    ("forward_batchtopk", ZeroThreshold),
    ("forward_matryoshka", ZeroThreshold),
]


@pytest.mark.parametrize("op, cls", [pytest.param(o, c, id=f"{o}-{c.__name__}") for o, c in WRONG])
def test_wrong_provider_fails_its_check(inputs, op, cls):
    with pytest.raises(CheckError):
        build(op, cls, inputs)


@pytest.mark.parametrize("op", ["encode", "encode_bwd", "step"])
@pytest.mark.parametrize("name", ["dense", "torch_sparse"])
def test_bf16_baselines_pass_despite_rounding(op, name):
    """bf16 GEMMs round z before the top-k, so near-ties change places: the check must allow that."""
    shape = Shape(B=96, d=256, n=4096, k=32, dtype="bfloat16")
    build(op, PROVIDERS[name], Inputs.make(shape, "cpu", seed=3))


@pytest.fixture(scope="module")
def bf16_inputs():
    return Inputs.make(Shape(B=96, d=256, n=4096, k=32, dtype="bfloat16"), "cpu", seed=3)


@pytest.mark.parametrize("op", ["relu_step", "jumprelu_step", "gated_step", "batchtopk_step", "forward_jumprelu"])
def test_bf16_dense_families_pass_despite_rounding(bf16_inputs, op):
    """bf16 rounds z, so latents at a threshold (or a JumpReLU band edge) may go either way."""
    build(op, next(c for c in FAMILY_PROVIDERS if c.name == "dense" and op in c.ops), bf16_inputs)


def test_family_thresholds_give_l0_near_k(inputs):
    with torch.no_grad():
        code = OursJumpReLU(inputs.params, inputs.fam).encode(inputs.x)
    assert 0.5 * SHAPE.k <= float(code.l0.mean()) <= 2 * SHAPE.k


def test_every_registered_class_has_its_forward_case(inputs):
    """The forward cases follow sae.registry: one per class, run by ours (that very class) and dense."""
    assert set(FORWARDS) == set(ARCHITECTURES) and set(FAMILIES) <= set(ARCHITECTURES)
    for arch, sae_class in ARCHITECTURES.items():
        op = f"forward_{arch}"
        assert OPS[op].doc.startswith(f"{sae_class.__name__}(x)")
        runners = [c for c in (*PROVIDERS.values(), *FAMILY_PROVIDERS) if op in c.ops]
        names = [c.name for c in runners]
        assert {"ours", "dense"} <= set(names) and len(names) == len(set(names)), op
        ours = runners[names.index("ours")](inputs.params, inputs.fam)
        assert type(ours.model) is sae_class


TINY = ["--device", "cpu", "--n", "256,512", "--d", "32", "--k", "4", "--batch", "64"]


@pytest.fixture
def fast_timing(monkeypatch):
    monkeypatch.setattr(measure, "CPU_BUDGET_S", 0.0)
    monkeypatch.setattr(measure, "CPU_MIN_REPS", 2)
    monkeypatch.setattr(measure, "COPY_BYTES", {"cpu": 1 << 20, "cuda": 1 << 20})


def test_cli_writes_json_markdown_and_plots(tmp_path, fast_timing, capsys):
    assert main([*TINY, "--results-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu-quick.json").read_text())
    for key in ("device", "versions", "git", "ceilings", "results", "notes"):
        assert key in doc
    assert doc["device"]["kind"] == "cpu" and doc["device"]["cores"] >= 1
    assert {"torch", "triton", "cuda"} <= set(doc["versions"]) and "commit" in doc["git"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == set(OPS)
    for r in ok:
        assert r["ms_q20"] <= r["ms"] <= r["ms_q80"] and r["tokens_per_s"] > 0
    ours = next(r for r in ok if r["provider"] == "ours" and r["op"] == "step")
    assert set(ours["speedup"]) >= {"dense", "torch_sparse"}
    assert (tmp_path / "cpu-quick.md").read_text().startswith("# sae-kernels benchmark")
    for name in ("speedup-vs-dense", "speedup-vs-torch-sparse", "peak-memory"):
        assert (tmp_path / f"cpu-quick-{name}.png").stat().st_size > 10_000
    for name in ("threshold-speedup-vs-dense", "threshold-peak-memory", "forward-speedup-vs-dense"):
        assert (tmp_path / f"cpu-quick-{name}.png").stat().st_size > 10_000
    out = capsys.readouterr()
    assert "vs dense PyTorch" in out.out and "CPU quick suite" in out.err
    assert "skip largest_n: CUDA only" in out.err


def test_cli_fails_loudly_on_a_wrong_provider(tmp_path, fast_timing, monkeypatch):
    monkeypatch.setitem(PROVIDERS, "ours", ShiftedIndices)
    with pytest.raises(CheckError, match="encode .* provider ours: row"):
        main([*TINY, "--cases", "encode", "--providers", "ours,dense", "--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing was timed or written
