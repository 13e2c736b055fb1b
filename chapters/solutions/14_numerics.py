"""Solutions to chapter 14's exercises (tested in tests/test_trace.py)."""

from __future__ import annotations

import torch


def first_step(comparison, factor: float = 10.0):
    """The first row (in forward order) whose error exceeds ``factor`` × the previous row's, or None.

    Noise grows smoothly from one activation to the next; a bug multiplies the error at one place.
    Exact zeros (the embedding) are not a base to step from.
    """
    previous = None
    for row in comparison.rows:
        if previous is not None and previous > 0 and row.rel_error > factor * previous:
            return row
        if row.rel_error > 0:
            previous = row.rel_error
    return None


def flip_fraction(a_ids: torch.Tensor, b_ids: torch.Tensor) -> float:
    """Fraction of tokens of two [B, T, k] expert-id tensors whose sets of experts differ."""
    if a_ids.shape != b_ids.shape:
        raise ValueError(f"expert ids of shapes {tuple(a_ids.shape)} and {tuple(b_ids.shape)} do not pair up")
    differ = (a_ids.sort(-1).values != b_ids.sort(-1).values).any(-1)
    return float(differ.double().mean())
