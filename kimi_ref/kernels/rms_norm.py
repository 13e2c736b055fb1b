"""RMSNorm, optionally fused with the residual add that precedes it.

    x, residual [..., d]   weight [d]
    h = x + residual                       (in x's dtype: this is the residual stream going forward)
    y = weight · cast_x( h / sqrt(mean(h²) + eps) )      statistics in fp32, result in x's dtype

In a decoder layer the pattern ``h = h + attn(...); y = post_attention_layernorm(h)`` reads and writes
the residual stream twice; fused, each row is read once and both ``h`` and ``y`` are written in the same
pass. One program normalizes one row (d = 7168 for Kimi fits in one block).

The order of operations is the torch module's (``kimi_ref/norms.py``): normalize in fp32, cast back
to x's dtype, *then* multiply by the weight. The float64 twin is ``kimi_ref/oracle/norms.py``.
"""

from __future__ import annotations

import torch

from kimi_ref.kernels._runtime import jit, next_pow2, round_to, tl, use_triton
from kimi_ref.norms import rms_norm as rms_norm_reference

__all__ = ["rms_norm", "rms_norm_torch", "rms_norm_triton"]

_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        # round the sum to x's dtype, as ``x + residual`` does in torch; the norm sees the rounded h
        h_x = round_to(h + r, x.dtype)
        tl.store(h_ptr + row * D + offs, h_x, mask=mask)
        h = h_x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / D
    normed = round_to(h / tl.sqrt(mean_sq + eps), x.dtype).to(tl.float32)  # cast back before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, round_to(w * normed, y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) for x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"rms_norm: x must be fp32, bf16 or fp16, found {x.dtype}")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The fallback: ``kimi_ref.norms.rms_norm`` itself (after the residual add when given), in x's dtype."""
    _check(x, weight, residual)
    h = x if residual is None else x + residual.to(x.dtype)
    y = rms_norm_reference(h, weight, eps).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The Triton kernel: one program per row of x viewed as [rows, d]."""
    _check(x, weight, residual)
    d = x.shape[-1]
    x2 = x.contiguous().view(-1, d)
    y = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.to(x.dtype).contiguous().view(-1, d)
        h = torch.empty_like(x2)
    else:
        r2, h = x2, y  # unused: HAS_RESIDUAL is off
    if x2.shape[0]:
        block_d = next_pow2(d)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight.contiguous(), y, h, d, float(eps),
                                         HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
                                         num_warps=min(16, max(4, block_d // 512)))  # ~16 values a thread
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``y`` = RMSNorm(x)·w in x's dtype; with ``residual``, ``(y, h)`` where h = x + residual, y = RMSNorm(h)·w."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if use_triton(*tensors):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)
