"""The ``noaux_tc`` sigmoid router with e_score_correction_bias and group-limited selection, float64 oracle.

    x [N,d], weight [E,d], bias [E]  ->  weights [N,k], indices [N,k]   (k = num_experts_per_tok)

Per token (Kimi: E 384, k 8, n_group = topk_group = 1, routed_scaling_factor 2.827):

    scores  = sigmoid(x · weightᵀ)                       [E]   (the fast path keeps this in fp32)
    choice  = scores + bias                               [E]   the bias steers *which* experts win ...
    groups  : split choice into n_group equal groups; a group's score is the sum of its top-2 choices;
              keep the topk_group best groups, set every other expert's choice to -inf
    indices = the k largest choices, best first
    weights = scores[indices]                                   ... but not how much they count
              / (Σ scores[indices] + 1e-20)                      if norm_topk_prob
              · routed_scaling_factor                            (the shared expert is not scaled)

The -inf (not 0) matters: with negative biases a masked expert at 0 could beat every allowed one.
With n_group = 1 the group step keeps everything (Kimi's case).
"""

from __future__ import annotations

import numpy as np

from kimi_ref.config import KimiConfig

__all__ = ["sigmoid", "router_scores", "group_mask", "select_experts", "route"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))``, written as ``exp(-log(1 + exp(-z)))`` so no exp overflows."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def router_scores(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sigmoid affinities [N,E] of every token for every expert."""
    return sigmoid(np.asarray(x, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T)


def group_mask(choice: np.ndarray, config: KimiConfig) -> np.ndarray:
    """bool [E] for one token: True for experts in the topk_group groups with the largest top-2 sums."""
    e = choice.shape[-1]
    per_group = e // config.n_group
    grouped = choice.reshape(config.n_group, per_group)
    group_scores = np.sort(grouped, axis=-1)[:, -2:].sum(axis=-1)  # sum of each group's two best choices
    best_groups = np.argsort(-group_scores, kind="stable")[: config.topk_group]
    keep = np.zeros(config.n_group, dtype=bool)
    keep[best_groups] = True
    return np.repeat(keep, per_group)


def select_experts(choice: np.ndarray, config: KimiConfig) -> np.ndarray:
    """The k expert indices [k] with the largest (group-masked) choice scores for one token, best first."""
    masked = np.where(group_mask(choice, config), choice, -np.inf)
    # stable sort on the negated scores: ties go to the lower expert index
    return np.argsort(-masked, kind="stable")[: config.num_experts_per_tok]


def route(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, config: KimiConfig) -> tuple[np.ndarray, np.ndarray]:
    """Routing weights [N,k] and expert indices [N,k] for every token, ordered by descending choice score."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    e = config.n_routed_experts
    if weight.shape != (e, x.shape[-1]) or bias.shape != (e,):
        raise ValueError(f"route: gate weight {weight.shape} / bias {bias.shape}, "
                         f"expected ({e}, {x.shape[-1]}) / ({e},)")
    scores = router_scores(x, weight)
    choice = scores + bias
    indices = np.zeros((0, config.num_experts_per_tok), dtype=np.int64)
    if len(x):
        indices = np.stack([select_experts(row, config) for row in choice])
    weights = np.take_along_axis(scores, indices, axis=-1)  # the unbiased scores of the chosen experts
    if config.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, indices
