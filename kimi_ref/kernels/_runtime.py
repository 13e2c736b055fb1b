"""Where the kernels run: Triton on a CUDA device, Triton's interpreter on the CPU, or the torch fallback.

Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted, from the
environment variable ``TRITON_INTERPRET``; so set ``TRITON_INTERPRET=1`` *before* importing
``kimi_ref.kernels`` to run the kernels on the CPU (slowly, for tests and chapters).

On a GPU, ``tl.dot`` on fp32 inputs silently uses tf32 unless told otherwise, and the interpreter
computes bf16 arithmetic wrongly without an error. Hence the rule in every kernel here: load, convert
to fp32 at once, compute in fp32, and pass the dot's precision explicitly (:func:`dot_mode`).
"""

from __future__ import annotations

import os

import torch

try:  # triton is an optional extra: without it every kernel falls back to torch
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "triton", "tl", "jit", "interpreting", "available", "use_triton", "next_pow2", "dot_mode",
           "launch_config", "DOT_IEEE", "DOT_TF32", "DOT_BF16"]

# How a kernel feeds tl.dot (a constexpr argument of every kernel that multiplies tiles):
DOT_IEEE = 0  # fp32 × fp32, exact fp32 products: the interpreter and the tests
DOT_TF32 = 1  # fp32 inputs on tensor cores (10 mantissa bits): GPU, fp32 activations
DOT_BF16 = 2  # inputs rounded to bf16, fp32 accumulation: GPU, bf16 activations (true W4A16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Triton importable and somewhere to run it: a CUDA device, or the interpreter."""
    return HAVE_TRITON and (interpreting() or torch.cuda.is_available())


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors goes to the Triton kernel (else the torch fallback).

    CUDA tensors run compiled kernels; CPU tensors run only in the interpreter.
    """
    if not available():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    return (on_cuda and not interpreting()) or (on_cpu and interpreting())


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (Triton block sizes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def launch_config(config: dict | None, what: str, **chosen: int) -> dict[str, int]:
    """The wrapper's ``chosen`` launch (block sizes by their kernel names, ``num_warps``) with a caller's
    overrides from ``config`` (those keys or ``num_stages``): for tuning sweeps and tests of GPU tile shapes.
    An unknown key is an error, never ignored."""
    keys = (*chosen, "num_stages")
    launch = dict(chosen)
    for key, value in (config or {}).items():
        if key not in keys:
            raise ValueError(f"{what}: unknown launch key {key!r}; expected some of {', '.join(keys)}")
        launch[key] = int(value)
    return launch


def dot_mode(dtype: torch.dtype) -> int:
    """The tl.dot input precision for activations of ``dtype``: exact fp32 in the interpreter."""
    if interpreting():
        return DOT_IEEE
    return DOT_BF16 if dtype in (torch.bfloat16, torch.float16) else DOT_TF32


def jit(fn):
    """``triton.jit`` when triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAVE_TRITON else fn


@jit
def dot_acc(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; the inputs' precision as :func:`dot_mode` chose."""
    if DOT_MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif DOT_MODE == 1:
        out = tl.dot(a, b, acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        out = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
    return out


@jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` → ``DTYPE`` rounded to nearest, ties to even, on the GPU *and* in the interpreter.

    The interpreter's fp32→bf16 cast truncates (a GPU rounds to nearest even), so for bf16 we round
    the bits ourselves: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits. The value is
    then exactly a bf16, and any cast of it is exact. NaN is kept as NaN (the bit trick could make it inf).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        out = tl.where(x != x, x, rounded).to(tl.bfloat16)
    else:
        out = x.to(DTYPE)
    return out
