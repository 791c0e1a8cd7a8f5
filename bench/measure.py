"""Measuring: device facts, versions, timing, peak memory and energy; a run's time budget.

Timing. CUDA: `triton.testing.do_bench` (it flushes the L2 cache before every run, so inputs never start
warm in cache; median and 20/80 quantiles), one provider after the other. CPU: the providers of a case (and
the GEMM of its shape) in interleaved rounds, each round calling every one once in turn (`interleaved_ms`):
at least `CPU_MIN_ROUNDS` rounds, more until `CPU_BUDGET_S` seconds per provider have passed (at most
`CPU_MAX_REPS`). A ratio is the median of its per-round ratios with their 20/80 quantiles (`ratio_stats`),
so load from other processes, which comes and goes over seconds, hits both sides of a ratio alike. A single
function alone (the ceilings): `time_ms`, at least `CPU_MIN_REPS` calls.

Peak memory of a provider on an op, over its setup (e.g. the forward pass a backward needs) and its first
call (so lazily created state such as Adam's moments counts), with every live tensor counted: the case's
weights and inputs, the provider's state and its temporaries. CUDA: `torch.cuda.max_memory_allocated`
after a reset. CPU: the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the setup, measured after `gc.collect()` and
`malloc_trim(0)` so memory freed earlier is not counted, plus the bytes of the weights and inputs that
were already live; None where the kernel does not allow the reset.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

CPU_BUDGET_S = 0.5
CPU_MIN_REPS = 3
CPU_MIN_ROUNDS = 5
CPU_MAX_REPS = 25
ENERGY_WINDOW_S = 0.5
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}  # the copy ceiling's buffer, far larger than any cache
REPO = Path(__file__).resolve().parent.parent


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of fn's time in ms; fn must already be warm."""
    if device == "cuda":
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(q20), float(q80)
    times: list[float] = []
    start = time.perf_counter()
    more = lambda: len(times) < CPU_MAX_REPS and time.perf_counter() - start < CPU_BUDGET_S
    while len(times) < CPU_MIN_REPS or more():
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summary(times)


def summary(values: list[float]) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) of values (at least one)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def interleaved_ms(fns: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """CPU: the time in ms of every call of each fn (warm already), in rounds; a round calls each fn once, in
    the dict's order. At least CPU_MIN_ROUNDS rounds, more while less than CPU_BUDGET_S x len(fns) seconds have
    passed, at most CPU_MAX_REPS. Returns {name: [ms of round 0, round 1, ...]}."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    more = lambda: rounds < CPU_MAX_REPS and time.perf_counter() - start < CPU_BUDGET_S * len(fns)
    while rounds < CPU_MIN_ROUNDS or more():
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """(median, q20, q80) of the per-round ratios num[i] / den[i] (times of the same rounds)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"ratio_stats: {len(num)} and {len(den)} rounds; expected the same number, at least one")
    return summary([a / b for a, b in zip(num, den, strict=True)])


# ---- time budget --------------------------------------------------------------------------------------


BUDGET = "time budget"  # how the reason of a case the budget skipped begins


def budget_seconds(text: str) -> float:
    """argparse type of a --budget-s option: seconds >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


class Budget:
    """A run's wall-clock budget, so that a run with a time limit ends on its own with its results written.

    A case starts only while more time is left than the longest case so far took, plus `reserve_s` (the
    report written after the last case). `seconds=None`: no limit. `clock`: seconds, monotonic.
    """

    def __init__(self, seconds: float | None, reserve_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and seconds < 0:
            raise ValueError(f"budget seconds={seconds}: expected >= 0 or None")
        self.seconds, self.reserve_s, self.clock = seconds, reserve_s, clock
        self.start = clock()
        self.longest = 0.0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (self.clock() - self.start)

    def allows(self, needs_s: float = 0.0) -> bool:
        """Whether the next case may start; needs_s: what it is known to take, where more than the longest."""
        return self.left() > max(self.longest, needs_s) + self.reserve_s

    def why_not(self) -> str:
        """The reason recorded for a case the budget skipped."""
        return (f"{BUDGET}: {max(0.0, self.left()):.0f} s of {self.seconds:.0f} s left, "
                f"the longest case took {self.longest:.0f} s")  # fmt: skip

    @contextlib.contextmanager
    def case(self):
        """Times the enclosed case; its time enters `longest` even when it raises."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.longest = max(self.longest, self.clock() - t0)


# ---- memory ---------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of a provider's setup and first call; see the module docstring."""

    def __init__(self, device: str):
        self.device = device
        self.rss0: int | None = None

    def start(self) -> None:
        """Call before the provider allocates anything for the op."""
        _release_freed()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        self.rss0 = _proc_status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            self.rss0 = None

    def stop(self, shared_bytes: int) -> int | None:
        """Peak bytes since start(). CPU: the RSS growth plus `shared_bytes`, the live tensors the op shares
        (weights, inputs), which CUDA's max_memory_allocated counts by itself. None where not measurable."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        hwm = _proc_status_kib("VmHWM")
        if self.rss0 is None or hwm is None:
            return None
        return max(0, hwm - self.rss0) * 1024 + shared_bytes

    def available_bytes(self) -> int:
        """Memory a case may use: the GPU's total memory, or the machine's MemAvailable."""
        if self.device == "cuda":
            return torch.cuda.mem_get_info()[1]
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- device facts, energy ----------------------------------------------------------------------------


@functools.cache
def _nvml_handle():
    """(pynvml module, handle of the current CUDA device), or None when NVML is unavailable.

    The device is found by UUID (robust to CUDA_VISIBLE_DEVICES), else by index."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library or no driver: report without NVML
        return None
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    handle = _query(pynvml.nvmlDeviceGetHandleByUUID, f"GPU-{uuid}") if uuid is not None else None
    handle = handle or _query(pynvml.nvmlDeviceGetHandleByIndex, index)
    return None if handle is None else (pynvml, handle)


def _query(fn, *args):
    try:
        return fn(*args)
    except Exception:  # NVML raises for fields a device does not support
        return None


CPU_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")  # the vector extensions a CPU result depends on


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def load_average() -> list[float] | None:
    """The host's 1, 5 and 15-minute load averages (runnable processes), None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def device_facts(device: str) -> dict:
    """Facts about the device a run measures: NVML's view of the GPU, or the CPU's model, cores and ISA."""
    if device != "cuda":
        info = _cpuinfo()
        cpuid = [info.get(key) for key in ("cpu family", "model", "stepping")]
        return {
            "kind": "cpu",
            "name": info.get("model name") or platform.processor() or "cpu",
            "family_model_stepping": "/".join(cpuid) if all(cpuid) else None,
            "isa": [flag for flag in CPU_ISA if flag in info.get("flags", "").split()],
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": MemoryProbe("cpu").available_bytes(),
        }
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    facts = {
        "kind": "cuda",
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "nvml": False,
    }
    nv = _nvml_handle()
    if nv is None:
        return facts
    pynvml, h = nv
    facts.update(
        nvml=True,
        driver=_query(pynvml.nvmlSystemGetDriverVersion),
        sm_clock_mhz=_query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
        sm_clock_max_mhz=_query(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
        mem_clock_mhz=_query(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
        mem_clock_max_mhz=_query(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
        power_limit_w=(_query(pynvml.nvmlDeviceGetPowerManagementLimit, h) or 0) / 1e3 or None,
        temperature_c=_query(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
    )
    return facts


def energy_j_per_call(fn: Callable[[], object], device: str) -> float | None:
    """Joules per call from NVML's energy counter over a window of about ENERGY_WINDOW_S (CUDA only)."""
    nv = _nvml_handle() if device == "cuda" else None
    if nv is None:
        return None
    pynvml, h = nv
    torch.cuda.synchronize()
    e0 = _query(pynvml.nvmlDeviceGetTotalEnergyConsumption, h)  # mJ
    if e0 is None:
        return None
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < ENERGY_WINDOW_S:
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    e1 = _query(pynvml.nvmlDeviceGetTotalEnergyConsumption, h)
    return None if e1 is None else (e1 - e0) / 1e3 / calls


def versions() -> dict:
    import numpy
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
    }


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""

    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": None if status is None else bool(status)}


# ---- ceilings --------------------------------------------------------------------------------------------


def copy_ceiling(device: str) -> dict:
    """Device-to-device copy bandwidth: dst.copy_(src) of a large buffer, bytes read + written per second."""
    nbytes = COPY_BYTES[device]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    fn()
    sync(device)
    ms, q20, q80 = time_ms(fn, device)
    return {"bytes": nbytes, "ms": ms, "ms_q20": q20, "ms_q80": q80, "gbps": 2 * nbytes / ms / 1e6}


def gemm_call(x: torch.Tensor, W: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The encoder's GEMM x [B, d] @ W^T [d, n] -> [B, n], without autograd: the one product an SAE cannot
    avoid (cuBLAS on CUDA, the BLAS of torch on the CPU)."""

    def gemm():
        with torch.no_grad():
            return x @ W.T

    return gemm


def gemm_ceiling(x: torch.Tensor, W: torch.Tensor, device: str) -> dict:
    """The time of gemm_call(x, W) alone (x: [B, d], W: [n, d]), and its FLOP rate."""
    fn = gemm_call(x, W)
    fn()
    sync(device)
    ms, q20, q80 = time_ms(fn, device)
    flops = 2 * x.shape[0] * x.shape[1] * W.shape[0]
    return {"ms": ms, "ms_q20": q20, "ms_q80": q80, "tflops": flops / ms / 1e9}
