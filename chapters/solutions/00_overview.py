"""Solutions to chapter 00's exercises (tested in tests/test_config.py)."""

from __future__ import annotations

from kimi_ref.config import KimiConfig


def _attention_parameters(c: KimiConfig) -> int:
    h, d = c.num_attention_heads, c.hidden_size
    q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim if c.q_lora_rank else d * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * d


def active_parameters(c: KimiConfig) -> int:
    """Parameters one token touches in one forward pass (the embedding contributes one row)."""
    d = c.hidden_size
    swiglu = lambda width: 3 * d * width  # noqa: E731  gate, up, down
    total = d + c.vocab_size * d + d  # embedding row, lm_head, final norm
    for layer in range(c.num_hidden_layers):
        total += _attention_parameters(c) + 2 * d
        if c.is_moe_layer(layer):
            total += c.n_routed_experts * d + c.n_routed_experts  # router weight and bias
            total += swiglu(c.moe_intermediate_size) * (c.num_experts_per_tok + c.n_shared_experts)
        else:
            total += swiglu(c.intermediate_size)
    return total


def kv_cache_bytes(c: KimiConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """MLA caches the normalized latent and the roped shared key: kv_lora_rank + rope dims per layer."""
    return tokens * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * dtype_bytes


def mha_cache_bytes(c: KimiConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """The same heads with ordinary per-head keys and values."""
    per_layer = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return tokens * c.num_hidden_layers * per_layer * dtype_bytes
