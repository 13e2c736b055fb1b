"""The independent peer: HF transformers' native ``DeepseekV3ForCausalLM`` with our weights gives our logits.

Our config is mapped to ``DeepseekV3Config`` (YaRN as transformers-5 ``rope_parameters``,
``rope_interleave=True``: Kimi's rotary dims are interleaved pairs, and HF de-interleaves q and k by the
same permutation before ``rotate_half``, so q·k and the logits are unchanged and the weights load as
they are). Our state dict loads into theirs with one rename: HF keeps each layer's routed experts fused
as 3-D parameters, ``experts.gate_up_proj`` [E, 2f, d] (gate rows, then up rows) and
``experts.down_proj`` [E, d, f]; INT4 experts are dequantized into them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tolerances import assert_close

from test_model import FIXTURES, VOCAB, random_model, tiny

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402


def hf_config(cfg) -> DeepseekV3Config:
    rope = cfg.rope
    rope_parameters = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.type == "yarn":
        rope_parameters.update(rope_type="yarn", factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                               mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim,
                               original_max_position_embeddings=rope.original_max_position_embeddings)
    assert cfg.moe_layer_freq == 1, "HF makes every layer past first_k_dense_replace MoE"
    return DeepseekV3Config(
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
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our flat checkpoint names → HF's in-memory names (routed experts fused, INT4 dequantized)."""
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
                m = experts[str(e)].__getattr__(proj)
                dense[e][proj] = m.dense_weight(torch.float32) if hasattr(m, "dense_weight") else m.weight.float()
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([dense[e]["gate_proj"], dense[e]["up_proj"]]) for e in range(cfg.n_routed_experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [dense[e]["down_proj"] for e in range(cfg.n_routed_experts)])
    return out


_PEERS: dict = {}


def peer_pair(name: str, **tiny_kw):
    key = (name, tuple(sorted(tiny_kw.items())))
    if key not in _PEERS:
        ours = random_model(tiny(name, **tiny_kw), seed=7 + len(_PEERS))
        theirs = DeepseekV3ForCausalLM._from_config(hf_config(ours.config), attn_implementation="eager").eval()
        missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
        assert not unexpected, f"our names HF does not know: {unexpected}"
        assert not missing, f"HF tensors we did not fill: {missing}"
        _PEERS[key] = (ours, theirs)
    return _PEERS[key]


@settings(max_examples=6)
@given(st.sampled_from(FIXTURES), st.sampled_from(["absorbed", "naive"]), st.integers(1, 2), st.integers(1, 12),
       st.integers(0, 2**31 - 1))
def test_logits_match_hf_deepseek_v3(name, mode, batch, length, seed):
    ours, theirs = peer_pair(name)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    try:
        for layer in ours.model.layers:
            layer.self_attn.mode = mode  # the same weights, the other MLA form (no cache involved)
        with torch.no_grad():
            want = theirs(ids).logits.double()
            got = ours(ids)
    finally:
        for layer in ours.model.layers:
            layer.self_attn.mode = "absorbed"
    assert_close(got, want, torch.float32, what=f"{name} ({mode}) vs HF DeepseekV3")


def test_group_limited_routing_and_long_positions_match_hf():
    """n_group 4 / topk_group 2 (HF masks with -inf too), and positions past original_max_position_embeddings
    (16 here) so the YaRN ramp between beta_fast and beta_slow is exercised."""
    ours, theirs = peer_pair("kimi_k25", n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                             original_max_position_embeddings=16)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits.double(), torch.float32, what="grouped routing, 40 tokens vs HF")


def test_hf_peer_really_depends_on_the_bias_and_interleaving():
    """Guards against a vacuous peer: breaking one Kimi quirk on HF's side must break agreement."""
    ours, theirs = peer_pair("kimi_k2_thinking")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        good = ours(ids)
        theirs.config.rope_interleave = False  # NeoX-style pairing: the "quietly broken" reading of Kimi
        try:
            broken = theirs(ids).logits
        finally:
            theirs.config.rope_interleave = True
    assert (good - broken).abs().max() > 1e-3
    gate = theirs.model.layers[1].mlp.gate
    saved = gate.e_score_correction_bias.clone()
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()  # aux-loss-free bias dropped: other experts win
        try:
            unbiased = theirs(ids).logits
        finally:
            gate.e_score_correction_bias.copy_(saved)
        assert_close(theirs(ids).logits, good.double(), torch.float32, what="restored HF peer")
    assert (good - unbiased).abs().max() > 1e-3
