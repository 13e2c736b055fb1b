"""Interleaved rotary position embedding (DeepSeek/Kimi layout), applied in place of a copy.

    x [B, T, H, r]    cos, sin [T, r/2] fp32    ->    [B, T, H, r] in x's dtype
    (x[2i], x[2i+1]) ↦ (x[2i]·cos_i − x[2i+1]·sin_i,  x[2i+1]·cos_i + x[2i]·sin_i)

The rope dims are stored as pairs (x0, y0, x1, y1, ...), not as two halves: getting this wrong gives
a model that talks fluently and is quietly broken (sources §6). The angles come from
``kimi_ref.rope.cos_sin`` (float64 angles, fp32 cos/sin, YaRN already folded in); this kernel only turns
the pairs, in fp32. One program handles one (b, t) row: all H heads share the token's angles.
In Kimi r = 64 and it is used for q_rope (per head) and the single shared k_rope (H = 1).

The float64 twin is ``kimi_ref/oracle/rope.py::apply_rope``; the torch path ``kimi_ref/rope.py``.
"""

from __future__ import annotations

import torch

from kimi_ref.kernels._runtime import jit, next_pow2, round_to, tl, use_triton
from kimi_ref.rope import apply_rope as apply_rope_reference

__all__ = ["apply_rope", "apply_rope_torch", "apply_rope_triton"]


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, HALF,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # = b·T + t
    t = row % T
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < HALF
    cos = tl.load(cos_ptr + t * HALF + offs_p, mask=pmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * HALF + offs_p, mask=pmask, other=0.0).to(tl.float32)
    mask = (offs_h[:, None] < H) & pmask[None, :]
    base = x_ptr + row * H * 2 * HALF + offs_h[:, None] * 2 * HALF + 2 * offs_p[None, :]
    a = tl.load(base, mask=mask, other=0.0).to(tl.float32)  # x[2i]
    b = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)  # x[2i+1]
    out = y_ptr + row * H * 2 * HALF + offs_h[:, None] * 2 * HALF + 2 * offs_p[None, :]
    tl.store(out, round_to(a * cos[None, :] - b * sin[None, :], y_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 1, round_to(b * cos[None, :] + a * sin[None, :], y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [B, T, H, r] with r even, found shape {tuple(x.shape)}")
    want = (x.shape[1], x.shape[-1] // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(f"apply_rope: cos/sin must be [T, r/2] = {list(want)} for x {tuple(x.shape)}, "
                         f"found {tuple(cos.shape)}/{tuple(sin.shape)}")


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The fallback: ``kimi_ref.rope.apply_rope`` itself, every head turned by its position's angle."""
    _check(x, cos, sin)
    return apply_rope_reference(x, cos[None, :, None, :], sin[None, :, None, :])


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: one program per (b, t)."""
    _check(x, cos, sin)
    b, t, h, r = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _rope_kernel[(b * t,)](x, cos.contiguous(), sin.contiguous(), y, t, h, r // 2,
                               BLOCK_H=next_pow2(h), BLOCK_P=next_pow2(r // 2))
    return y


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x [B, T, H, r] by the angles cos/sin [T, r/2]."""
    if use_triton(x, cos, sin):
        return apply_rope_triton(x, cos, sin)
    return apply_rope_torch(x, cos, sin)
