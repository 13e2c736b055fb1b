"""Solutions to the exercises of chapter 10 (tensor parallelism). Tested in tests/test_parallel.py."""

from __future__ import annotations

from kimi_ref.checkpoint import rank_tensors
from kimi_ref.parallel import TP, TPError, validate_tp


def valid_tp_sizes(config, up_to: int) -> list[int]:
    """Every TP size from 1 to ``up_to`` that divides heads, experts, vocabulary and the MLP widths."""
    sizes = []
    for n in range(1, up_to + 1):
        try:
            validate_tp(config, n)
        except TPError:
            continue
        sizes.append(n)
    return sizes


def allreduce_bytes_per_token(config, bytes_per_value: int) -> int:
    """Bytes each rank contributes to the all-reduces of one decoder layer for one token:
    one [d] vector after attention (o_proj) and one after the MLP/MoE."""
    return 2 * config.hidden_size * bytes_per_value


def rank_stored_values(config, world_size: int) -> int:
    """How many stored numbers (weights, packed INT4 words, scales) rank 0 of ``world_size`` loads,
    text model only. Every rank loads the same amount."""
    tensors = rank_tensors(config, TP(rank=0, world_size=world_size), include_vision=False)
    total = 0
    for shape, _ in tensors.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def stage_busy_fraction(stages: int, sequences: int) -> float:
    """Decode with ``sequences`` sequences in flight through ``stages`` pipeline stages: each sequence's
    next token needs its last one to leave the last stage, so it passes every stage once per round of
    ``stages`` steps; a stage has work in ``min(sequences, stages)`` of them."""
    if stages < 1 or sequences < 1:
        raise ValueError(f"stages and sequences must be at least 1, found {stages} and {sequences}")
    return min(sequences, stages) / stages
