"""INT4 pack-quantized weights, the float64 numpy twin of ``kimi_ref/int4.py`` (no torch).

    weight_packed int32 [out, in/8], weight_scale bf16 [out, in/32], weight_shape (out, in)

    W[o, i]    = q[o, i] · scale[o, i // 32],           q ∈ {-8, …, 7}
    word[o, j] = Σ_k (q[o, 8j + k] + 8) << 4k            k = 0..7 (excess-8; column 8j+k in nibble k)
    scale      = bf16(max |W_group| / 7.5),   q = clamp(round_half_even(W / scale), -8, 7)

numpy has no bfloat16, so a bf16 value is held as the float32 (or float64) number it stands for, and
:func:`to_bfloat16` rounds a float32 to the nearest bf16 (ties to even), bit by bit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "unpack", "quantize", "quantize_groups", "dequantize", "to_bfloat16", "bfloat16_bits_to_float"]

PACK_FACTOR = 8
Q_MIN, Q_MAX, OFFSET = -8, 7, 8
BF16_EPS = 2.0 ** -7  # torch.finfo(torch.bfloat16).eps


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even), returned as float32.

    A bf16 is the top 16 bits of a float32. Float64 input goes through float32 first, as torch does.
    """
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lower = bits & 0xFFFF
    keep = bits >> 16
    # Round half to even on the 16 dropped bits.
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((keep & 1) == 1))
    keep = keep + round_up
    out = (keep << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(np.asarray(x, dtype=np.float32)), np.float32(np.nan), out)


def bfloat16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """Raw bf16 bit patterns (uint16) → their float32 values."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack(q: np.ndarray) -> np.ndarray:
    """int8 [out, in] in [-8, 7] → int32 [out, in/8]."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack: q must be [out, in] with in divisible by {PACK_FACTOR}, found shape {q.shape}")
    if q.size and (q.min() < Q_MIN or q.max() > Q_MAX):
        raise ValueError(f"pack: values must lie in [{Q_MIN}, {Q_MAX}], found [{q.min()}, {q.max()}]")
    out_f, in_f = q.shape
    nibbles = (q.astype(np.uint32) + OFFSET).reshape(out_f, in_f // PACK_FACTOR, PACK_FACTOR)
    words = np.zeros((out_f, in_f // PACK_FACTOR), dtype=np.uint32)
    for k in range(PACK_FACTOR):
        words |= nibbles[:, :, k] << np.uint32(4 * k)
    return words.view(np.int32)  # the same 32 bits, read as signed (how the checkpoint stores them)


def unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """int32 [out, in/8] → int8 [out, in]."""
    out_f, in_f = shape
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.shape != (out_f, in_f // PACK_FACTOR) or in_f % PACK_FACTOR:
        raise ValueError(f"unpack: packed {packed.dtype} {packed.shape} does not fit the dense shape {shape}")
    words = packed.view(np.uint32)  # reinterpret: no sign bits to worry about
    q = np.empty((out_f, in_f), dtype=np.int8)
    for k in range(PACK_FACTOR):
        q[:, k::PACK_FACTOR] = ((words >> np.uint32(4 * k)) & 0xF).astype(np.int8) - OFFSET
    return q


def quantize_groups(w: np.ndarray, group_size: int = 32, bf16_input: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dense w [out, in] → (q int8 [out, in], scale float32 holding bf16 values [out, in/group_size]).

    Arithmetic happens in w's float dtype (float32 or float64). ``bf16_input=True`` says w holds bf16
    values and mimics bf16 arithmetic: each result is rounded to bf16 (as torch does for a bf16 tensor).
    """
    w = np.asarray(w)
    out_f, in_f = w.shape
    if in_f % group_size or group_size % PACK_FACTOR:
        raise ValueError(f"quantize: in {in_f} must be divisible by group_size {group_size} (a multiple of 8)")
    rnd = to_bfloat16 if bf16_input else (lambda v: v)
    groups = w.reshape(out_f, in_f // group_size, group_size)
    max_abs = np.abs(groups).max(axis=-1)
    scale = to_bfloat16(rnd(max_abs / w.dtype.type(7.5)))
    scale = np.where(scale == 0, np.float32(BF16_EPS), scale)
    quotient = rnd(groups / scale.astype(w.dtype)[:, :, None])
    q = np.round(np.clip(quotient, Q_MIN, Q_MAX)).astype(np.int8)  # np.round rounds half to even
    return q.reshape(out_f, in_f), scale


def quantize(w: np.ndarray, group_size: int = 32, bf16_input: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dense w [out, in] → (packed int32 [out, in/8], scale [out, in/group_size] as float32 bf16 values)."""
    q, scale = quantize_groups(w, group_size, bf16_input)
    return pack(q), scale


def dequantize(packed: np.ndarray, scale: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """W[o, i] = q[o, i] · scale[o, i // group] in float64 [out, in]; the group size is in / scale width."""
    out_f, in_f = shape
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim != 2 or scale.shape[0] != out_f or scale.shape[1] == 0 or in_f % scale.shape[1]:
        raise ValueError(f"dequantize: scale shape {scale.shape} does not fit the dense shape {shape}")
    group = in_f // scale.shape[1]
    q = unpack(packed, shape).astype(np.float64)
    return q * np.repeat(scale, group, axis=1)
