"""The oracle end to end: a checkpoint directory and token ids in, float64 logits out.

    forward(path, input_ids [B,T]) -> logits [B,T,V] float64

= ``model.logits(input_ids, *checkpoint.load_weights(path))`` (no cache, positions 0..T-1, causal),
with the naive MLA form by default (``form="absorbed"`` gives the same numbers to ~1e-15).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kimi_ref.oracle.checkpoint import load_weights
from kimi_ref.oracle.model import logits

__all__ = ["forward"]


def forward(path: str | Path, input_ids: np.ndarray, *, form: str = "naive") -> np.ndarray:
    """Float64 logits [B,T,V] of the checkpoint at ``path`` for ``input_ids`` [B,T]."""
    config, weights = load_weights(path)
    return logits(np.asarray(input_ids), weights, config, form=form)
