"""Solutions to the exercises of chapter 03 (RMSNorm, RoPE, YaRN). Tested in tests/test_rope.py and tests/test_norms.py."""

from __future__ import annotations

import math

import torch

from kimi_ref import rope
from kimi_ref.config import RopeConfig


def wavelengths(rope_cfg: RopeConfig, dim: int) -> torch.Tensor:
    """Tokens per full turn of each rotary pair [dim/2]: ``2π / inv_freq``."""
    return 2 * math.pi / rope.inv_freq(rope_cfg, dim)


def turns_in_original_context(rope_cfg: RopeConfig, dim: int) -> torch.Tensor:
    """How many full turns each pair makes over ``original_max_position_embeddings`` *without* YaRN.

    Pairs doing at least ``beta_fast`` turns are left alone (i < low); pairs doing at most ``beta_slow``
    turns are fully interpolated (i >= high).
    """
    plain = rope.inv_freq(RopeConfig(theta=rope_cfg.theta), dim)
    return rope_cfg.original_max_position_embeddings * plain / (2 * math.pi)


def to_halves(x: torch.Tensor) -> torch.Tensor:
    """Reorder interleaved rope dims (x0, y0, x1, y1, …) into HF's halves (x0, x1, …, y0, y1, …)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rms_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out in fp32 with the cast back before the weight (the checkpoint's order)."""
    x32 = x.to(torch.float32)
    rms = torch.sqrt((x32 * x32).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return weight * (x32 / rms).to(x.dtype)
