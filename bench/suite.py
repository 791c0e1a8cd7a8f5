"""Runs a suite: for every shape, the two ceilings, then every op: each provider checked against the float64
reference, set up and warmed up (its peak memory measured over its set-up and first call), then timed. CUDA:
one provider after the other (do_bench). CPU: the providers of the op and the shape's GEMM in interleaved
rounds (measure.interleaved_ms), and every ratio (speedup, x GEMM) the median of its per-round ratios.

Under a time budget (Run.budget) a case (a provider's check and set-up; on CUDA with its timing; on the CPU the
op's rounds) starts only while the budget allows it; the others are recorded as skipped with the reason. The
document is handed to `save` after every op's results (CUDA: every provider's), so a run that is stopped early
(a budget, a kill, a failed check) leaves the results it has.
"""

from __future__ import annotations

import datetime
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import kernels
from kernels.gemm import tf32_enabled

from . import largest, measure, targets
from .inputs import Inputs
from .ops import OPS, check, estimate_bytes
from .providers import Provider
from .providers_topk import BASELINES
from .shapes import Shape

LARGEST_N_S = 60  # what the largest-n search may take on an H100 (bench/largest.py: under a minute)


class Progress:
    """A text progress bar on stderr: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width = total, 0, width
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        sys.stderr.write(f"\r{line:<110}" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


@dataclass
class Run:
    """shapes: where the TopK ops run; family_shapes: where the threshold-family and forward ops run;
    target_shapes: where only the cases bench.targets judges run; largest: whether to run the largest-n case
    (bench.largest, CUDA only); budget: the run's time budget."""

    suite: str
    device: str
    shapes: list[Shape]
    ops: list[str]
    providers: list[type[Provider]]
    family_shapes: list[Shape] = field(default_factory=list)
    target_shapes: list[Shape] = field(default_factory=list)
    largest: bool = False
    notes: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    gemm: list[dict] = field(default_factory=list)
    largest_n: dict | None = None
    budget: measure.Budget = field(default_factory=lambda: measure.Budget(None))

    def ops_at(self, shape: Shape) -> list[str]:
        ops = [op for op in self.ops if OPS[op].group == "topk" or shape in self.family_shapes]
        return [op for op in ops if op in targets.judged_ops(self.device)] if shape in self.target_shapes else ops

    def providers_for(self, op: str, shape: Shape) -> list[type[Provider]]:
        """The providers that run `op` at `shape`: at a target shape ours and the baselines the targets name."""
        chosen = [c for c in self.providers if op in c.ops]
        if shape not in self.target_shapes:
            return chosen
        keep = {targets.ours(self.device, [c.name for c in chosen]), *targets.baselines(op, self.device)}
        return [c for c in chosen if c.name in keep]

    def cases_at(self, shape: Shape) -> int:
        return sum(len(self.providers_for(op, shape)) for op in self.ops_at(shape))

    def note(self, line: str) -> None:
        print(line, file=sys.stderr)
        self.notes.append(line)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _metrics(op: str, I: Inputs, ms: float, gemm_ms: float | None, copy_gbps: float) -> dict:
    s, U = I.shape, I.touched
    gbps = OPS[op].bytes(s, U) / ms / 1e6
    return {
        "tokens_per_s": s.B / ms * 1e3,
        "tflops": OPS[op].flops(s, U) / ms / 1e9,
        "gbps": gbps,
        "x_gemm": ms / gemm_ms if gemm_ms else None,
        "copy_bw_frac": gbps / copy_gbps,
    }


def _prepare(op: str, cls: type[Provider], I: Inputs, probe) -> tuple[Callable[[], object], int | None]:
    """Construct, check (raises CheckError: nothing wrong gets timed), set up and warm up a provider on its
    backend; returns (the timed call, the peak memory of the set-up and the first call)."""
    P = cls(I.params, I.fam)
    P.pinned(lambda: check(op, P, I))()
    probe.start()
    fn = P.pinned(P.pinned(lambda: OPS[op].setup(P, I))())  # some setups run the forward whose backward is timed
    fn()  # the warm-up
    return fn, probe.stop(I.nbytes())


def _measure(run: Run, op: str, cls: type[Provider], I: Inputs, probe, gemm_ms, copy_gbps) -> dict:
    """CUDA: one provider's check, peak memory and do_bench timing; wall_s: what the case cost (its compiles too)."""
    t0 = time.perf_counter()
    fn, peak = _prepare(op, cls, I, probe)
    ms, q20, q80 = measure.time_ms(fn, run.device)
    energy = measure.energy_j_per_call(fn, run.device)
    del fn
    return {
        "status": "ok",
        "ms": ms,
        "ms_q20": q20,
        "ms_q80": q80,
        **_metrics(op, I, ms, gemm_ms, copy_gbps),
        "peak_mem_bytes": peak,
        "energy_j_per_token": None if energy is None else energy / I.shape.B,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def _interleaved(op: str, ready: list[tuple[dict, Callable]], I: Inputs, copy_gbps: float) -> None:
    """CPU: time the prepared providers of one op, ready = [(record, timed call)], and the shape's GEMM in
    interleaved rounds; fills each record with its times per round, their median and quantiles, and its x GEMM
    from the per-round ratios."""
    fns = {r["provider"]: fn for r, fn in ready}
    times = measure.interleaved_ms({**fns, targets.GEMM: measure.gemm_call(I.x, I.params.W_enc)})
    g = times[targets.GEMM]
    for r, _ in ready:
        t = times[r["provider"]]
        ms, q20, q80 = measure.summary(t)
        x_gemm, x_q20, x_q80 = measure.ratio_stats(t, g)
        r.update(status="ok", ms=ms, ms_q20=q20, ms_q80=q80, **_metrics(op, I, ms, None, copy_gbps))
        r.update(x_gemm=x_gemm, x_gemm_q20=x_q20, x_gemm_q80=x_q80, round_ms=t, round_gemm_ms=g,
                 energy_j_per_token=None)  # fmt: skip


def _add_speedups(records: list[dict]) -> None:
    """speedup[b] = time of baseline b / time of this provider, within one (shape, op): on the CPU the median
    of the per-round ratios (speedup_q20, speedup_q80: their quantiles), on CUDA the ratio of the medians."""
    ok = {r["provider"]: r for r in records if r["status"] == "ok"}
    for r in ok.values():
        base = [b for b in BASELINES if b in ok]
        if "round_ms" not in r:
            r["speedup"] = {b: ok[b]["ms"] / r["ms"] for b in base}
            continue
        stats = {b: measure.ratio_stats(ok[b]["round_ms"], r["round_ms"]) for b in base}
        for i, key in enumerate(("speedup", "speedup_q20", "speedup_q80")):
            r[key] = {b: v[i] for b, v in stats.items()}


def execute(run: Run, save: Callable[[dict], object] | None = None) -> dict:
    """Run every case of `run`; returns the results document (see report.write_json).

    save(doc), when given, is called after every case with the document so far ("complete": False), and once
    more if the run stops on an exception that follows some results ("stopped": the exception)."""
    gc.collect()
    gc.freeze()  # the objects alive now (modules): every gc.collect between cases skips them (~0.1 s each)
    probe = measure.MemoryProbe(run.device)
    avail = probe.available_bytes()
    validate = kernels.validation_enabled()
    kernels.set_validation(False)  # no host-syncing finiteness checks while timing
    doc = {
        "suite": run.suite,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "device": measure.device_facts(run.device),
        "load_avg": {"before": measure.load_average(), "after": None},
        "versions": measure.versions(),
        "git": measure.git_commit(),
        "config": {
            "ours_backend": "triton" if run.device == "cuda" else "torch",
            "tf32": tf32_enabled(),
            "timing": "triton.testing.do_bench, one provider after the other"
            if run.device == "cuda"
            else f"interleaved rounds (each provider and the GEMM once per round, at least "
            f"{measure.CPU_MIN_ROUNDS}); ratios: median [q20, q80] of the per-round ratios",
            "peak_memory": "cuda max_memory_allocated" if run.device == "cuda" else "peak RSS growth",
            "budget_s": run.budget.seconds,
        },
        "complete": False,
        "ceilings": {"copy": None, "gemm": run.gemm},
        "notes": run.notes,
        "results": run.results,
        "largest_n": None,
        "targets": [],
    }
    saved = (lambda: save(doc)) if save else (lambda: None)
    # the family shapes first: in the CUDA quick suite the reference shape, measured before the sweep over n
    shapes = list(dict.fromkeys([*run.family_shapes, *run.shapes]))
    total = 1 + sum(1 + run.cases_at(s) for s in shapes) + (run.largest and run.device == "cuda")
    progress = Progress(total)
    try:
        progress.step("ceiling: device-to-device copy")
        copy = doc["ceilings"]["copy"] = measure.copy_ceiling(run.device)
        _free(run.device)
        for shape in shapes:
            _run_shape(run, shape, probe, avail, copy["gbps"], progress, saved)
        if run.largest and run.device != "cuda":
            run.note(f"skip {largest.NAME}: CUDA only ({largest.CPU_SKIP})")
        elif run.largest and not run.budget.allows(LARGEST_N_S):
            run.note(f"skip {largest.NAME}: {run.budget.why_not()}; the search takes up to {LARGEST_N_S} s")
        elif run.largest:
            progress.step(f"{largest.NAME}: d={largest.D}, n from 2^{largest.FIRST_EXP}, until out of memory")
            with run.budget.case():
                run.largest_n = doc["largest_n"] = largest.search(run, _free)
            saved()
    except BaseException as e:
        if run.results:
            doc["stopped"] = f"{type(e).__name__}: {str(e)[:300]}"
            saved()
        raise
    finally:
        progress.close()
        kernels.set_validation(validate)
        gc.unfreeze()
    skipped = [r for r in run.results if r["status"] == "skipped" and r["reason"].startswith(measure.BUDGET)]
    if skipped:
        first = skipped[0]
        run.note(f"{measure.BUDGET} of {run.budget.seconds:.0f} s spent: {len(skipped)} cases not run, from "
                 f"{first['op']} n={first['n']} {first['provider']} on (status 'skipped')")  # fmt: skip
    doc["device"] = measure.device_facts(run.device)  # clocks and temperature after the run
    doc["load_avg"]["after"] = measure.load_average()
    doc["targets"] = targets.evaluate(run.results, run.device, [s.asdict() for s in run.family_shapes])
    doc["complete"] = True
    return doc


def _run_shape(run: Run, shape: Shape, probe, avail: int, copy_gbps: float, progress: Progress, saved) -> None:
    base = shape.itemsize * (2 * shape.n * shape.d + 3 * shape.B * shape.d + shape.B * shape.n)
    progress.step(f"ceiling: GEMM {shape.label()}")
    if not run.budget.allows():
        reason = run.budget.why_not()
        for op in run.ops_at(shape):
            for cls in run.providers_for(op, shape):
                progress.step(f"skipped {op} {shape.label()} {cls.name}")
                run.results.append({"op": op, **shape.asdict(), "provider": cls.name, "status": "skipped",
                                    "reason": reason})  # fmt: skip
        saved()
        return
    why = None
    with run.budget.case():
        try:
            if base > 0.9 * avail:
                raise torch.cuda.OutOfMemoryError(f"weights, inputs and the GEMM need {base / 2**30:.1f} GiB")
            I = Inputs.make(shape, run.device)
            gemm = {**shape.asdict(), **measure.gemm_ceiling(I.x, I.params.W_enc, run.device)}
        except torch.cuda.OutOfMemoryError as e:
            why = str(e).splitlines()[0]
    if why is not None:  # freed outside the except block, whose traceback holds the half-built tensors
        _free(run.device)
        run.note(f"skip {shape.label()}: {why} (of {avail / 2**30:.1f} GiB)")
        for _ in range(run.cases_at(shape)):
            progress.step(f"skipped {shape.label()}")
        return
    run.gemm.append(gemm)
    _free(run.device)
    for op in run.ops_at(shape):
        _run_op(run, op, shape, I, probe, avail, gemm["ms"], copy_gbps, progress, saved)
    del I
    _free(run.device)


def _run_op(run: Run, op: str, shape: Shape, I: Inputs, probe, avail, gemm_ms, copy_gbps, progress, saved) -> None:
    """Every provider of `op` at `shape`: CUDA measures each in turn; the CPU prepares each, then times them
    together with the GEMM in interleaved rounds. Records are added (and saved) as they are complete."""
    together = run.device != "cuda"
    records, ready = [], []  # ready: (record, timed call) of the providers prepared for the rounds

    def done(recs):
        for rec in recs:
            if rec["status"] == "skipped" and not rec["reason"].startswith(measure.BUDGET):
                run.note(f"skip {op} {shape.label()} {rec['provider']}: {rec['reason']}")
        records.extend(recs)
        run.results.extend(recs)
        _add_speedups(records)
        saved()

    for cls in run.providers_for(op, shape):
        progress.step(f"{op} {shape.label()} {cls.name}")
        rec = {"op": op, **shape.asdict(), "provider": cls.name, "touched_latents": I.touched}
        need = estimate_bytes(op, cls, shape)
        if not run.budget.allows():
            rec.update(status="skipped", reason=run.budget.why_not())
        elif need > 0.95 * avail:
            rec.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB of {avail / 2**30:.1f}")
        else:
            with run.budget.case():
                try:
                    if together:
                        fn, rec["peak_mem_bytes"] = _prepare(op, cls, I, probe)
                        ready.append((rec, fn))
                        continue
                    rec.update(_measure(run, op, cls, I, probe, gemm_ms, copy_gbps))
                except torch.cuda.OutOfMemoryError:
                    rec.update(status="skipped", reason="out of memory")
                finally:
                    I.zero_grad()
        _free(run.device)
        done([rec])
    if not ready:
        return
    recs = [rec for rec, _ in ready]
    if run.budget.allows():
        with run.budget.case():
            _interleaved(op, ready, I, copy_gbps)
    else:
        for rec in recs:
            rec.update(status="skipped", reason=run.budget.why_not())
    del ready
    I.zero_grad()
    _free(run.device)
    done(recs)
