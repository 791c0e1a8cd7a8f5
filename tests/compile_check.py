"""Static profile of every Triton kernel, compiled for sm_90 (H100) by the GPU machine's triton 3.6 on a machine
without a GPU: `make compile-check` (DESIGN section 7, "without a GPU, the compiled code is the evidence").

The variants are captured from the real launchers at the reference shape (B = 8192, d = 4096, n = 131072,
k = 64 and the other k, every dtype and mode): each launcher runs on meta tensors with the GPU configs,
and its kernel launch is recorded instead of run, so the signature, the constexprs, the grid and the
options are the ones a GPU run gets (pointers and integers divisible by 16 specialised as the JIT does).

Per variant: ptxas registers and spills, shared memory, resident programs per SM, the MMA kind (wgmma =
HGMMA, mma = HMMA, else FMA), and per loop of the SASS (a backward branch; named by the source loop most of
its instructions come from, through nvdisasm's line info) the instructions, block barriers (BAR), memory
fences (MEMBAR; the async-proxy fence FENCE.VIEW.ASYNC is counted apart), atomics and local-memory accesses
directly inside it. Writes bench/results/static/profile.json and profile.md; exits non-zero on a compile
failure, a spill in an encoder, a 16-bit encoder off wgmma, or a MEMBAR inside a loop.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import gemm, torch_ops, tuning

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "results" / "static"
TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.backends.nvidia.__file__).parent / "bin"
REF = {"B": 8192, "d": 4096, "n": 131072, "k": 64}
SMS = 132  # H100 SXM
ENCODERS = ("_topk_encode_kernel", "_threshold_encode_kernel")
DTYPES = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
              torch.int64: "i64", torch.bool: "i1"}  # fmt: skip

# The package re-exports functions under the op modules' names: load the modules themselves.
topk_encode, threshold, sparse_decode, scatter, prefix = (
    importlib.import_module(f"kernels.{name}")
    for name in ("topk_encode", "threshold", "sparse_decode", "scatter", "prefix")
)


# Capture ----------------------------------------------------------------------------------------------


class _Launched(Exception):
    pass


@contextlib.contextmanager
def gpu_launches(record: list):
    """Launchers pick GPU configs for meta tensors (SMS programs per wave); a launch is recorded, not run."""

    def run(self, *args, grid, warmup, **kwargs):
        record.append((self, args, kwargs, grid))
        raise _Launched

    saved = JITFunction.run, tuning._device_key, gemm.num_sms
    JITFunction.run, tuning._device_key, gemm.num_sms = run, lambda op: "default", lambda device: SMS
    try:
        yield
    finally:
        JITFunction.run, tuning._device_key, gemm.num_sms = saved


def launches():
    """(label, thunk) per variant: the thunk calls a real launcher on meta tensors at the reference shape."""
    B, d, n, k = REF["B"], REF["d"], REF["n"], REF["k"]
    m = lambda *shape, dt: torch.empty(*shape, device="meta", dtype=dt)
    i32 = torch.int32
    for (name, dt), kk in [((nm, dt), kk) for nm, dt in DTYPES.items() for kk in (32, 64, 128, 256)]:
        if name == "fp32-ieee" and kk != k:
            continue
        x, W, b = m(B, d, dt=dt), m(n, d, dt=dt), m(n, dt=dt)
        yield (
            f"topk_encode {name} k={kk}",
            name,
            lambda x=x, W=W, b=b, kk=kk: topk_encode.topk_select_triton(x, W, b, kk),
        )
    x, W = m(B, d, dt=torch.bfloat16), m(n, d, dt=torch.bfloat16)
    yield "topk_encode bf16 k=64 no-bias", "bf16", lambda: topk_encode.topk_select_triton(x, W, None, k)
    modes = [("relu", torch_ops.RELU, True), ("jumprelu", torch_ops.JUMPRELU, True), ("gated", torch_ops.GATED, True),
             ("relu no-bias", torch_ops.RELU, False)]  # fmt: skip
    for name, dt in DTYPES.items():
        for act, mode, bias in modes:
            x, W, v = m(B, d, dt=dt), m(n, d, dt=dt), m(n, dt=dt)
            args = (x, W, v if bias else None, v, v, v, 0.001, 4 * k)
            yield (
                f"threshold_encode {name} {act}",
                name,
                lambda mode=mode, a=args: threshold.threshold_select_triton(mode, *a),
            )
    for name, dt in list(DTYPES.items())[1:]:
        vals, idx, W, X = m(B, k, dt=dt), m(B, k, dt=i32), m(n, d, dt=dt), m(B, d, dt=dt)
        bias, grad = m(d, dt=dt), m(B, k + 1, dt=torch.float32)
        yield f"gather_matmul {name}", name, lambda a=(vals, idx, W, bias): sparse_decode.gather_matmul_triton(*a)
        yield f"gather_dot {name}", name, lambda a=(X, idx, W): sparse_decode.gather_dot_triton(*a)
        yield f"scatter_rows {name}", name, lambda a=(vals, idx, X, n, True, dt): scatter.scatter_rows_triton(*a)
        yield f"prefix_norms {name}", name, lambda a=(vals, idx, W, X): prefix.prefix_norms_triton(*a)
        yield (
            f"prefix_norms_backward {name}",
            name,
            lambda a=(vals, idx, W, X, grad, True): prefix.prefix_norms_backward_triton(*a),
        )
    # prefix losses at a BatchTopK capacity (K = 4 k), and the prefix dW's scatter of one CUDA row chunk's S rows
    # (1024 rows x k slots, fp32) added into an fp32 dW in place
    vals, idx, W, X = (
        m(B, 4 * k, dt=torch.bfloat16),
        m(B, 4 * k, dt=i32),
        m(n, d, dt=torch.bfloat16),
        m(B, d, dt=torch.bfloat16),
    )
    grad = m(B, 4 * k + 1, dt=torch.float32)
    yield f"prefix_norms bf16 K={4 * k}", "bf16", lambda: prefix.prefix_norms_triton(vals, idx, W, X)
    yield (
        f"prefix_norms_backward bf16 K={4 * k}",
        "bf16",
        lambda: prefix.prefix_norms_backward_triton(vals, idx, W, X, grad, True),
    )
    f32, P = torch.float32, 1024 * k
    yield (
        "scatter_rows fp32 into",
        "fp32-tf32",
        lambda: scatter.scatter_rows_triton(
            m(P, 1, dt=f32), m(P, 1, dt=i32), m(P, d, dt=f32), n, False, f32, into=m(n, d, dt=f32)
        ),
    )


def capture(label: str, precision: str, thunk) -> dict:
    """One launcher's kernel launch as a compile job: signature, constexprs, attrs, options, grid."""
    record = []
    torch.backends.cuda.matmul.fp32_precision = "ieee" if precision == "fp32-ieee" else "tf32"
    with gpu_launches(record):
        try:
            thunk()
        except _Launched:
            pass
    if len(record) != 1:
        raise RuntimeError(f"{label}: expected one kernel launch, got {len(record)}")
    fn, args, kwargs, grid = record[0]
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            constexprs[p.name] = v
            continue
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TYPE_NAMES[v.dtype]
            attrs[(len(signature) - 1,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(v, TensorDescriptor):  # host-side TMA descriptor (a kernel parameter)
            signature[p.name] = f"tensordesc<{TYPE_NAMES[v.base.dtype]}{list(v.block_shape)}>"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(len(signature) - 1,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{label}: argument {p.name} of type {type(v).__name__}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return {"label": label, "kernel": fn.__name__, "module": fn.fn.__module__, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": options, "grid": grid}  # fmt: skip


# Compile and read --------------------------------------------------------------------------------------


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread from the bundled ptxas in verbose mode."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = _tool("ptxas", "-arch=sm_90a", "-v", f.name, "-o", os.devnull)
    regs = re.findall(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    return int(regs[-1]), int(spills[-1]) if spills else 0


def source_loops(module: str) -> list[tuple[str, int, int]]:
    """(file, first line, last line) of every for / while loop in a kernel's module and in kernels/gemm.py."""
    loops = []
    for path in {inspect.getsourcefile(importlib.import_module(module)), inspect.getsourcefile(gemm)}:
        path = str(Path(path).resolve())
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.For, ast.While)):
                loops.append((path, node.lineno, node.end_lineno))
    return loops


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
COUNTED = {"BAR": ("BAR",), "MEMBAR": ("MEMBAR",), "FENCE": ("FENCE",), "ATOM": ("ATOM", "RED"),
           "HGMMA": ("HGMMA",), "HMMA": ("HMMA",), "LOCAL": ("LDL", "STL")}  # fmt: skip


def read_sass(sass: str, loops_src: list) -> dict:
    """Instructions (addr, opcode, file, line), the loops (backward branches) and the per-loop counts.
    An instruction from a library (triton.language's reductions, scans, sorts) counts at the last line of
    the project's own files before it: the call site it was inlined at."""
    own_files = {Path(lp[0]).name for lp in loops_src}  # by name: a cached cubin may name another checkout
    instrs, labels, where = [], {}, (None, 0)
    for line in sass.splitlines():
        if m := re.match(r'\s*//## File "(.*)", line (\d+)', line):
            if Path(m.group(1)).name in own_files:
                where = (Path(m.group(1)).name, int(m.group(2)))
        elif m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = None  # address of the next instruction
        elif m := INSTR.search(line):
            addr = int(m.group(1), 16)
            for name, value in labels.items():
                if value is None:
                    labels[name] = addr
            instrs.append((addr, m.group(3), m.group(4), *where))
    spans = {}
    for addr, op, rest, *_ in instrs:
        if op.startswith("BRA") and (t := re.search(r"\(?(\.L_x_\d+)\)?", rest)) and labels.get(t.group(1)) is not None:
            start = labels[t.group(1)]
            if start <= addr:
                spans[start] = max(spans.get(start, 0), addr)
    spans = sorted(spans.items())

    def innermost(addr):
        inside = [(s, e) for s, e in spans if s <= addr <= e]
        return min(inside, key=lambda se: se[1] - se[0]) if inside else None

    def src_loop(file, line):
        inside = [lp for lp in loops_src if Path(lp[0]).name == file and lp[1] <= line <= lp[2]]
        return min(inside, key=lambda lp: lp[2] - lp[1]) if inside else None

    def count(ops):
        c = {"instructions": len(ops)}
        for key, prefixes in COUNTED.items():
            c[key] = sum(op.startswith(prefixes) and not (key == "BAR" and op.startswith("BAR.ARV")) for op in ops)
        c["FFMA"] = sum(op == "FFMA" for op in ops)
        return c

    direct = collections.defaultdict(list)
    for ins in instrs:
        direct[innermost(ins[0])].append(ins)
    loops = []
    for s, e in spans:
        if s == e:
            continue  # the trap after EXIT (a branch to itself)
        own = direct[(s, e)]
        names = collections.Counter(src_loop(f, ln) for *_, f, ln in own if f)
        names.pop(None, None)
        src = names.most_common(1)[0][0] if names else None
        depth = sum(1 for s2, e2 in spans if s2 <= s and e <= e2) - 1
        lines = collections.Counter(f"{Path(f).name}:{ln}" for *_, f, ln in own if f)
        loops.append({"source": f"{Path(src[0]).name}:{src[1]}" if src else "?", "depth": depth,
                      "sass": [hex(s), hex(e)], **count([op for _, op, *_ in own]), "lines": dict(lines)})  # fmt: skip
    return {"total": count([op for _, op, *_ in instrs]), "outside_loops": count([op for _, op, *_ in direct[None]]),
            "loops": loops}  # fmt: skip


def resident(regs: int, smem: int, warps: int) -> int:
    """Programs resident per SM on sm_90: warps (64), registers (64K, 256 per warp granule), shared memory
    (228 KiB, 1 KiB reserved per program), 32 programs."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = (233472 // (smem + 1024)) if smem else 32
    return min(64 // warps, by_regs, by_smem, 32)


def profile(job: dict) -> dict:
    t0 = time.perf_counter()
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
    compiled = triton.compile(src, target=TARGET, options=job["options"])
    regs, spill = ptxas_usage(compiled.asm["ptx"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = read_sass(_tool("nvdisasm", "-g", "-c", f.name), source_loops(job["module"]))
    total = sass["total"]
    mma = "wgmma" if total["HGMMA"] else "mma" if total["HMMA"] else "fma"
    warps, smem = compiled.metadata.num_warps, compiled.metadata.shared
    per_sm = resident(regs, smem, warps)
    programs = math.prod(job["grid"])
    return {"label": job["label"], "kernel": job["kernel"], "grid": list(job["grid"]), "programs": programs,
            "num_warps": warps, "num_stages": compiled.metadata.num_stages, "registers": regs, "spill_bytes": spill,
            "shared_bytes": smem, "resident_per_sm": per_sm, "waves": round(programs / (per_sm * SMS), 2),
            "mma": mma, "constexprs": {k: v for k, v in job["constexprs"].items() if k.isupper()},
            "compile_s": round(time.perf_counter() - t0, 1), **sass}  # fmt: skip


def problems(p: dict) -> list[str]:
    found = []
    encoder = p["kernel"] in ENCODERS
    if encoder and p["spill_bytes"]:
        found.append(f"encoder spills {p['spill_bytes']} B")
    if encoder and not p["label"].split()[1].startswith("fp32") and p["mma"] != "wgmma":
        found.append(f"16-bit encoder on {p['mma']}, not wgmma")
    for loop in p["loops"]:
        if loop["MEMBAR"]:
            found.append(f"MEMBAR in the loop at {loop['source']}")
    return found


def markdown(rows: list[dict]) -> str:
    head = (
        "# Static profile (sm_90, triton 3.6; reference shape B=8192 d=4096 n=131072 k=64)\n\n"
        "Written by `make compile-check` (tests/compile_check.py). Loops: the SASS loops (backward branches),"
        " named by their source loop; counts are the instructions directly inside each loop (nested loops"
        " apart).\n\n"
        "| variant | regs | spill B | smem KiB | per SM | grid | waves | MMA | loops: source instr/BAR/MEMBAR/ATOM |"
        " problems |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for p in rows:
        if "error" in p:
            lines.append(f"| {p['label']} | | | | | | | | | FAIL: {p['error'][:200]} |")
            continue
        loops = "; ".join(
            f"{lp['source']}{'*' * lp['depth']}: {lp['instructions']}/{lp['BAR']}/{lp['MEMBAR']}/{lp['ATOM']}"
            for lp in p["loops"]
        )
        lines.append(
            f"| {p['label']} | {p['registers']} | {p['spill_bytes']} | {p['shared_bytes'] / 1024:.0f} |"
            f" {p['resident_per_sm']} | {'x'.join(map(str, p['grid'][:2]))} | {p['waves']} | {p['mma']} | {loops} |"
            f" {', '.join(problems(p))} |"
        )
    return head + "\n".join(lines) + "\n"


def _safe_profile(job):
    try:
        return profile(job)
    except Exception as e:  # report every failing kernel, not only the first
        return {"label": job["label"], "kernel": job["kernel"], "error": f"{type(e).__name__}: {e}"[:2000]}


def main() -> int:
    args = sys.argv[1:]
    out = Path(args.pop(args.index("--out") + 1)) if "--out" in args else None
    args = [a for a in args if a != "--out"]
    only = args[0] if args else ""  # a substring of the variant labels: profile those only
    print(f"triton {triton.__version__}, target {TARGET}", flush=True)
    jobs = [capture(label, prec, thunk) for label, prec, thunk in launches() if only in label]
    with ProcessPoolExecutor(max_workers=int(os.environ.get("COMPILE_JOBS", "2"))) as pool:
        rows = list(pool.map(_safe_profile, jobs))
    failed = 0
    for p in rows:
        bad = [p["error"]] if "error" in p else problems(p)
        failed += bool(bad)
        if "error" in p:
            print(f"{p['label']:40s} FAIL {p['error'][:400]}")
        else:
            usage = f"regs {p['registers']:3d} spill {p['spill_bytes']:4d} B smem {p['shared_bytes']:6d} B"
            print(f"{p['label']:40s} {usage} {p['resident_per_sm']}/SM {p['mma']:5s} {'; '.join(bad)}", flush=True)
    if out or not only:
        out = out or OUT_DIR / "profile.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "target": "sm_90", "reference_shape": REF, "sms": SMS}
        out.write_text(json.dumps({"meta": meta, "variants": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows))
    print(f"compile-check: {len(rows) - failed} clean, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
