"""The ``noaux_tc`` sigmoid router: which k experts each token visits, and how much each one counts.

    x [N,d]  ->  weights [N,k] float32,  ids [N,k] int64      (k = num_experts_per_tok)

Parameters (the checkpoint's names under ``mlp.gate.``): ``weight`` [E,d] in the model dtype and
``e_score_correction_bias`` [E], always float32. Kimi K2.x: E 384, k 8, n_group = topk_group = 1,
routed_scaling_factor 2.827, norm_topk_prob true.

Per token, all in fp32 whatever the model dtype (an fp32 island: bf16 logits flip near-tie experts):

    scores  = sigmoid(x · Wᵀ)                                  [E]   affinity of the token for each expert
    choice  = scores + e_score_correction_bias                 [E]   the bias decides *which* experts win ...
    groups  : view choice as [n_group, E/n_group]; a group's score is the sum of its two best choices;
              keep the topk_group best groups, set every other expert's choice to -inf
    ids     = top-k of choice, best first
    weights = scores[ids] / (Σ scores[ids] + 1e-20)             ... but not how much they count (the
              (the division only if norm_topk_prob)                  unbiased scores), normalized
              · routed_scaling_factor                             the shared expert is *not* scaled

Why a bias and not an auxiliary loss ("aux-loss-free", DeepSeek-V3): during training the bias of an
overloaded expert is nudged down and that of an idle one up, which balances the load without a loss
term fighting the language-model loss. At inference it is a fixed per-expert offset that only
changes the selection.

The -inf (not 0) in the group mask matters: with negative biases a masked expert at 0 could beat every
allowed one. With n_group = 1 (Kimi) the group step keeps every expert and costs nothing.

Float64 twin: ``kimi_ref/oracle/router.py``. Used by ``kimi_ref/experts.py`` (the MoE).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_ref.config import KimiConfig

__all__ = ["route", "Router"]


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: KimiConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [N,k] (fp32) and expert ids [N,k] (int64), ordered by descending choice score."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    if x.dim() != 2 or weight.shape != (e, x.shape[-1]) or bias.shape != (e,):
        raise ValueError(f"router: x {tuple(x.shape)}, gate weight {tuple(weight.shape)}, bias {tuple(bias.shape)}; "
                         f"expected x [N, d], weight ({e}, d), bias ({e},) for n_routed_experts = {e}")
    scores = torch.sigmoid(x.float() @ weight.float().T)  # [N,E] fp32 island
    choice = scores + bias.float()
    if config.n_group > 1:
        choice = _mask_groups(choice, config)
    ids = torch.topk(choice, k, dim=-1, sorted=True).indices  # best first
    weights = scores.gather(-1, ids)  # the *unbiased* scores of the chosen experts
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # DeepSeek's epsilon, kept for bit-parity
    return weights * config.routed_scaling_factor, ids


def _mask_groups(choice: torch.Tensor, config: KimiConfig) -> torch.Tensor:
    """choice [N,E] with every expert outside the topk_group best groups set to -inf."""
    n = choice.shape[0]
    grouped = choice.view(n, config.n_group, -1)  # [N, groups, experts per group]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # a group is as good as its two best experts
    best = group_scores.topk(config.topk_group, dim=-1).indices  # [N, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)


class Router(nn.Module):
    """``mlp.gate``: x [N,d] -> (weights [N,k] fp32, ids [N,k] int64). Replicated on every TP rank,
    so every rank routes every token the same way."""

    def __init__(self, config: KimiConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        e, d = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(e, d, dtype=dtype, device=device))
        if self.weight.device.type != "meta":  # the meta device (checkpoint loading) holds no values
            nn.init.normal_(self.weight, std=0.02)
        # fp32 in the checkpoint and here, whatever the model dtype: the bias differences between
        # experts are small and a bf16 copy would reorder near-ties.
        self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(x, self.weight, self.e_score_correction_bias, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"experts={c.n_routed_experts}, top_k={c.num_experts_per_tok}, groups={c.n_group}/{c.topk_group}, "
                f"scale={c.routed_scaling_factor}, norm={c.norm_topk_prob}")
