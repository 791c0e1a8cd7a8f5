"""The largest dictionary that trains: at d = 4096 on the CUDA device at hand, the largest n = 2^e (e >= 14)
for which one TopK SAE training step (forward, MSE loss, backward, Adam) runs without running out of memory,
for ours and for dense PyTorch. Each search goes up from 2^14 and stops at its first out-of-memory error;
memory is freed between tries. The step cases check both providers' outputs; this case measures memory only.

Cost on an H100 (bf16, B = 8192, k = 64), which is why it is in the GPU quick suite: a try allocates
2 n d weights (randn) and runs one step with the fused Adam (as the trainer does). Ours at n = 2^20: the
two weight matrices, their gradients and Adam's two moments of each take 8 x 8 GiB = 64 GiB, and the step
costs ~2 encoder GEMMs of 2 B n d = 7e13 FLOP, ~0.2 s at ~700 TFLOP/s; the tries 2^14 .. 2^20 together do
less than twice that, and 2^21 (128 GiB) fails at allocation. Dense keeps ~6 [B, n] temporaries (8 GiB
each at 2^19) and 6 GEMMs per step: it stops by 2^19 or 2^20 after < 2 s of GEMMs. With allocation,
Adam's first step and the caching allocator's frees, well under a minute in all.
"""

from __future__ import annotations

import torch

from .inputs import Params
from .providers_topk import Dense, Ours

NAME = "largest_n"
D, B, K = 4096, 8192, 64
FIRST_EXP = 14
CPU_SKIP = "the CPU machine has 24 GiB and the search would take too long"


def _trains(cls, n: int, dtype: torch.dtype) -> bool:
    """One training step of `cls` at n latents on CUDA; False on out-of-memory (its tensors die with the frame)."""
    try:
        p = Params.random(D, n, K, dtype, "cuda", seed=0)
        x = torch.randn(B, D, device="cuda", dtype=dtype)
        P = cls(p)
        opt = torch.optim.Adam(P.params(), lr=1e-4, fused=True)  # foreach Adam would copy its moments
        P.loss(x).backward()
        opt.step()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def search(run, free) -> dict:
    """{"d", "B", "k", "dtype", "providers": {name: {"largest_n", "first_oom_n", "peak_mem_bytes"}}}.

    free(device): releases what the last try left (gc, torch.cuda.empty_cache)."""
    dtype = run.shapes[0].torch_dtype if run.shapes else torch.bfloat16
    out = {"d": D, "B": B, "k": K, "dtype": str(dtype).removeprefix("torch."), "providers": {}}
    for cls in (Ours, Dense):
        best = peak = None
        n = 2**FIRST_EXP
        while True:
            free(run.device)
            torch.cuda.reset_peak_memory_stats()
            if not _trains(cls, n, dtype):
                break
            best, peak = n, torch.cuda.max_memory_allocated()
            n *= 2
        free(run.device)
        out["providers"][cls.name] = {"largest_n": best, "first_oom_n": n, "peak_mem_bytes": peak}
        shown = "none" if best is None else f"2^{best.bit_length() - 1} = {best}"
        run.note(f"{NAME} d={D} B={B} k={K} {out['dtype']}: {cls.name} trains up to n = {shown} (OOM at {n})")
    return out
