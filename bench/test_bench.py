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
from bench import measure, shapes, targets
from bench.__main__ import main
from bench.inputs import Inputs
from bench.ops import FAMILIES, FORWARDS, OPS, build
from bench.oracle import CheckError
from bench.providers import preactivations
from bench.providers_threshold import FAMILY_PROVIDERS, DenseGated, DenseGlobal, OursBatchTopK, OursJumpReLU
from bench.providers_topk import PROVIDERS, Dense, Ours, Sparsify, TorchSparse
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
TINY_TARGET = Shape(B=64, d=32, n=512, k=4, dtype="float32")  # TINY's n = 512 stands for the CPU target shape


@pytest.fixture
def fast_timing(monkeypatch):
    monkeypatch.setattr(measure, "CPU_BUDGET_S", 0.0)
    monkeypatch.setattr(measure, "CPU_MIN_REPS", 2)
    monkeypatch.setattr(measure, "CPU_MIN_ROUNDS", 2)
    monkeypatch.setattr(measure, "COPY_BYTES", {"cpu": 1 << 20, "cuda": 1 << 20})


def test_cli_writes_json_markdown_plots_and_the_targets(tmp_path, fast_timing, capsys, monkeypatch):
    """TINY with n = 512 as the CPU target: every case at n = 256, the judged ones at 512, and their table."""
    monkeypatch.setattr(shapes, "CPU_TARGET", TINY_TARGET)
    assert main([*TINY, "--results-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu-quick.json").read_text())
    for key in ("device", "load_avg", "versions", "git", "ceilings", "results", "notes", "targets"):
        assert key in doc
    assert doc["device"]["kind"] == "cpu" and doc["device"]["cores"] >= 1 and doc["device"]["name"]
    assert len(doc["load_avg"]["before"]) == len(doc["load_avg"]["after"]) == 3
    assert {"torch", "triton", "cuda"} <= set(doc["versions"]) and "commit" in doc["git"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == set(OPS)
    for r in ok:
        assert r["ms_q20"] <= r["ms"] <= r["ms_q80"] and r["tokens_per_s"] > 0
        assert len(r["round_ms"]) == len(r["round_gemm_ms"]) >= 2 and r["x_gemm_q20"] <= r["x_gemm"] <= r["x_gemm_q80"]
    # at n = 256 every provider; a speedup is the median of the per-round ratios
    ours = next(r for r in ok if r["provider"] == "ours" and r["op"] == "step" and r["n"] == 256)
    assert set(ours["speedup"]) >= {"dense", "torch_sparse"}
    dense = next(r for r in ok if r["provider"] == "dense" and r["op"] == "step" and r["n"] == 256)
    per_round = measure.summary([a / b for a, b in zip(dense["round_ms"], ours["round_ms"], strict=True)])
    assert [ours[key]["dense"] for key in ("speedup", "speedup_q20", "speedup_q80")] == pytest.approx(per_round)
    # at the target: the judged ops only, by the judged provider and the baselines the targets name
    judged = targets.ours("cpu", {r["provider"] for r in ok})
    at_target = {(r["op"], r["provider"]) for r in doc["results"] if r["n"] == 512}
    assert {op for op, _ in at_target} == set(targets.judged_ops("cpu"))
    assert {p for op, p in at_target if op == "relu_step"} == {judged, "dense"}
    assert {p for op, p in at_target if op == "relu_encode"} == {judged}
    assert {p for op, p in at_target if op == "step"} <= {judged, "dense", "torch_sparse", "sparsify"}
    rows = doc["targets"]
    assert {t["class"] for t in rows} == {c.__name__ for c in ARCHITECTURES.values()}
    assert len(rows) == 5 + 3 * len(FAMILIES) + 2 and all(t["n"] == 512 and t["provider"] == judged for t in rows)
    no_peer = bool(Sparsify.unavailable())
    for t in rows:
        unmeasured = t["median"] is None
        assert unmeasured == ("missing" in t) == (t["met"] is None) == (no_peer and t["baseline"] == "sparsify")
        if not unmeasured:
            at_most = t["baseline"] == targets.GEMM  # GEMMs: at most the bound; speedups: at least
            assert t["met"] == (t["median"] <= t["bound"] if at_most else t["median"] >= t["bound"])
    assert "## Targets" in (tmp_path / "cpu-quick.md").read_text()
    assert (tmp_path / "cpu-quick.md").read_text().startswith("# sae-kernels benchmark")
    for name in ("speedup-vs-dense", "speedup-vs-torch-sparse", "peak-memory"):
        assert (tmp_path / f"cpu-quick-{name}.png").stat().st_size > 10_000
    for name in ("threshold-speedup-vs-dense", "threshold-peak-memory", "forward-speedup-vs-dense"):
        assert (tmp_path / f"cpu-quick-{name}.png").stat().st_size > 10_000
    out = capsys.readouterr()
    assert "vs dense PyTorch" in out.out and "CPU quick suite" in out.err
    assert f"targets of DESIGN section 7 met at {TINY_TARGET.label()}" in out.out
    assert "skip largest_n: CUDA only" in out.err


def test_interleaved_rounds_take_each_provider_in_turn(monkeypatch):
    """Rounds call ours, dense, the GEMM, ours, ...; load that comes and goes (rounds 1, 2 and 4 slowed 3-10x)
    spreads each one's own times, but not the per-round ratios."""
    clock, calls = FakeClock(), []
    slow = {1: 10.0, 2: 10.0, 4: 3.0}

    def provider(name: str, seconds: float):
        def call():
            calls.append(name)
            clock.t += seconds * slow.get((len(calls) - 1) // 3, 1.0)

        return call

    monkeypatch.setattr(measure.time, "perf_counter", clock)
    monkeypatch.setattr(measure, "CPU_BUDGET_S", 0.0)
    fns = {"ours": provider("ours", 1.0), "dense": provider("dense", 3.0), "gemm": provider("gemm", 2.0)}
    times = measure.interleaved_ms(fns)
    assert measure.CPU_MIN_ROUNDS >= 5 and calls == ["ours", "dense", "gemm"] * measure.CPU_MIN_ROUNDS
    assert times["ours"] == [1e3, 1e4, 1e4, 1e3, 3e3]
    assert measure.ratio_stats(times["dense"], times["ours"]) == pytest.approx((3.0, 3.0, 3.0))
    assert measure.ratio_stats(times["ours"], times["gemm"]) == pytest.approx((0.5, 0.5, 0.5))
    assert measure.summary(times["dense"]) == pytest.approx((9e3, 3e3, 3e4))  # alone: a wide spread
    monkeypatch.setattr(measure, "CPU_BUDGET_S", 1e3)  # more rounds while the budget lasts, up to CPU_MAX_REPS
    assert len(measure.interleaved_ms(fns)["gemm"]) == measure.CPU_MAX_REPS
    with pytest.raises(ValueError, match="5 and 4 rounds"):
        measure.ratio_stats(times["ours"], times["gemm"][:4])


def test_the_cpu_target_shape_runs_only_the_judged_cases():
    """The quick CPU suite: TopK ops at n = 4096 and at the target, where only what bench.targets judges runs."""
    from bench import suite

    quick = shapes.suite_shapes("quick", "cpu", None, {})
    assert [s.n for s in quick] == [4096, shapes.CPU_TARGET.n]
    assert shapes.target_shapes("quick", "cpu", quick) == shapes.family_shapes("quick", "cpu", quick) == quick[1:]
    assert shapes.target_shapes("full", "cpu", quick) == shapes.target_shapes("quick", "cuda", quick) == []
    every = [*PROVIDERS.values(), *FAMILY_PROVIDERS]
    run = suite.Run("quick", "cpu", quick, list(OPS), every, quick[1:], quick[1:])
    assert run.ops_at(quick[0]) == [op for op in OPS if OPS[op].group == "topk"]
    assert run.ops_at(quick[1]) == targets.judged_ops("cpu")
    assert {"encode", "step", "forward_ordered", "relu_encode", "gated_step"} <= set(targets.judged_ops("cpu"))
    assert not {"encode_bwd", "decode", "decode_bwd"} & set(targets.judged_ops("cpu"))
    names = lambda op, shape: sorted(c.name for c in run.providers_for(op, shape))
    assert names("step", quick[1]) == ["cpp", "dense", "sparsify", "torch_sparse"]
    assert names("encode", quick[1]) == names("relu_encode", quick[1]) == ["cpp"]
    assert names("forward_topk", quick[1]) == names("relu_step", quick[1]) == ["cpp", "dense"]
    assert names("step", quick[0]) == ["cpp", "dense", "ours", "sparsify", "torch_sparse"]
    no_cpp = suite.Run("quick", "cpu", quick, list(OPS), [c for c in every if c.name != "cpp"], quick[1:], quick[1:])
    assert sorted(c.name for c in no_cpp.providers_for("relu_step", quick[1])) == ["dense", "ours"]


def test_cli_fails_loudly_on_a_wrong_provider(tmp_path, fast_timing, monkeypatch):
    monkeypatch.setitem(PROVIDERS, "ours", ShiftedIndices)
    with pytest.raises(CheckError, match="encode .* provider ours: row"):
        main([*TINY, "--cases", "encode", "--providers", "ours,dense", "--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing was timed or written


# ---- time budgets and results written as a run goes (make gpu-bench, gpu-tune, gpu-test) --------------


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_starts_a_case_only_while_the_longest_fits():
    clock = FakeClock()
    budget = measure.Budget(10.0, reserve_s=1.0, clock=clock)
    with budget.case():
        clock.t += 4.0  # left 6 > 4 + 1 afterwards
    assert budget.allows() and budget.longest == 4.0
    clock.t += 1.5  # left 4.5 < 4 + 1
    assert not budget.allows() and budget.why_not().startswith(measure.BUDGET)
    assert measure.Budget(None, clock=clock).allows()
    with pytest.raises(ValueError, match="seconds=-1"):
        measure.Budget(-1)


def _fake_cpu_cases(monkeypatch, clock, seconds):
    """Each provider's check and set-up, and each op's rounds, take `seconds` of the fake clock."""
    from bench import suite

    def prepare(op, cls, I, probe):
        clock.t += seconds
        return (lambda: None), None

    def rounds(fns):
        clock.t += seconds
        return {name: [1.0] * measure.CPU_MIN_ROUNDS for name in fns}

    monkeypatch.setattr(suite, "_prepare", prepare)
    monkeypatch.setattr(measure, "interleaved_ms", rounds)


@pytest.mark.parametrize("budget_s, ran", [(3.5, 2), (2.5, 0)])
def test_suite_skips_cases_past_its_budget_and_saves_after_each(monkeypatch, fast_timing, budget_s, ran):
    """Set-ups and rounds of 1 s. 3.5 s: encode's two set-ups and its rounds run, decode's would not fit; 2.5 s:
    encode's rounds would not fit, so its prepared providers are skipped too. The second shape is skipped whole,
    without building its inputs; the document is saved after every op's results, complete only at the end."""
    from bench import suite

    clock = FakeClock()
    _fake_cpu_cases(monkeypatch, clock, 1.0)
    shapes = [Shape(B=16, d=8, n=64, k=4, dtype="float32"), Shape(B=16, d=8, n=128, k=4, dtype="float32")]
    run = suite.Run("quick", "cpu", shapes, ["encode", "decode"], [Ours, Dense])
    run.budget = measure.Budget(budget_s, clock=clock)
    saves = []
    doc = suite.execute(run, save=lambda d: saves.append((len(d["results"]), d["complete"])))
    assert [r["status"] for r in doc["results"]] == ["ok"] * ran + ["skipped"] * (8 - ran)
    assert all(r["reason"].startswith(measure.BUDGET) for r in doc["results"][ran:])
    cases = [(r["op"], r["n"], r["provider"]) for r in doc["results"][:4]]
    assert cases == [("encode", 64, "ours"), ("encode", 64, "dense"), ("decode", 64, "ours"), ("decode", 64, "dense")]
    assert saves == [(2, False), (3, False), (4, False), (8, False)]
    assert doc["complete"] and doc["config"]["budget_s"] == budget_s
    assert any(f"{8 - ran} cases not run" in note for note in doc["notes"])
    if ran:
        first = doc["results"][0]
        assert first["speedup"] == {"dense": 1.0} and first["round_ms"] == [1.0] * measure.CPU_MIN_ROUNDS


class Stopped(Exception):
    """Stands for a run killed mid-way."""


def test_cli_leaves_its_json_when_stopped(tmp_path, fast_timing, monkeypatch):
    """Killed in the third set-up (encode at the second shape): the first shape's encode is in the JSON."""
    from bench import suite

    calls = []

    def prepare(op, cls, I, probe):
        calls.append(cls.name)
        if len(calls) == 3:
            raise Stopped("killed")
        return (lambda: None), None

    monkeypatch.setattr(suite, "_prepare", prepare)
    with pytest.raises(Stopped):
        main([*TINY, "--cases", "encode", "--providers", "ours,dense", "--results-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert not doc["complete"] and doc["stopped"] == "Stopped: killed"
    assert [(r["provider"], r["status"]) for r in doc["results"]] == [("ours", "ok"), ("dense", "ok")]
    assert not (tmp_path / "cpu-quick.md").exists()  # the report of a finished run only


def test_cli_with_no_budget_left_records_every_case_skipped(tmp_path, fast_timing):
    assert main([*TINY, "--cases", "encode,step", "--budget-s", "0", "--results-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert doc["complete"] and doc["results"] and doc["ceilings"]["copy"]["gbps"] > 0
    assert all(r["status"] == "skipped" and r["reason"].startswith(measure.BUDGET) for r in doc["results"])
    assert "time budget" in (tmp_path / "cpu-quick.md").read_text()
    with pytest.raises(SystemExit):
        main([*TINY, "--budget-s", "-1"])


def test_tune_skips_configs_past_its_budget_and_saves_after_each(monkeypatch):
    from bench import tune

    clock = FakeClock()
    x, W = torch.randn(8, 4), torch.randn(16, 4)
    monkeypatch.setattr(tune, "make_call", lambda *a: (None, None, (x, W)))

    def fake_try(op, cfg, call, want, n, gemm, device):
        clock.t += 1.0
        return {"config": cfg, "agreement": 1.0, "ms": 1.0, "ms_q20": 1.0, "ms_q80": 1.0, "x_gemm": 1.0}

    monkeypatch.setattr(tune, "_try", fake_try)
    saves = []
    doc = tune.run("topk_encode", 8, 4, 16, 2, torch.float32, "cpu", candidates=tune.CANDIDATES["topk_encode"][:3],
                   budget=measure.Budget(1.5, clock=clock), save=lambda d: saves.append(len(d["results"])))  # fmt: skip
    assert ["ms" in r for r in doc["results"]] == [True, False, False]
    assert doc["results"][1]["skipped"].startswith(measure.BUDGET) and saves == [1, 2, 3]
    assert doc["complete"] and doc["budget_s"] == 1.5 and doc["results"][0]["wall_s"] >= 0
    assert "skipped: time budget" in tune.table(doc)


def test_tune_cli_shares_its_budget_between_ops(tmp_path, monkeypatch):
    """Each op gets a share of the time left when it starts, by its number of candidates; one JSON per op."""
    from bench import tune

    budgets = {}

    def fake_run(op, *shape, budget, save):
        budgets[op] = budget.seconds
        doc = {"op": op, "shape": {}, "gemm": {"ms": 1.0}, "results": [], "complete": True}
        save(doc)
        return doc

    monkeypatch.setattr(tune, "run", fake_run)
    monkeypatch.setattr(tune.backend, "INTERPRET", True)
    argv = ["--op", "topk_encode,threshold_encode", "--budget-s", "100", "--results-dir", str(tmp_path)]
    assert tune.main(argv) == 0
    share = 100 * len(tune.CANDIDATES["topk_encode"]) / sum(map(len, tune.CANDIDATES.values()))
    assert budgets == {"topk_encode": pytest.approx(share, abs=5), "threshold_encode": pytest.approx(100, abs=5)}
    assert {p.name.split("-")[1] for p in tmp_path.glob("tune-*.json")} == {"topk_encode", "threshold_encode"}
    with pytest.raises(SystemExit):
        tune.main(["--op", "topk_encode,nope"])


def test_testrun_plugin_skips_past_its_budget_and_writes_json_as_it_goes(tmp_path):
    """bench.testrun in a pytest subprocess: a test reads the JSON mid-run; one sleeps past the deadline (6 s
    after the start: room for a slow start on a loaded machine), so the next is skipped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_inner.py").write_text(
        "import json, os, time\n"
        "def test_fail():\n    assert False\n"
        "def test_json_so_far():\n"
        "    doc = json.load(open(os.environ['RUN_JSON']))\n"
        "    assert not doc['complete'] and doc['counts'] == {'failed': 1}\n"
        "def test_slow(request):\n"
        "    time.sleep(request.config.pluginmanager.get_plugin('bench-testrun').deadline - time.time() + 0.1)\n"
        "def test_late():\n    pass\n"
    )
    out = tmp_path / "run.json"
    env = {**os.environ, "RUN_JSON": str(out), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["-p", "bench.testrun", "--run-budget-s", "6", "--run-json", str(out), "-p", "no:cacheprovider", "-q"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "test_inner.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    outcomes = {t["id"].split("::")[1]: t["outcome"] for t in doc["tests"]}
    want = {"test_fail": "failed", "test_json_so_far": "passed", "test_slow": "passed", "test_late": "skipped"}
    assert outcomes == want
    assert doc["tests"][-1]["reason"].startswith("time budget of 6 s")
    assert doc["complete"] and doc["exitstatus"] == 1 and doc["counts"] == {"failed": 1, "passed": 2, "skipped": 1}


def test_tune_candidates_fit_the_topk_encoder():
    from bench import tune
    from kernels.topk_encode import MAX_BLOCK_N

    assert all(c["BLOCK_N"] <= MAX_BLOCK_N and c["BLOCK_M"] >= 16 for c in tune.CANDIDATES["topk_encode"])
