"""Solutions to the exercises of chapter 06 (experts and the MoE). Tested in tests/test_experts.py."""

from __future__ import annotations

import torch

from kimi_ref.config import KimiConfig
from kimi_ref.experts import MoE


def moe_by_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE one token at a time, one expert at a time: slow, obvious, equal to ``moe(x)`` [N,d]."""
    weights, ids = moe.gate(x)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            expert = moe.experts[str(int(ids[n, j]))]
            out[n] += weights[n, j] * expert(x[n:n + 1])[0].float()
        if moe.shared_experts is not None:
            out[n] += moe.shared_experts(x[n:n + 1])[0].float()
    return out.to(x.dtype)


def active_parameters(config: KimiConfig) -> dict[str, int]:
    """Weights in the text model and weights one token touches (routed experts: k of E per MoE layer)."""
    d, v = config.hidden_size, config.vocab_size
    h, n, r, vd, c = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                      config.v_head_dim, config.kv_lora_rank)
    q = d * h * (n + r) if config.q_lora_rank is None else d * config.q_lora_rank + config.q_lora_rank * (1 + h * (n + r))
    attention = q + d * (c + r) + c + c * h * (n + vd) + h * vd * d + 2 * d  # + both layer norms
    swiglu = 3 * d  # per unit of width
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    dense_layers = config.num_hidden_layers - moe_layers
    expert = swiglu * config.moe_intermediate_size
    shared = swiglu * config.moe_intermediate_size * config.n_shared_experts
    router = config.n_routed_experts * (d + 1)
    embeddings = v * d * (1 if config.tie_word_embeddings else 2) + d
    common = (config.num_hidden_layers * attention + dense_layers * swiglu * config.intermediate_size
              + moe_layers * (shared + router) + embeddings)
    return {
        "total": common + moe_layers * config.n_routed_experts * expert,
        "active": common + moe_layers * config.num_experts_per_tok * expert,
        "routed_experts": moe_layers * config.n_routed_experts * expert,
    }


def capacity_drop(ids: torch.Tensor, n_experts: int, capacity_factor: float) -> float:
    """Fraction of (token, expert) picks dropped if each expert takes at most
    ``ceil(capacity_factor · N·k / E)`` tokens, first come first served (GShard/Switch-style training).
    Kimi's inference drops nothing: every pick is computed."""
    n, k = ids.shape
    capacity = int(torch.tensor(capacity_factor * n * k / n_experts).ceil())
    load = torch.bincount(ids.flatten(), minlength=n_experts)
    dropped = (load - capacity).clamp(min=0).sum()
    return float(dropped) / (n * k)
