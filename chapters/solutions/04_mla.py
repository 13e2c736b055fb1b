"""Solutions to the exercises of chapter 04 (Multi-head Latent Attention). Tested in tests/test_mla.py."""

from __future__ import annotations

import torch

from kimi_ref.config import KimiConfig
from kimi_ref.mla import MLA


def cache_bytes(config: KimiConfig, context: int, mode: str, bytes_per_value: int = 2, batch: int = 1) -> int:
    """KV-cache bytes of the whole model for ``batch`` sequences of ``context`` tokens.

    absorbed: c + r values per token per layer; naive (MHA-equivalent): h·(n + r) keys + h·v values.
    """
    if mode == "absorbed":
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
    elif mode == "naive":
        per_token = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        raise ValueError(f"mode must be 'absorbed' or 'naive', found {mode!r}")
    return batch * context * config.num_hidden_layers * per_token * bytes_per_value


def absorbed_output_weight(mla: MLA) -> torch.Tensor:
    """W_uv folded into o_proj: [d, h·c], so ``o_proj(W_uv · latent_out) == latent_out.flatten() @ W.T``.

    o_proj.weight [d, h·v] viewed [d, h, v]; W_uv [h, v, c]; the product sums over v.
    """
    _, w_uv = mla.split_kv_b()
    o = mla.o_proj.weight.unflatten(1, (mla.heads, mla.value_dim))  # [d, h, v]
    return torch.einsum("dhv,hvc->dhc", o, w_uv).flatten(1)


def attention_flops_per_decode_token(config: KimiConfig, context: int, mode: str) -> int:
    """Multiply-adds of the attention core (scores and weighted sum) for one new token at ``context``.

    naive: per head (n+r) for each score and v for each value, plus kv_b for the new token's own key
    and value, c·(n+v); absorbed: (c+r) and c, plus the two per-token absorptions n·c (query) and
    c·v (output) per head.
    """
    h, n, r, v, c = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                     config.v_head_dim, config.kv_lora_rank)
    if mode == "naive":
        return h * context * (n + r + v) + h * c * (n + v)
    if mode == "absorbed":
        return h * context * (c + r + c) + h * (n * c + c * v)
    raise ValueError(f"mode must be 'absorbed' or 'naive', found {mode!r}")
