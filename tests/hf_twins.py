"""Tiny configs derived from K2.5, and their float64 HF DeepseekV3 twins: the peer the oracle is tested against.

The configs are K2.5 shrunk in size only (YaRN factor 64, beta 32/1, mscale 1/1, theta 50000,
routed_scaling_factor 2.827); the HF models get random values everywhere, including what HF inits to
constants (norm weights, e_score_correction_bias). HF keeps fp32 islands even after ``.double()``
(RMSNorm, router logits, RoPE angles), so those comparisons use the float32 row of the tolerance table.
Used by test_oracle.py (the whole oracle) and the per-concept files (test_rope, test_norms, test_router).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import transformers
from hypothesis import strategies as st

from kimi_ref.config import KimiConfig, fixture_path, load_config, tiny_config
from kimi_ref.oracle import checkpoint
from weights_tools import hf_peer

K25 = load_config(fixture_path("kimi_k25"))
K2_THINKING = load_config(fixture_path("kimi_k2_thinking"))
F64, F32 = torch.float64, torch.float32  # tolerance rows: pure float64, and HF's fp32 islands



def make_config(*, heads: int = 3, nope: int = 8, rope_dim: int = 8, v: int = 12, q_lora: int | None = 24,
                kv_lora: int = 16, hidden: int = 32, layers: int = 2, experts_n: int = 6, k: int = 2,
                n_group: int = 1, topk_group: int = 1, original: int = 16, beta_fast: float | None = None,
                moe_width: int = 16, attention_bias: bool = False, tied: bool = False) -> KimiConfig:
    """K2.5 shrunk in size only (YaRN 64 with β 32/1, mscale 1/1, θ 50000, scaling 2.827, 1 dense layer)."""
    c = tiny_config(K25, vocab_size=300, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    q_lora_rank=24 if q_lora is None else q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
                    qk_rope_head_dim=rope_dim, v_head_dim=v, intermediate_size=48, moe_intermediate_size=moe_width,
                    n_routed_experts=experts_n, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                    original_max_position_embeddings=original, max_position_embeddings=original * 64, vision=False)
    changes: dict = {"attention_bias": attention_bias, "tie_word_embeddings": tied}
    if q_lora is None:
        changes["q_lora_rank"] = None
    if beta_fast is not None:
        changes["rope"] = dataclasses.replace(c.rope, beta_fast=beta_fast)
    return c.replace(**changes)


# The K2.5-shaped example every hypothesis test also runs: odd head count, v_head_dim != qk_nope_head_dim.
KIMI_TINY = make_config()


@st.composite
def configs(draw, layers: int = 2) -> KimiConfig:
    n_experts = draw(st.sampled_from([4, 6, 8]))
    n_group = draw(st.sampled_from([g for g in (1, 2, 4) if n_experts % g == 0 and n_experts // g >= 2]))
    topk_group = draw(st.integers(1, n_group))
    return make_config(
        heads=draw(st.sampled_from([1, 2, 3, 5])), nope=draw(st.sampled_from([4, 8])),
        rope_dim=draw(st.sampled_from([4, 8, 16])), v=draw(st.sampled_from([4, 6, 12])),
        q_lora=draw(st.sampled_from([None, 24])), kv_lora=draw(st.sampled_from([8, 16])), layers=layers,
        experts_n=n_experts, k=draw(st.integers(1, min(3, topk_group * (n_experts // n_group)))),
        n_group=n_group, topk_group=topk_group, original=draw(st.sampled_from([8, 16, 4096])),
        beta_fast=draw(st.sampled_from([32.0, 1.0])),  # K2.5, K2-Instruct-0905
        attention_bias=draw(st.sampled_from([False, False, True])),  # Kimi: false; HF supports both
    )


def hf_config(c: KimiConfig) -> transformers.DeepseekV3Config:
    """The peer's config (weights_tools.hf_peer), computed in float64 all through: sdpa attention and the
    experts one by one (grouped_mm has no float64)."""
    return hf_peer.hf_config(c, attn_implementation="sdpa", experts_implementation="eager")


def hf_model(c: KimiConfig, seed: int) -> transformers.DeepseekV3ForCausalLM:
    """A float64 HF model with every parameter random, including what HF inits to constants."""
    m = transformers.DeepseekV3ForCausalLM(hf_config(c)).double().eval()
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(randn(p.shape))
            elif p.ndim == 1:  # RMSNorm weights (HF: ones)
                p.copy_(1 + 0.3 * randn(p.shape))
            else:  # fan-in scaling keeps activations O(1) through the layers
                p.copy_(randn(p.shape) * p.shape[-1] ** -0.5)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):  # HF: zeros
                b.copy_(0.1 * randn(b.shape))
    return m


def hf_checkpoint(c: KimiConfig, seed: int, directory: Path) -> tuple[transformers.DeepseekV3ForCausalLM, KimiConfig, dict]:
    """The HF model, saved with save_pretrained, and what the oracle's reader makes of it."""
    m = hf_model(c, seed)
    m.save_pretrained(directory)
    config, weights = checkpoint.load_weights(directory)
    return m, config, weights


def random_weights(c: KimiConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float64 weights for every tensor the config implies (for oracle-only invariants)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in checkpoint.expected_tensors(c).items():
        if name.endswith("embed_tokens.weight"):
            out[name] = rng.standard_normal(shape)
        elif name.endswith("e_score_correction_bias"):
            out[name] = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            out[name] = 1 + 0.3 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) * shape[-1] ** -0.5
    return out


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))
