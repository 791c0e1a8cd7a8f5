"""Compile every Triton kernel for sm_90 (H100) with the GPU machine's triton, on a machine without a GPU.

Run by `make compile-check` in a venv with triton 3.6: it catches kernels that run in the interpreter but
fail to compile (unsupported ops, layout or type errors) before a GPU session is spent finding out.
Every GPU ("default") config of kernels/configs is compiled for fp32, fp16 and bf16.
"""

import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import tuning

# The package re-exports functions under the op modules' names: load the modules themselves.
scatter, sparse_decode, topk_encode = (
    importlib.import_module(f"kernels.{name}") for name in ("scatter", "sparse_decode", "topk_encode")
)
threshold, prefix = (importlib.import_module(f"kernels.{name}") for name in ("threshold", "prefix"))

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def gpu_configs(op):
    return tuning._table(op)["default"]


def cases():
    """(label, kernel, signature, constexprs, options) for every kernel x dtype x config."""
    variants = [(kp, True, "tf32") for kp in (32, 64, 128, 256)] + [(64, False, "tf32"), (64, True, "ieee")]
    for (dt, ptr), (kp, bias, precision) in itertools.product(DTYPES.items(), variants):
        if precision == "ieee" and dt != "fp32":
            continue  # only fp32 inputs have an IEEE mode (torch.backends.cuda.matmul.allow_tf32 = False)
        cfg = next(c for c in gpu_configs("topk_encode") if tuning._fits(c.get("when", {}), {"KP": kp, "D": 4096}))
        sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "cand_ptr": "*i64"}
        sig |= dict.fromkeys(["B", "N", "D", "cols_per_split", "stride_x", "stride_w", "stride_cb", "stride_cs"], "i32")
        const = {"HAS_BIAS": bias, "KP": kp, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                 "BLOCK_K": cfg["BLOCK_K"], "UPCAST": False, "PRECISION": precision}  # fmt: skip
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        yield f"topk_encode {dt} KP={kp} bias={bias} {precision}", topk_encode._topk_encode_kernel, sig, const, opts
    for (dt, ptr), cfg in itertools.product(DTYPES.items(), gpu_configs("gather")):
        sig = {"val_ptr": ptr, "idx_ptr": "*i32", "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr}
        sig |= dict.fromkeys(["B", "K", "D", "stride_v", "stride_i", "stride_w", "stride_out"], "i32")
        const = {"HAS_BIAS": True, "ROWS": cfg["ROWS"], "BLOCK_K": cfg["BLOCK_K"], "BLOCK_D": cfg["BLOCK_D"]}
        opts = {"num_warps": cfg["num_warps"]}
        yield f"gather_matmul {dt} D<={cfg.get('when')}", sparse_decode._gather_matmul_kernel, sig, const, opts
        sig = {"g_ptr": ptr, "idx_ptr": "*i32", "w_ptr": ptr, "out_ptr": ptr}
        sig |= dict.fromkeys(["K", "D", "stride_g", "stride_i", "stride_w", "stride_out"], "i32")
        const = {"BLOCK_K": cfg["BLOCK_K"], "BLOCK_D": cfg["BLOCK_D"]}
        yield f"gather_dot {dt} D<={cfg.get('when')}", sparse_decode._gather_dot_kernel, sig, const, opts
    for (dt, ptr), cfg in itertools.product(DTYPES.items(), gpu_configs("scatter_rows")):
        sig = {"order_ptr": "*i64", "offsets_ptr": "*i64", "coef_ptr": ptr, "x_ptr": ptr, "out_ptr": ptr,
               "sum_ptr": ptr, "D": "i32", "K": "i32", "stride_x": "i32", "stride_out": "i32"}  # fmt: skip
        const = {"WITH_SUM": True, "BLOCK_E": cfg["BLOCK_E"], "BLOCK_D": cfg["BLOCK_D"]}
        yield f"scatter_rows {dt}", scatter._scatter_rows_kernel, sig, const, {"num_warps": cfg["num_warps"]}
    modes = [("relu", 0, True, "tf32"), ("jumprelu", 1, True, "tf32"), ("gated", 2, True, "tf32"),
             ("relu", 0, False, "tf32"), ("jumprelu", 1, True, "ieee")]  # fmt: skip
    for (dt, ptr), cfg, (act, m, bias, precision) in itertools.product(
        DTYPES.items(), gpu_configs("threshold_encode"), modes
    ):
        if precision == "ieee" and dt != "fp32":
            continue
        ptrs = ["x_ptr", "w_ptr", "b_ptr", "theta_ptr", "r_ptr", "b2_ptr", "val_ptr", "gate_ptr"]
        sig = dict.fromkeys(ptrs, ptr)
        sig |= {"aux_ptr": "*fp32", "idx_ptr": "*i32", "count_ptr": "*i32"}
        sig |= dict.fromkeys(["B", "N", "D", "C", "cols_per_split", "stride_x", "stride_w"], "i32")
        sig["half_band"] = "fp32"
        const = {"MODE": m, "HAS_BIAS": bias, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                 "BLOCK_K": cfg["BLOCK_K"], "UPCAST": False, "PRECISION": precision}  # fmt: skip
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        label = f"threshold_encode {dt} {act} bias={bias} {precision}"
        yield label, threshold._threshold_encode_kernel, sig, const, opts
    for dt, ptr in DTYPES.items():
        sig = {"val_ptr": ptr, "idx_ptr": "*i32", "w_ptr": ptr, "r0_ptr": ptr, "out_ptr": "*fp32"}
        strides = ["stride_v", "stride_i", "stride_w", "stride_r"]
        sig |= dict.fromkeys(["K", "D", *strides, "stride_ob", "stride_ot"], "i32")
        const, opts = {"BLOCK_D": prefix.BLOCK_D}, {"num_warps": 4}
        yield f"prefix_norms {dt}", prefix._prefix_fwd_kernel, sig, const, opts
        sig = {"val_ptr": ptr, "idx_ptr": "*i32", "w_ptr": ptr, "r0_ptr": ptr, "g_ptr": "*fp32", "dv_ptr": "*fp32",
               "dr0_ptr": ptr, "s_ptr": "*fp32"}  # fmt: skip
        sig |= dict.fromkeys(["K", "D", *strides, "stride_g", "stride_db", "stride_dt", "stride_dr"], "i32")
        yield f"prefix_norms_backward {dt}", prefix._prefix_bwd_kernel, sig, const | {"WRITE_S": True}, opts


def aligned(sig: dict) -> dict:
    """The specialisation the JIT gives a launch at the reference shape: pointers and integer arguments
    divisible by 16. Without it loads are not vectorised and the K loop is not pipelined (no cp.async)."""
    return {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(sig.values()) if ty.startswith("*") or ty == "i32"}


def ptxas_usage(ptx: str) -> str:
    """Registers and spills per thread, from the bundled ptxas in verbose mode."""
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", out.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    return f"regs {regs[-1] if regs else '?'} spill {spills[-1] if spills else '?'} B"


def main() -> int:
    print(f"triton {triton.__version__}, target {TARGET}")
    passed = failed = 0
    for label, fn, sig, const, opts in cases():
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=const, attrs=aligned(sig)), target=TARGET, options=opts
            )
            usage = ptxas_usage(compiled.asm["ptx"])
            pipelined = "cp.async" in compiled.asm["ptx"]
            status = f"ok   {time.perf_counter() - t0:5.1f}s  smem {compiled.metadata.shared} B  {usage}"
            status += "  pipelined" if pipelined else ""
            passed += 1
        except Exception as e:  # report every failing kernel, not only the first
            failed += 1
            status = f"FAIL {type(e).__name__}: {' | '.join(str(e).splitlines()[:8])[:600]}"
        print(f"{label:50s} {status}", flush=True)
    print(f"compile-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
