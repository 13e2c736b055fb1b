"""Solutions to the exercises of chapter 08 (the whole model and the real checkpoint layout).
Tested in tests/test_checkpoint.py."""

from __future__ import annotations

import math

from kimi_ref.checkpoint import ITEMSIZE, expected_tensors, flat_name, rank_tensors
from kimi_ref.config import KimiConfig
from kimi_ref.parallel import TP


def parameter_counts(config: KimiConfig) -> tuple[int, int]:
    """(total, active per token) weights of the text model, an INT4 Linear counted at its dense
    [out, in] size. Active: everything except the routed experts, plus k of them per MoE layer."""
    total = routed = 0
    for name, (shape, _) in expected_tensors(config, include_vision=False).items():
        key = flat_name(name, config)
        if key.endswith((".weight_scale", ".weight_shape")):
            continue  # bookkeeping of a quantized Linear; its weights are counted once, below
        n = math.prod(shape)
        if key.endswith(".weight_packed"):
            n *= 8  # eight 4-bit weights per int32 word
        total += n
        if ".mlp.experts." in key:
            routed += n
    moe_layers = sum(map(config.is_moe_layer, range(config.num_hidden_layers)))
    per_expert = routed // (moe_layers * config.n_routed_experts) if moe_layers else 0
    active = total - routed + moe_layers * config.num_experts_per_tok * per_expert
    return total, active


def kv_cache_bytes_per_token(config: KimiConfig, mode: str = "absorbed", itemsize: int = 2) -> int:
    """Cache bytes per token over all layers. Absorbed MLA keeps the latent and the shared rope key;
    the naive (MHA-equivalent) form keeps every head's K and V."""
    if mode == "absorbed":
        values = config.kv_lora_rank + config.qk_rope_head_dim
    elif mode == "naive":
        values = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        raise ValueError(f"mode must be 'absorbed' or 'naive', found {mode!r}")
    return config.num_hidden_layers * values * itemsize


def rank_read_bytes(config: KimiConfig, tp_size: int, rank: int = 0) -> int:
    """Bytes rank ``rank`` of ``tp_size`` reads from the checkpoint (its slices and its experts)."""
    return sum(math.prod(shape) * ITEMSIZE[dtype] for shape, dtype in rank_tensors(config, TP(rank, tp_size)).values())
