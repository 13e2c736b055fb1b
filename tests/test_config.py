"""config.py: both layouts, both RoPE spellings, strict keys, tiny_config keeps every behaviour."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest

from kimi_ref.config import ConfigError, KimiConfig, MediaConfig, fixture_path, load_config, tiny_config
from kimi_ref.config_keys import config_key, count
from chapter_solutions import load_solutions


@pytest.fixture
def k25() -> dict:
    return json.loads(fixture_path("kimi_k25").read_text())


@pytest.fixture
def thinking() -> dict:
    return json.loads(fixture_path("kimi_k2_thinking").read_text())


def test_k25_fixture_reads_every_fact():
    c = load_config(fixture_path("kimi_k25"))
    assert c.layout == "kimi_k25" and c.weight_prefix == "language_model."
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (163840, 7168, 61, 64)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (c.intermediate_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok) == (18432, 2048, 384, 8)
    assert (c.n_shared_experts, c.first_k_dense_replace, c.n_group, c.topk_group) == (1, 1, 1, 1)
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob, c.routed_scaling_factor) == ("noaux_tc", "sigmoid", True, 2.827)
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 262144
    r = c.rope
    assert (r.type, r.theta, r.factor, r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim,
            r.original_max_position_embeddings) == ("yarn", 50000.0, 64.0, 32.0, 1.0, 1.0, 1.0, 4096)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.media_placeholder_token_id) == (163584, 163585, 163839, 163605)
    assert c.qk_head_dim == 192 and not c.tie_word_embeddings and c.num_nextn_predict_layers == 0
    assert c.vision.hidden_size == 1152 and c.vision.head_dim == 72 and c.vision.num_hidden_layers == 27
    q = c.quantization
    assert (q.num_bits, q.group_size, q.symmetric) == (4, 32, True)
    assert q.is_quantized("model.layers.1.mlp.experts.383.down_proj")
    for name in ("lm_head", "model.layers.1.self_attn.q_b_proj", "model.layers.1.mlp.shared_experts.up_proj",
                 "model.layers.0.mlp.gate_proj"):
        assert not q.is_quantized(name), name
    assert [c.is_moe_layer(i) for i in (0, 1, 60)] == [False, True, True]


def test_flat_layout_reads_its_own_beta_fast():
    c = load_config(fixture_path("kimi_k2_thinking"))
    assert c.layout == "flat" and c.weight_prefix == "" and c.vision is None
    assert c.rope.beta_fast == 1.0  # differs from K2.5's 32.0: read, never assumed
    assert c.quantization is not None


@pytest.mark.parametrize("name", ["kimi_k25", "kimi_k2_thinking"])
def test_round_trip(name):
    c = load_config(fixture_path(name))
    assert KimiConfig.from_dict(c.to_dict()) == c


@dataclass(frozen=True, kw_only=True)
class WithNewKey(KimiConfig):
    """KimiConfig plus a key a future release might add: the one edit a new key needs."""

    sliding_window: int = config_key(count, "a sliding-attention window in tokens (hypothetical)")


@pytest.mark.parametrize("name", ["kimi_k25", "kimi_k2_thinking"])
def test_a_new_config_key_is_one_declaration(name, tmp_path):
    """Declaring the field is enough: it is read from where the layout keeps text keys, no longer counted as
    an unknown (``extra``) key, written back by ``to_dict``/``save``, required, and checked by its kind."""
    raw = json.loads(fixture_path(name).read_text())
    text = raw["text_config"] if name == "kimi_k25" else raw
    text["sliding_window"] = 4096
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    c = WithNewKey.from_file(path)
    assert c.sliding_window == 4096 and "sliding_window" not in c.extra
    written = c.to_dict()
    assert (written["text_config"] if name == "kimi_k25" else written)["sliding_window"] == 4096
    c.save(tmp_path / "again.json")
    again = WithNewKey.from_file(tmp_path / "again.json")
    assert again == c and again.sliding_window == 4096
    assert KimiConfig.from_dict(raw).extra["sliding_window"] == 4096  # undeclared, it is only kept aside
    text["sliding_window"] = 0
    with pytest.raises(ConfigError, match="sliding_window' must be a positive integer, found 0"):
        WithNewKey.from_dict(raw)
    del text["sliding_window"]
    with pytest.raises(ConfigError, match="required key '(text_config.)?sliding_window' is missing"):
        WithNewKey.from_dict(raw)


def test_transformers5_rope_parameters(k25):
    text = k25["text_config"]
    scaling = text.pop("rope_scaling")
    theta = text.pop("rope_theta")
    text["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn", "rope_theta": theta}
    new = KimiConfig.from_dict(k25)
    assert new.rope == load_config(fixture_path("kimi_k25")).rope


def test_both_rope_spellings_must_agree(k25):
    text = k25["text_config"]
    text["rope_parameters"] = {**text["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="disagree"):
        KimiConfig.from_dict(k25)


@pytest.mark.parametrize("key", ["hidden_size", "kv_lora_rank", "routed_scaling_factor", "n_group", "rms_norm_eps",
                                 "topk_method", "scoring_func", "norm_topk_prob", "v_head_dim", "rope_theta"])
def test_missing_required_key_is_named(k25, key, tmp_path):
    del k25["text_config"][key]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(k25))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("key", ["beta_fast", "beta_slow", "factor", "mscale", "mscale_all_dim",
                                 "original_max_position_embeddings"])
def test_missing_yarn_key_is_named(thinking, key):
    del thinking["rope_scaling"][key]
    with pytest.raises(ConfigError, match=f"rope_scaling.{key}"):
        KimiConfig.from_dict(thinking, source="cfg.json")


def test_wrong_type_is_named(k25):
    k25["text_config"]["num_hidden_layers"] = "61"
    with pytest.raises(ConfigError, match="text_config.num_hidden_layers.*integer"):
        KimiConfig.from_dict(k25)


def test_unknown_layout():
    with pytest.raises(ConfigError, match="unknown config layout.*llama"):
        KimiConfig.from_dict({"model_type": "llama"}, source="x.json")


def test_fp8_k2_instruct_is_refused_clearly(thinking):
    thinking["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ConfigError, match="FP8"):
        KimiConfig.from_dict(thinking)


def test_hf_written_deepseek_v3_config_is_accepted():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, n_routed_experts=4, first_k_dense_replace=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_scaling={"type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        rope_theta=50000.0, routed_scaling_factor=2.827,
    )
    c = KimiConfig.from_dict(hf.to_dict(), source="hf")
    assert c.layout == "flat" and c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    assert c.rope.factor == 64.0 and c.rope.theta == 50000.0 and c.routed_scaling_factor == 2.827
    assert [c.is_moe_layer(i) for i in range(2)] == [False, True]


def test_kimi_spelling_without_topk_method_is_an_error(thinking):
    del thinking["topk_method"]  # model_type kimi_k2: the key is required
    with pytest.raises(ConfigError, match="topk_method"):
        KimiConfig.from_dict(thinking)


def test_tiny_config_keeps_every_behaviour():
    real = load_config(fixture_path("kimi_k25"))
    tiny = tiny_config(real, vocab_size=4096)
    assert tiny.hidden_size == 64 and tiny.n_routed_experts == 8
    for name in ("rope", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
                 "first_k_dense_replace", "rms_norm_eps", "n_shared_experts", "quantization", "layout"):
        assert getattr(tiny, name) == getattr(real, name), name
    # special ids keep their place at the end of the vocabulary
    assert tiny.bos_token_id == 4096 - 256 and tiny.pad_token_id == 4095
    assert tiny.media_placeholder_token_id == 163605 - 163840 + 4096
    assert tiny.vision is not None and tiny.vision.text_hidden_size == 64
    assert KimiConfig.from_dict(tiny.to_dict()) == tiny


def test_bad_tiny_sizes_are_refused():
    real = load_config(fixture_path("kimi_k25"))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        tiny_config(real, vocab_size=4096, n_routed_experts=4, num_experts_per_tok=6)


def test_media_config(tmp_path):
    data = json.loads((fixture_path("kimi_k25").parent / "kimi_k25_preprocessor_config.json").read_text())
    m = MediaConfig.from_dict(data)
    assert (m.patch_size, m.merge_kernel_size, m.in_patch_limit, m.patch_limit_on_one_side) == (14, 2, 16384, 512)
    assert m.image_mean == (0.5, 0.5, 0.5) and m.sample_fps == 2.0 and m.temporal_merge_kernel_size == 4
    assert MediaConfig.from_dict(m.to_dict()) == m
    broken = copy.deepcopy(data)
    del broken["media_proc_cfg"]["in_patch_limit"]
    with pytest.raises(ConfigError, match="media_proc_cfg.in_patch_limit"):
        MediaConfig.from_dict(broken, "preprocessor_config.json")


# ---- chapter 00 solutions ---------------------------------------------------------------------------


def _overview_solutions():
    return load_solutions("00_overview")


def test_chapter_00_solutions():
    sol = _overview_solutions()
    real = load_config(fixture_path("kimi_k25"))
    # The model card says "32B activated parameters" for the K2 family.
    assert 31e9 < sol.active_parameters(real) < 34e9
    # 61 layers × 576 values × 2 bytes per token.
    assert sol.kv_cache_bytes(real, 1) == 61 * 576 * 2
    assert sol.mha_cache_bytes(real, 1) == 61 * 64 * (192 + 128) * 2
    # Counted against the tiny model's real parameter count: a model built from the tiny config
    # touches exactly these for one token when every expert counts as "active".
    tiny = tiny_config(real)
    dense_equivalent = tiny.replace(num_experts_per_tok=tiny.n_routed_experts)
    assert sol.active_parameters(dense_equivalent) > sol.active_parameters(tiny)


def test_media_config_refuses_fixed_output_tokens():
    raw = json.loads(fixture_path("kimi_k25_preprocessor_config").read_text())
    raw["media_proc_cfg"]["fixed_output_tokens"] = 256
    with pytest.raises(ConfigError, match="fixed_output_tokens' is 256"):
        MediaConfig.from_dict(raw, "preprocessor_config.json")
