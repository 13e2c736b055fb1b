"""Solutions to the exercises of chapter 05 (the router). Tested in tests/test_router.py."""

from __future__ import annotations

import math

import numpy as np
import torch

from kimi_ref.config import KimiConfig
from kimi_ref.router import route


def route_by_hand(x: list[float], weight: list[list[float]], bias: list[float], config: KimiConfig) -> tuple[list[float], list[int]]:
    """One token, plain Python: (weights, expert ids) exactly as router.route computes them."""
    scores = [1 / (1 + math.exp(-sum(a * b for a, b in zip(x, row)))) for row in weight]
    choice = [s + b for s, b in zip(scores, bias)]
    per_group = len(choice) // config.n_group
    groups = [sorted(choice[g * per_group:(g + 1) * per_group], reverse=True) for g in range(config.n_group)]
    group_score = [g[0] + g[1] if len(g) > 1 else g[0] for g in groups]
    kept = sorted(range(config.n_group), key=lambda g: -group_score[g])[: config.topk_group]
    allowed = [e for e in range(len(choice)) if e // per_group in kept]
    ids = sorted(allowed, key=lambda e: -choice[e])[: config.num_experts_per_tok]
    weights = [scores[e] for e in ids]
    if config.norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    return [w * config.routed_scaling_factor for w in weights], ids


def balance_bias_proportional(x: torch.Tensor, weight: torch.Tensor, config: KimiConfig, steps: int = 50,
                              rate: float = 0.01) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Aux-loss-free balancing with a proportional step: ``bias -= rate · (load − mean) / mean`` after
    each batch. Returns the final bias and the load [E] of every step (before its update)."""
    bias = torch.zeros(config.n_routed_experts)
    loads = []
    for _ in range(steps):
        _, ids = route(x, weight, bias, config)
        load = torch.bincount(ids.flatten(), minlength=config.n_routed_experts).float()
        loads.append(load.numpy())
        bias -= rate * (load - load.mean()) / load.mean()
    return bias, loads


def selection_margin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: KimiConfig) -> torch.Tensor:
    """Per token [N]: the k-th best choice score minus the (k+1)-th (fp32). Small margins flip in bf16."""
    choice = torch.sigmoid(x.float() @ weight.float().T) + bias.float()
    top = torch.topk(choice, config.num_experts_per_tok + 1, dim=-1).values
    return top[:, -2] - top[:, -1]
