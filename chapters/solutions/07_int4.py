"""Solutions to the exercises of chapter 07 (INT4). Tested in tests/test_int4.py."""

from __future__ import annotations

import torch

from kimi_ref import int4


def pack_word(values: list[int]) -> int:
    """Eight 4-bit values in [-8, 7] → the signed int32 word the checkpoint stores (by hand, with ints)."""
    assert len(values) == 8 and all(-8 <= v <= 7 for v in values)
    word = 0
    for k, v in enumerate(values):
        word |= (v + 8) << (4 * k)  # excess-8 nibble; value k sits in bits 4k..4k+3
    return word - (1 << 32) if word >= 1 << 31 else word  # the same 32 bits read as signed


def unpack_word(word: int) -> list[int]:
    """The inverse of :func:`pack_word`."""
    return [((word >> (4 * k)) & 0xF) - 8 for k in range(8)]


def error_by_group_size(w: torch.Tensor, group_sizes: list[int]) -> dict[int, float]:
    """RMS quantization error of ``w`` for each group size: smaller groups follow local magnitudes."""
    out = {}
    for g in group_sizes:
        packed, scale = int4.quantize(w, group_size=g)
        w_hat = int4.dequantize(packed, scale, w.shape, group_size=g)
        out[g] = float((w_hat - w).pow(2).mean().sqrt())
    return out


def expert_bytes(d: int, width: int, group_size: int) -> int:
    """Bytes of one INT4 routed expert (gate, up: [width, d]; down: [d, width]) at a given group size."""
    return 2 * int4.packed_bytes(width, d, group_size) + int4.packed_bytes(d, width, group_size)
