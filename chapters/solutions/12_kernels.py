"""Solutions to the exercises of chapter 12 (Triton kernels). Tested in tests/test_kernels.py."""

from __future__ import annotations

import numpy as np


def unpack_tile(words: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """What ``dequant_tile`` does, in numpy: int32 words [N, K/8] and scales [N, K/group] -> float64 [N, K].

    Word j of a row holds columns 8j..8j+7, column 8j+i in bits 4i..4i+3, stored as q + 8.
    """
    words = np.asarray(words, dtype=np.int32).view(np.uint32)  # reinterpret: no sign bits to mask away
    shifts = np.arange(8, dtype=np.uint32) * 4
    nibbles = (words[:, :, None] >> shifts) & 0xF  # [N, K/8, 8]: the k-th nibble of word j is column 8j+k
    q = nibbles.reshape(words.shape[0], -1).astype(np.float64) - 8
    return q * np.repeat(np.asarray(scales, dtype=np.float64), group_size, axis=1)


def ridge_batch(peak_flops: float, bandwidth: float, bytes_per_weight: float = 0.5 + 2 / 32) -> float:
    """The batch M at which a W4A16 GEMM stops being memory-bound.

    Per weight: 2·M flops (a multiply and an add for each of the M rows) and ``bytes_per_weight`` bytes
    (activations are negligible). Memory-bound while 2M / bytes_per_weight < peak_flops / bandwidth.
    """
    return peak_flops / bandwidth * bytes_per_weight / 2


def combine_splits(partials: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Join per-chunk attention outputs: partials [splits, c] (each a softmax over its own chunk) and
    their log-sum-exps [splits] -> the output of one softmax over all chunks [c]."""
    w = np.exp(lse - np.max(lse))  # chunk i's share of the total mass, up to a common factor
    return (w[:, None] * partials).sum(0) / w.sum()
