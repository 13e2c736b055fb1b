"""Solutions to chapter 13's exercises (tested in tests/test_nano.py)."""

from __future__ import annotations

import torch

from weights_tools import nano_data


def clip_factor(max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """γ per head: τ / S where the head's largest logit S exceeds τ, else 1."""
    return torch.where(max_logit > tau, tau / max_logit, torch.ones_like(max_logit))


def split(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors for (q_nope, k_nope, q_rope, k_rope): q_nope·k_nope and q_rope·k_rope each shrink by γ,
    and the shared rotary key is never touched, so the rotary query takes all of γ."""
    root = gamma.sqrt()
    return root, root, gamma, torch.ones_like(gamma)


def trained_fraction(messages: list[dict], tokenizer) -> float:
    """Share of the conversation's tokens with a loss (the tool declaration alone is ~60 untrained tokens)."""
    ids, mask = nano_data.encode(messages, tokenizer)
    return sum(mask) / len(ids)
