"""The distributed case: a latent-sharded TopK training step against one process doing the same total work, and
the model of a step on 8 H100s (bench/NOTES.md, "More than one GPU").

    python -m bench.distributed                          # 2 gloo ranks on the CPU, the CPU reference shape
    python -m bench.distributed --ranks 2 --shape 2048,768,24576,32 --steps 5 --results-dir DIR
    python -m bench.distributed --model                  # the 8 x H100 table of NOTES.md

Measured with the same weights (seed 0) and batch, one TopK step each (loss, backward, Adam; no decoder
constraint or clipping), one thread per process:
  one process   sae.TopKSAE(d, n): the same total work on one core
  local part    every rank at once: a one-process step on its n / S latents, i.e. a sharded rank's work
                without its exchanges
  sharded       `ranks` latent shards (sae.distributed, torchrun --standalone, gloo)
  overhead      sharded - local part: the exchanges, waiting for the slower rank, the replicated work;
                efficiency = one process / (ranks x sharded)
  bytes         what rank 0 sends per step: sae.distributed.comm's ring model, and /proc/self/io's count of
                bytes written (gloo writes to its TCP sockets)
Results: distributed-<device>.json and .md in --results-dir (default $RESULTS_DIR or bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae import TopKSAE

CPU_SHAPE = (2048, 768, 24576, 32)  # B, d, n, k: DESIGN section 7's CPU shape


# ---- the exchange of a step, and the model of a step on 8 H100s ----------------------------------------------


def exchange_bytes(B: int, d: int, k: int, S: int, value_bytes: int, *, aux_k: int = 0) -> dict[str, int]:
    """Bytes one rank sends in one TopK step on S latent shards (ring collectives: all_gather (S - 1) m,
    all_reduce 2 (S - 1) m / S for an m-byte contribution), by what is exchanged. aux_k > 0: with AuxK
    (dead latents present); else the one int64 count of dead latents."""
    ring = lambda m: 2 * (S - 1) * m // S
    out = {
        "candidates: all_gather of [B, k] values + int32 ids": (S - 1) * B * k * (value_bytes + 4),
        "reconstruction + L0 sum: all_reduce of [B, d + 1] fp32": ring(B * (d + 1) * 4),
        "b_dec gradient: all_reduce of [d] fp32": ring(d * 4),
        "dead latents: all_reduce of one int64": ring(8),
    }
    if aux_k:
        out["AuxK candidates: all_gather of [B, aux_k]"] = (S - 1) * B * aux_k * (value_bytes + 4)
        out["AuxK reconstruction: all_reduce of [B, d] fp32"] = ring(B * d * 4)
    return out


@dataclass(frozen=True)
class H100:
    """The figures the model assumes (NOTES.md's readings where it has them)."""

    gemm_tflops: float = 798.0  # bf16 cuBLAS, 8192^3 (NOTES.md)
    tf32_tflops: float = 400.0  # fp32 weights: tf32 tensor cores, about half the bf16 rate
    encode_over_gemm: float = 1.15  # DESIGN section 7's target for the fused encoder
    hbm_gbps: float = 3000.0  # device-to-device copy, bytes read + written (NOTES.md)
    bus_gbps: float = 360.0  # NCCL ring bus bandwidth over NVLink 4 (8 GPUs), bytes sent per rank per second
    latency_us: float = 25.0  # per collective
    memory_gb: float = 80.0
    usable: float = 0.92  # after the CUDA context, the allocator's slack and the activations


# Bytes per parameter of the elementwise passes of one trainer step (sae/trainer.py), counted from its code:
# backward writes the dense gradient, clipping reads it and scales it (12), fused Adam reads p, g, m, v and
# writes p, m, v (28); bf16 adds the fp32 -> bf16 copy (6) and the bf16 -> fp32 gradient (6 + its write 2).
# The decoder half also pays the tangent projection (48: five temporaries) and the renormalisation (12).
STATE_PASSES = {"fp32": 4 + 12 + 28, "bf16": 2 + 12 + 28 + 6 + 6}
DECODER_PASSES = 48 + 12
STATE_BYTES = {"fp32": 16, "bf16": 20}  # per parameter: fp32 p, g, m, v; bf16 adds the work copy and its gradient


def model_step(n: int, d: int, B: int = 8192, k: int = 64, *, S: int = 8, precision: str = "bf16", hw=H100()):
    """Memory and time of one TopK training step per rank on S latent shards (one data group), by component."""
    rows = n // S
    params = rows * (2 * d + 1)
    value_bytes = 2 if precision == "bf16" else 4
    temporaries = 12 * B * d * 4 + B * 132 * k * 8  # activations, and the encoder's per-split candidates
    memory = params * STATE_BYTES[precision] + rows * 8 + temporaries
    gemm_ms = 2 * B * rows * d / (hw.gemm_tflops if precision == "bf16" else hw.tf32_tflops) / 1e9
    sparse_bytes = 5 * B * k * d * value_bytes  # decode, its backward and the encoder's: row gathers, scatters
    state_bytes = params * STATE_PASSES[precision] + rows * d * DECODER_PASSES
    sent = exchange_bytes(B, d, k, S, value_bytes)
    ms = {
        "encode": hw.encode_over_gemm * gemm_ms,
        "gathers and scatters": sparse_bytes / hw.hbm_gbps / 1e6,
        "elementwise state passes": state_bytes / hw.hbm_gbps / 1e6,
        "exchange": sum(sent.values()) / hw.bus_gbps / 1e6 + len(sent) * hw.latency_us / 1e3,
    }
    fits = memory <= hw.usable * hw.memory_gb * 1e9
    return {"n": n, "d": d, "B": B, "k": k, "S": S, "precision": precision, "memory_gb": memory / 1e9,
            "fits": fits, "sent_bytes": sent, "ms": ms, "step_ms": sum(ms.values())}  # fmt: skip


def largest_n(d: int, *, ranks: int = 8, precision: str = "fp32", hw=H100()) -> int:
    """The largest power of two n whose training state (STATE_BYTES per parameter) fits ranks x usable memory."""
    per_latent = (2 * d + 1) * STATE_BYTES[precision] + 8
    n = 1
    while 2 * n * per_latent <= ranks * hw.usable * hw.memory_gb * 1e9:
        n *= 2
    return n


def model_table() -> str:
    """The NOTES.md table: the two shapes of the issue on 8 H100s, both precisions, and the largest n."""
    head = ["n", "d", "precision", "memory / rank", "fits", "sent / rank / step", "encode", "gathers, scatters",
            "state passes", "exchange", "step", "tokens/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n, d in ((2**24, 768), (2**22, 4096)):
        for precision in ("bf16", "fp32"):
            m = model_step(n, d, precision=precision)
            t = m["ms"]
            cells = [f"2^{n.bit_length() - 1}", str(d), precision, f"{m['memory_gb']:.1f} GB",
                     "yes" if m["fits"] else "no", f"{sum(m['sent_bytes'].values()) / 1e6:.0f} MB",
                     f"{t['encode']:.1f} ms", f"{t['gathers and scatters']:.1f} ms",
                     f"{t['elementwise state passes']:.1f} ms", f"{t['exchange']:.2f} ms", f"{m['step_ms']:.0f} ms",
                     f"{m['B'] / m['step_ms']:.0f}k"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    for precision in ("fp32", "bf16"):
        sizes = ", ".join(f"d = {d}: 2^{largest_n(d, precision=precision).bit_length() - 1}" for d in (768, 4096))
        lines.append(f"\nLargest n (a power of two) whose {precision} training state fits 8 x 80 GB: {sizes}.")
    return "\n".join(lines)


# ---- the measurement ------------------------------------------------------------------------------------------


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _step_fn(model, x, latents: int):
    """One step as the trainer takes it, without its decoder constraint and clipping (no latent dead yet)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    alive = torch.zeros(latents, dtype=torch.bool)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(x, dead_mask=alive)["loss"].backward()
        opt.step()

    return step


def _times(step, steps: int, sync=lambda: None) -> list[float]:
    """Seconds of each of `steps` calls after one warm-up (sync before each, so ranks start together)."""
    step()
    out = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def _batch(B: int, d: int) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(1))


def rank_program(shape, steps: int, out: Path) -> None:
    """Under torchrun: the sharded step and the local part, timed on every rank; rank 0 writes the numbers."""
    import torch.distributed as dist

    from sae.distributed import TRAFFIC, close, init_mesh, shard_model

    torch.set_num_threads(1)
    B, d, n, k = shape
    mesh = init_mesh(int(os.environ["WORLD_SIZE"]))  # every rank a latent shard
    S = mesh["shard"].size()
    x = _batch(B, d)
    torch.manual_seed(0)
    sharded = _step_fn(shard_model(TopKSAE, d, n, mesh, k=k), x, n // S)
    sharded_s = _times(sharded, steps, dist.barrier)
    TRAFFIC.reset()
    before = _wchar()
    sharded()
    wchar, modelled = _wchar() - before, TRAFFIC.total()
    torch.manual_seed(0)
    local_s = _times(_step_fn(TopKSAE(d, n // S, k), x, n // S), steps, dist.barrier)
    if dist.get_rank() == 0:
        rec = {"sharded_s": sharded_s, "local_s": local_s, "sent_wchar": wchar, "sent_model": modelled}
        rec["sent_design"] = exchange_bytes(B, d, k, S, x.element_size())
        out.write_text(json.dumps(rec))
    close()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; [] elsewhere)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        kids = [c for c, p in parent.items() if p == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


def run_ranks(ranks: int, args: list[str], *, timeout: float, env: dict | None = None, capture: bool = False):
    """`torchrun --standalone --nproc-per-node ranks args` -> subprocess.CompletedProcess (stdout and stderr
    together when `capture`). Past `timeout` seconds every process it started is killed and TimeoutExpired
    raised (with the output so far): torchrun starts each rank in a session of its own, so killing its
    process group would leave the ranks running, holding the output pipe open."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=subprocess.STDOUT if capture else None, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGSTOP)  # torchrun starts no rank while its tree is read
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def measure(ranks: int, shape, steps: int) -> dict:
    """One process (one thread), then `ranks` ranks (torchrun --standalone) of rank_program."""
    B, d, n, k = shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        one_s = _times(_step_fn(TopKSAE(d, n, k), _batch(B, d), n), steps)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        args = ["-m", "bench.distributed", "--rank-program", "--shape", ",".join(map(str, shape)),
                "--steps", str(steps), "--out", str(out)]  # fmt: skip
        run_ranks(ranks, args, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"}).check_returncode()
        ranks_rec = json.loads(out.read_text())
    med = lambda xs: statistics.median(xs) * 1e3
    one, local, sharded = med(one_s), med(ranks_rec["local_s"]), med(ranks_rec["sharded_s"])
    return {"ranks": ranks, "B": B, "d": d, "n": n, "k": k, "steps": steps, "one_process_ms": one,
            "local_part_ms": local, "sharded_ms": sharded, "overhead_ms": sharded - local,
            "overhead_frac": (sharded - local) / sharded, "efficiency": one / (ranks * sharded),
            "sent_bytes_wchar": ranks_rec["sent_wchar"], "sent_bytes_model": ranks_rec["sent_model"],
            "sent_bytes_design": ranks_rec["sent_design"], "weight_bytes": 2 * n * d * 4,
            "times_s": {"one_process": one_s, "local_part": ranks_rec["local_s"],
                        "sharded": ranks_rec["sharded_s"]}}  # fmt: skip


def markdown(rec: dict, device: dict) -> str:
    r = rec
    return "\n".join([
        f"# Latent-sharded TopK step: {r['ranks']} gloo ranks against one process ({device.get('name')})",
        "",
        f"B = {r['B']}, d = {r['d']}, n = {r['n']}, k = {r['k']}, fp32; medians of {r['steps']} steps.",
        "",
        "| configuration | ms / step |",
        "| --- | --- |",
        f"| one process, n latents | {r['one_process_ms']:.1f} |",
        f"| local part: n / {r['ranks']} latents per rank, no exchange | {r['local_part_ms']:.1f} |",
        f"| sharded: {r['ranks']} ranks x n / {r['ranks']} latents | {r['sharded_ms']:.1f} |",
        "",
        f"Overhead (sharded - local part): {r['overhead_ms']:.1f} ms = {100 * r['overhead_frac']:.1f}% of the "
        f"sharded step. Efficiency, one process / ({r['ranks']} x sharded): {r['efficiency']:.2f}.",
        f"Bytes rank 0 sends per step: {r['sent_bytes_wchar']} measured (/proc/self/io), {r['sent_bytes_model']} "
        f"counted by sae.distributed.comm, {sum(r['sent_bytes_design'].values())} by the design; the weights "
        f"are {r['weight_bytes']} bytes.",
        "",
    ])  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--shape", default=",".join(map(str, CPU_SHAPE)), help="B,d,n,k")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--results-dir", type=Path)
    ap.add_argument("--model", action="store_true", help="print the 8 x H100 model (NOTES.md) and exit")
    ap.add_argument("--rank-program", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model:
        print(model_table())
        return 0
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        ap.error(f"--shape wants B,d,n,k, got {args.shape!r}")
    if args.rank_program:
        rank_program(shape, args.steps, args.out)
        return 0
    from .measure import device_facts, git_commit, versions

    rec = measure(args.ranks, shape, args.steps)
    device = device_facts("cpu")
    doc = {"case": "distributed", "device": device, "versions": versions(), "git": git_commit(), **rec}
    results = args.results_dir or Path(os.environ.get("RESULTS_DIR") or Path(__file__).parent / "results")
    results.mkdir(parents=True, exist_ok=True)
    (results / "distributed-cpu.json").write_text(json.dumps(doc, indent=1) + "\n")
    (results / "distributed-cpu.md").write_text(markdown(rec, device))
    print(markdown(rec, device))
    print(f"wrote {results / 'distributed-cpu.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
