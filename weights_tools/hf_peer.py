"""HF transformers' own ``DeepseekV3ForCausalLM`` as an independent peer of kimi_ref (optional: needs transformers).

    hf_config(config: KimiConfig) -> DeepseekV3Config
    hf_state_dict(model: KimiForCausalLM) -> dict[str, Tensor]      our flat names → HF's in-memory names
    hf_twin(model: KimiForCausalLM, **kw) -> DeepseekV3ForCausalLM  HF's model holding our model's weights
    hf_model(path, dtype) -> DeepseekV3ForCausalLM                  a checkpoint directory, run by HF

Our config maps to ``DeepseekV3Config`` with YaRN as transformers-5 ``rope_parameters`` and
``rope_interleave=True`` (Kimi's rotary dims are interleaved pairs; HF de-interleaves q and k by the
same permutation before ``rotate_half``, so q·k and the logits are unchanged and the weights load as
they are). HF keeps each layer's routed experts fused as 3-D parameters, ``experts.gate_up_proj``
[E, 2f, d] (gate rows, then up rows) and ``experts.down_proj`` [E, d, f]; INT4 experts are dequantized
into them.

``hf_model`` loads an HF-written checkpoint (flat ``deepseek_v3``, no INT4) with HF's own
``from_pretrained``: nothing of ours touches the weights. Anything else (the kimi_k25 layout, INT4
experts) HF cannot read, so it goes through ``kimi_ref.load_model`` and :func:`hf_state_dict`.
transformers is a test-only dependency: only this module imports it, and only when called.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["PeerError", "hf_config", "hf_state_dict", "hf_twin", "hf_model", "loads_natively"]


class PeerError(RuntimeError):
    """transformers is missing, or cannot represent this checkpoint."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PeerError("the HF peer needs transformers (pip install 'transformers>=5'); it is a test-only "
                        "dependency of kimi_ref") from None
    return transformers


def hf_config(cfg, **extra):
    """``DeepseekV3Config`` with the numbers of our ``KimiConfig`` (text model only); ``extra`` goes to HF as is
    (e.g. ``attn_implementation``)."""
    transformers = _transformers()
    rope = cfg.rope
    rope_parameters = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.type == "yarn":
        rope_parameters.update(rope_type="yarn", factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                               mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim,
                               original_max_position_embeddings=rope.original_max_position_embeddings)
    if cfg.moe_layer_freq != 1:
        raise PeerError(f"{cfg.source}: moe_layer_freq {cfg.moe_layer_freq}; HF makes every layer past "
                        "first_k_dense_replace MoE")
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope_parameters, rope_interleave=cfg.rope_interleave, attention_bias=cfg.attention_bias,
        tie_word_embeddings=cfg.tie_word_embeddings, num_mtp_layers=cfg.num_nextn_predict_layers,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, **extra,
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our flat checkpoint names → HF's in-memory names (routed experts fused, INT4 dequantized), float32."""
    cfg = model.config
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision_tower.", "mm_projector."))}
    out = {k: v.float() for k, v in ours.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        experts = model.model.layers[i].mlp.experts
        dense = {}
        for e in range(cfg.n_routed_experts):
            dense[e] = {}
            for proj in ("gate_proj", "up_proj", "down_proj"):
                m = getattr(experts[str(e)], proj)
                dense[e][proj] = m.dense_weight(torch.float32) if hasattr(m, "dense_weight") else m.weight.float()
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([dense[e]["gate_proj"], dense[e]["up_proj"]]) for e in range(cfg.n_routed_experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [dense[e]["down_proj"] for e in range(cfg.n_routed_experts)])
    return out


def hf_twin(model, **kw):
    """HF's ``DeepseekV3ForCausalLM`` (eval mode) holding ``model``'s text weights through :func:`hf_state_dict`;
    every tensor on each side must find its counterpart. ``kw`` goes to ``_from_config`` (e.g.
    ``attn_implementation``, ``dtype``)."""
    transformers = _transformers()
    theirs = transformers.DeepseekV3ForCausalLM._from_config(hf_config(model.config), **kw)
    missing, unexpected = theirs.load_state_dict(hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise PeerError(f"{model.config.source}: HF's DeepseekV3 does not take this model's tensors (HF-only: "
                        f"{missing[:5]}, ours only: {unexpected[:5]})")
    return theirs.eval()


def loads_natively(path: str | Path) -> bool:
    """Can HF's ``from_pretrained`` read this directory as it is (flat ``deepseek_v3``, no quantization)?"""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return raw.get("model_type") == "deepseek_v3" and "quantization_config" not in raw


def hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """HF's DeepseekV3ForCausalLM holding the checkpoint at ``path``, in ``dtype``, eval mode, on the CPU."""
    transformers = _transformers()
    cls = transformers.DeepseekV3ForCausalLM
    kw = {"attn_implementation": "eager", "experts_implementation": "eager"}  # plain matmuls: no fused kernels
    if loads_natively(path):
        return cls.from_pretrained(str(path), dtype=dtype, **kw).eval()
    import kimi_ref

    ours = kimi_ref.load_model(path, device="cpu", dtype=torch.float32, progress=False)
    return hf_twin(ours, **kw).to(dtype)
