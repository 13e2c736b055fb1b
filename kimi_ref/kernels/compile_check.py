"""Compile every kernel for an NVIDIA GPU target on a machine without one.

    python -m kimi_ref.kernels.compile_check [--arch 90]      # exit 1 if any kernel fails to compile

The interpreter (our CPU tests) runs the kernels' Python, not Triton's compiler: a kernel can pass
every interpreted test and still fail to compile (an unsupported op, a constexpr mix-up, a dot
shape below 16). Triton ships its compiler and ``ptxas``, so we compile each kernel with the block
sizes the wrappers pick on a GPU, down to a cubin, and report registers and spills (``ptxas -v``).
Run it with ``TRITON_INTERPRET`` unset: the interpreter replaces the compiler when it is set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

__all__ = ["CONFIGS", "compile_kernel", "main"]

# (label, module, kernel, pointer dtypes by argument name, constexprs, num_warps): the GPU launches.
_W4 = {"x_ptr": "*bf16", "scale_ptr": "*bf16"}
_MLA = {"ql_ptr": "*fp32", "qr_ptr": "*fp32", "lat_ptr": "*bf16", "kr_ptr": "*bf16"}
_MOE = {"x_ptr": "*bf16", "gs_ptr": "*bf16", "us_ptr": "*bf16", "ds_ptr": "*bf16", "w_ptr": "*fp32"}
CONFIGS = [
    ("w4a16 M=1 (FMA, BN=8, BK=512)", "w4a16", "_w4a16_kernel", _W4,
     dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, GROUP=32, USE_DOT=False, DOT_MODE=0), 4),
    ("w4a16 M=16 (bf16 dot)", "w4a16", "_w4a16_kernel", _W4,
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP=32, USE_DOT=True, DOT_MODE=2), 4),
    ("w4a16 M=64 (bf16 dot)", "w4a16", "_w4a16_kernel", _W4,
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP=32, USE_DOT=True, DOT_MODE=2), 8),
    ("w4a16 M=64 (fp32 x, tf32 dot)", "w4a16", "_w4a16_kernel", {**_W4, "x_ptr": "*fp32"},
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP=32, USE_DOT=True, DOT_MODE=1), 8),
    ("rms_norm bf16 + residual, d=7168", "rms_norm", "_rms_norm_kernel",
     {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "h_ptr": "*bf16"},
     dict(HAS_RESIDUAL=True, BLOCK_D=8192), 16),
    ("rope bf16, 64 heads × 64", "rope", "_rope_kernel", {"x_ptr": "*bf16", "y_ptr": "*bf16"},
     dict(BLOCK_H=64, BLOCK_P=32), 4),
    ("mla_decode bf16 cache, c=512 r=64", "mla_decode", "_mla_decode_kernel", _MLA,
     dict(BLOCK_H=32, BLOCK_S=32, BLOCK_C=512, BLOCK_R=64, DOT_MODE=2), 4),
    ("mla_decode fp32 cache (tf32)", "mla_decode", "_mla_decode_kernel", {**_MLA, "lat_ptr": "*fp32", "kr_ptr": "*fp32"},
     dict(BLOCK_H=32, BLOCK_S=16, BLOCK_C=512, BLOCK_R=64, DOT_MODE=1), 8),
    ("fused_moe gate/up, 16 rows (decode: BN=32, BK=128)", "fused_moe", "_gate_up_kernel", _MOE,
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP=32, DOT_MODE=2, USE_DOT=True), 4),
    ("fused_moe gate/up, 16 rows", "fused_moe", "_gate_up_kernel", _MOE,
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP=32, DOT_MODE=2, USE_DOT=True), 4),
    ("fused_moe gate/up, 1 row (FMA, BN=16, BK=512)", "fused_moe", "_gate_up_kernel", _MOE,
     dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512, GROUP=32, DOT_MODE=0, USE_DOT=False), 4),
    ("fused_moe down, 1 row (FMA, BN=32, BK=256)", "fused_moe", "_down_kernel", _MOE,
     dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, GROUP=32, DOT_MODE=0, USE_DOT=False), 4),
    ("fused_moe down, 16 rows (BN=128)", "fused_moe", "_down_kernel", _MOE,
     dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP=32, DOT_MODE=2, USE_DOT=True), 4),
    ("fused_moe gate/up, 64 rows", "fused_moe", "_gate_up_kernel", _MOE,
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP=32, DOT_MODE=2, USE_DOT=True), 8),
]

_INT_PTRS = ("packed_ptr", "order_ptr", "blk_expert_ptr", "blk_start_ptr", "blk_end_ptr", "gp_ptr", "up_ptr", "dp_ptr")
_FLOAT_SCALARS = ("eps", "scale")


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument's Triton type: pointers as given (int32 / fp32 by name otherwise), ints i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*i32" if name in _INT_PTRS else "*fp32")
        else:
            sig[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return sig


def compile_kernel(module: str, kernel: str, pointers: dict[str, str], constexprs: dict, num_warps: int, arch: int):
    """Compile one kernel to a cubin for ``sm_<arch>``; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"kimi_ref.kernels.{module}"), kernel)
    src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spills from ``ptxas -v`` (informational; empty if no suitable ptxas)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):  # the newest PTX needs the newest assembler
        path = os.path.join(bin_dir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ptx_file = os.path.join(tmp, "k.ptx")
            with open(ptx_file, "w") as f:
                f.write(ptx)
            done = subprocess.run([path, f"-arch=sm_{arch}a", "-v", ptx_file, "-o", os.devnull],
                                  capture_output=True, text=True)
        if done.returncode == 0:
            lines = [line.split(":", 1)[-1].strip() for line in done.stderr.splitlines() if "registers" in line or "spill" in line]
            return "; ".join(lines)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    failed = 0
    for label, module, kernel, pointers, constexprs, warps in CONFIGS:
        try:
            compiled = compile_kernel(module, kernel, pointers, constexprs, warps, args.arch)
            print(f"ok    {label}: {_ptxas_usage(compiled.asm['ptx'], args.arch)}")
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL  {label}: {type(err).__name__}: {str(err)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
