"""The checkpoint reader: the tensor list a config implies, name mapping, the tiny checkpoint's format,
strict errors, and loading into ``KimiForCausalLM`` (equal to the float64 oracle, per-rank slices).

* ``expected_tensors`` at full size equals sources §5 row by row (names, shapes, dtypes) and its count
  (208,550 for K2.5 with vision); the flat K2-Thinking layout has the same text tensors without
  ``language_model.`` and without vision.
* ``make_tiny`` writes exactly that list for the tiny config, in the real file layout (index, several
  shards, INT4 experts packed as compressed-tensors does, bf16 rest, fp32 router bias, both configs,
  the demo tokenizer).
* Every corruption is reported naming the file or tensor and what was expected.
* ``load_model`` on both layouts == ``kimi_ref.oracle.forward``; each TP rank reads only its slices.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tolerances import assert_close

import kimi_ref
from kimi_ref import checkpoint, int4
from kimi_ref.checkpoint import (INDEX_FILE, Checkpoint, CheckpointError, checkpoint_name, expected_tensors, flat_name,
                                 load_layer, load_model, rank_slice, rank_tensors, read_header)
from kimi_ref.config import fixture_path, load_config
from kimi_ref.oracle import checkpoint as oracle_checkpoint
from kimi_ref.oracle import forward as oracle_forward
from kimi_ref.oracle import int4 as oracle_int4
from kimi_ref.parallel import TP, TPError
from weights_tools import make_tiny as mt
from chapter_solutions import load_solutions

DATA = Path(checkpoint.__file__).parent / "data"


@pytest.fixture(scope="module")
def k25_config():
    return load_config(fixture_path("kimi_k25"))


@pytest.fixture(scope="module")
def flat_config():
    return load_config(fixture_path("kimi_k2_thinking"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {layout: mt.make_tiny(root / layout, layout, seed=0) for layout in ("kimi_k25", "flat")}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def _shard_of(path: Path, name: str) -> str:
    return _index(path)["weight_map"][name]


def _rewrite(path: Path, file: str, edit) -> None:
    """Load one shard, let ``edit(dict)`` change it in place, write it back (same file name)."""
    tensors = load_file(str(path / file))
    edit(tensors)
    save_file(tensors, str(path / file), metadata={"format": "pt"})


def _problems(path: Path) -> str:
    """All problems a strict open reports, as one string (the CheckpointError message)."""
    ckpt = Checkpoint.open(path)
    found = ckpt.problems + ckpt.check_weight_shapes()
    assert found, "a corrupted checkpoint was reported sound"
    return "\n".join(found)


# ---- the tensor list at full size: sources §5 --------------------------------------------------------------

T = "language_model.model.layers"
SOURCES_ROWS = {  # sources §5, K2.5, verbatim: name -> (shape, dtype)
    "language_model.model.embed_tokens.weight": ((163840, 7168), "BF16"),
    "language_model.lm_head.weight": ((163840, 7168), "BF16"),
    "language_model.model.norm.weight": ((7168,), "BF16"),
    f"{T}.7.input_layernorm.weight": ((7168,), "BF16"),
    f"{T}.7.post_attention_layernorm.weight": ((7168,), "BF16"),
    f"{T}.7.self_attn.q_a_proj.weight": ((1536, 7168), "BF16"),
    f"{T}.7.self_attn.q_a_layernorm.weight": ((1536,), "BF16"),
    f"{T}.7.self_attn.q_b_proj.weight": ((12288, 1536), "BF16"),
    f"{T}.7.self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), "BF16"),
    f"{T}.7.self_attn.kv_a_layernorm.weight": ((512,), "BF16"),
    f"{T}.7.self_attn.kv_b_proj.weight": ((16384, 512), "BF16"),
    f"{T}.7.self_attn.o_proj.weight": ((7168, 8192), "BF16"),
    f"{T}.0.mlp.gate_proj.weight": ((18432, 7168), "BF16"),
    f"{T}.0.mlp.up_proj.weight": ((18432, 7168), "BF16"),
    f"{T}.0.mlp.down_proj.weight": ((7168, 18432), "BF16"),
    f"{T}.60.mlp.gate.weight": ((384, 7168), "BF16"),
    f"{T}.60.mlp.gate.e_score_correction_bias": ((384,), "F32"),
    f"{T}.1.mlp.shared_experts.gate_proj.weight": ((2048, 7168), "BF16"),
    f"{T}.1.mlp.shared_experts.up_proj.weight": ((2048, 7168), "BF16"),
    f"{T}.1.mlp.shared_experts.down_proj.weight": ((7168, 2048), "BF16"),
    f"{T}.1.mlp.experts.383.gate_proj.weight_packed": ((2048, 896), "I32"),
    f"{T}.1.mlp.experts.383.up_proj.weight_scale": ((2048, 224), "BF16"),
    f"{T}.1.mlp.experts.0.gate_proj.weight_shape": ((2,), "I32"),
    f"{T}.30.mlp.experts.5.down_proj.weight_packed": ((7168, 256), "I32"),
    f"{T}.30.mlp.experts.5.down_proj.weight_scale": ((7168, 64), "BF16"),
    f"{T}.30.mlp.experts.5.down_proj.weight_shape": ((2,), "I32"),
    "mm_projector.pre_norm.weight": ((1152,), "BF16"),
    "mm_projector.pre_norm.bias": ((1152,), "BF16"),
    "mm_projector.proj.0.weight": ((4608, 4608), "BF16"),
    "mm_projector.proj.0.bias": ((4608,), "BF16"),
    "mm_projector.proj.2.weight": ((7168, 4608), "BF16"),
    "mm_projector.proj.2.bias": ((7168,), "BF16"),
    "vision_tower.patch_embed.proj.weight": ((1152, 3, 14, 14), "BF16"),
    "vision_tower.patch_embed.proj.bias": ((1152,), "BF16"),
    "vision_tower.patch_embed.pos_emb.weight": ((64, 64, 1152), "BF16"),
    "vision_tower.encoder.blocks.26.norm0.weight": ((1152,), "BF16"),
    "vision_tower.encoder.blocks.26.wqkv.weight": ((3456, 1152), "BF16"),
    "vision_tower.encoder.blocks.26.wqkv.bias": ((3456,), "BF16"),
    "vision_tower.encoder.blocks.0.wo.weight": ((1152, 1152), "BF16"),
    "vision_tower.encoder.blocks.0.norm1.bias": ((1152,), "BF16"),
    "vision_tower.encoder.blocks.0.mlp.fc0.weight": ((4304, 1152), "BF16"),
    "vision_tower.encoder.blocks.0.mlp.fc0.bias": ((4304,), "BF16"),
    "vision_tower.encoder.blocks.0.mlp.fc1.weight": ((1152, 4304), "BF16"),
    "vision_tower.encoder.final_layernorm.bias": ((1152,), "BF16"),
}


def test_expected_tensors_full_size_match_facts(k25_config):
    expected = expected_tensors(k25_config)
    assert len(expected) == 208_550  # sources §5 count check == DUMP-K25
    total = sum(int(np.prod(shape)) * checkpoint.ITEMSIZE[dtype] for shape, dtype in expected.values())
    # K2.7-Code's index total_size is 595.15 GB (sources §1). (The dump's 554.30 GiB of files is 0.03 GiB
    # more: 64 JSON headers listing 208,550 tensors.)
    assert round(total / 1e9, 2) == 595.15
    for name, spec in SOURCES_ROWS.items():
        assert expected.get(name) == spec, f"{name}: {expected.get(name)} != sources §5: {spec}"
    per_layer = {}
    for name in expected:
        m = re.match(r"language_model\.model\.layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + 1
    assert per_layer[0] == 12 and all(per_layer[i] == 3470 for i in range(1, 61)) and len(per_layer) == 61
    assert sum(n.startswith("vision_tower.") for n in expected) == 329
    assert sum(n.startswith("mm_projector.") for n in expected) == 6
    assert not any(n.startswith("language_model.model.layers.61.") for n in expected)  # no MTP layer (sources §5)
    # Only routed experts are INT4; nothing else is int32.
    assert all(".mlp.experts." in n for n, (_, d) in expected.items() if d == "I32")
    assert not any(n.endswith(".weight") and ".mlp.experts." in n for n in expected)
    assert expected_tensors(k25_config, include_vision=False).keys() == {
        n for n in expected if not n.startswith(("vision_tower.", "mm_projector."))}


def test_expected_tensors_flat_layout(k25_config, flat_config):
    flat = expected_tensors(flat_config)
    text = expected_tensors(k25_config, include_vision=False)
    assert flat == {flat_name(n, k25_config): spec for n, spec in text.items()}
    assert "lm_head.weight" in flat and "model.layers.60.mlp.experts.383.down_proj.weight_packed" in flat
    assert not any(n.startswith(("language_model.", "vision_tower.", "mm_projector.")) for n in flat)


def test_quantization_ignore_list_decides(k25_config):
    # Drop the ignore rule for shared experts: they become INT4 (the list is read, not assumed).
    q = k25_config.quantization
    ignore = tuple(r for r in q.ignore if "shared_experts" not in r)
    cfg = mt.tiny_checkpoint_config("kimi_k25")
    cfg = cfg.replace(quantization=dataclasses.replace(q, ignore=ignore))
    expected = expected_tensors(cfg)
    assert "language_model.model.layers.1.mlp.shared_experts.up_proj.weight_packed" in expected
    assert "language_model.model.layers.1.mlp.shared_experts.up_proj.weight" not in expected
    # A rule naming one layer's experts decides for that layer only (the list repeats a layer per kind).
    one_layer = cfg.replace(quantization=dataclasses.replace(q, ignore=q.ignore + (r"re:model\.layers\.2\.mlp\.experts\.[0-3]\.",)))
    listed = expected_tensors(one_layer)
    for layer, expert, dense in ((2, 3, True), (2, 4, False), (1, 3, False)):
        name = f"language_model.model.layers.{layer}.mlp.experts.{expert}.up_proj"
        assert (name + ".weight" in listed, name + ".weight_packed" in listed) == (dense, not dense), name
    none = expected_tensors(cfg.replace(quantization=None))
    assert "language_model.model.layers.1.mlp.experts.0.up_proj.weight" in none
    assert not any(n.endswith("weight_packed") for n in none)


# ---- name mapping ----------------------------------------------------------------------------------------

_parts = st.sampled_from(["embed_tokens.weight", "norm.weight", "layers.3.self_attn.kv_b_proj.weight",
                          "layers.1.mlp.experts.7.up_proj.weight_packed", "layers.0.mlp.down_proj.weight"])


@given(part=_parts)
def test_name_mapping_both_layouts(part, k25_config, flat_config):
    key = "model." + part
    assert checkpoint_name(key, k25_config) == "language_model." + key
    assert flat_name("language_model." + key, k25_config) == key
    assert checkpoint_name(key, flat_config) == key == flat_name(key, flat_config)


def test_name_mapping_special_cases(k25_config, flat_config):
    assert checkpoint_name("lm_head.weight", k25_config) == "language_model.lm_head.weight"
    assert flat_name("language_model.lm_head.weight", k25_config) == "lm_head.weight"
    for v in ("vision_tower.encoder.blocks.0.wqkv.weight", "mm_projector.proj.0.bias"):
        assert checkpoint_name(v, k25_config) == v == flat_name(v, k25_config)
    assert checkpoint_name("lm_head.weight", flat_config) == "lm_head.weight"


def test_rank_tensors_tp2_partition_the_model():
    cfg = mt.tiny_checkpoint_config("kimi_k25")
    full = {flat_name(n, cfg): s for n, s in expected_tensors(cfg).items()}
    ranks = [rank_tensors(cfg, TP(r, 2)) for r in range(2)]
    h = cfg.num_attention_heads
    q_b = "model.layers.1.self_attn.q_b_proj.weight"
    assert ranks[1][q_b][0] == (h // 2 * cfg.qk_head_dim, cfg.q_lora_rank)
    assert ranks[0]["model.layers.1.self_attn.o_proj.weight"][0] == (cfg.hidden_size, h // 2 * cfg.v_head_dim)
    assert ranks[1]["lm_head.weight"][0] == (cfg.vocab_size // 2, cfg.hidden_size)
    assert ranks[0]["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == full["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    experts = [{int(k.split(".")[5]) for k in r if ".mlp.experts." in k} for r in ranks]
    assert experts == [set(range(0, 4)), set(range(4, 8))]
    # Every element of every tensor is held by exactly one rank, or (replicated) by both.
    for key, (shape, _) in full.items():
        held = [r[key][0] for r in ranks if key in r]
        n = int(np.prod(shape))
        assert sum(int(np.prod(s)) for s in held) in (n, 2 * n), key


# ---- the tiny checkpoint's format ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["kimi_k25", "flat"])
def test_make_tiny_format(tiny_dirs, layout):
    path = tiny_dirs[layout]
    cfg = load_config(path)
    assert cfg.layout == ("kimi_k25" if layout == "kimi_k25" else "flat")
    assert cfg.quantization is not None and cfg.quantization.group_size == 32
    raw = json.loads((path / "config.json").read_text())
    if layout == "kimi_k25":
        assert raw["model_type"] == "kimi_k25" and "quantization_config" in raw["text_config"]
        assert "vision_config" in raw and "quantization_config" not in raw  # sources §1: only under text_config
    else:
        assert raw["model_type"] == "kimi_k2" and "quantization_config" in raw and "text_config" not in raw
    index = _index(path)
    assert set(index) == {"metadata", "weight_map"}
    expected = expected_tensors(cfg)
    assert set(index["weight_map"]) == set(expected)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):06d}\.safetensors", s) for s in shards), shards
    total = 0
    for shard in shards:
        header = read_header(path / shard)
        assert header.metadata == {"format": "pt"}
        for name, info in header.entries.items():
            assert index["weight_map"][name] == shard
            assert (tuple(info["shape"]), info["dtype"]) == expected[name], name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    assert index["metadata"]["total_size"] == total
    assert (path / "tiktoken.model").read_bytes() == (DATA / "tokenizer" / "tiktoken.model").read_bytes()
    # the demo tokenizer config, plus the chat template variant the checkpoint is to be chatted with
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config.pop("kimi_ref_chat_variant") == mt.DEFAULT_VARIANTS[layout]
    assert tokenizer_config == json.loads((DATA / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    has_vision = any(n.startswith("vision_tower.") for n in index["weight_map"])
    assert has_vision == (layout == "kimi_k25")
    assert (path / "preprocessor_config.json").is_file() == (layout == "kimi_k25")
    assert Checkpoint.open(path).problems == [] and Checkpoint.open(path).check_weight_shapes() == []


def test_make_tiny_int4_is_compressed_tensors_packing(tiny_dirs):
    """The experts are the bf16 init quantized exactly as compressed-tensors does (int4.quantize is
    bit-exact to it, tests/test_int4.py), packed excess-8, with weight_shape = [out, in]."""
    path = tiny_dirs["kimi_k25"]
    cfg = load_config(path)
    name = "language_model.model.layers.2.mlp.experts.5.down_proj"
    stored = load_file(str(path / _shard_of(path, name + ".weight_packed")))
    packed, scale, shape = (stored[f"{name}.{p}"] for p in ("weight_packed", "weight_scale", "weight_shape"))
    out_f, in_f = cfg.hidden_size, cfg.moe_intermediate_size
    assert shape.dtype == torch.int32 and shape.tolist() == [out_f, in_f]
    assert packed.dtype == torch.int32 and scale.dtype == torch.bfloat16
    dense = mt._init(flat_name(name, cfg) + ".weight", (out_f, in_f), 0).to(torch.bfloat16)
    want_packed, want_scale = int4.quantize(dense, 32)
    assert torch.equal(packed, want_packed) and torch.equal(scale, want_scale)
    # The numpy twin reads the same words to the same values; every group reaches the grid's edge.
    q = oracle_int4.unpack(packed.numpy(), (out_f, in_f))
    assert q.min() >= -8 and q.max() <= 7
    assert (np.abs(q.reshape(out_f, -1, 32)).max(axis=2) >= 7).all()
    w64 = oracle_int4.dequantize(packed.numpy(), scale.float().numpy(), (out_f, in_f))
    assert np.array_equal(w64, int4.dequantize(packed, scale, (out_f, in_f)).double().numpy())


def test_make_tiny_layouts_hold_the_same_text_weights(tiny_dirs):
    a, b = tiny_dirs["kimi_k25"], tiny_dirs["flat"]
    ca = load_config(a)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    ta = load_file(str(a / _shard_of(a, checkpoint_name(name, ca))))[checkpoint_name(name, ca)]
    tb = load_file(str(b / _shard_of(b, name)))[name]
    assert torch.equal(ta, tb)
    bias = load_file(str(a / _shard_of(a, "language_model.model.layers.1.mlp.gate.e_score_correction_bias")))
    b_t = bias["language_model.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert b_t.dtype == torch.float32 and b_t.abs().min() > 0


# ---- strict errors ---------------------------------------------------------------------------------------

EXPERT = "language_model.model.layers.1.mlp.experts.3.up_proj"
Q_B = "language_model.model.layers.1.self_attn.q_b_proj.weight"


def test_error_missing_tensor(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    file = _shard_of(path, Q_B)
    _rewrite(path, file, lambda t: t.pop(Q_B))
    index = _index(path)
    del index["weight_map"][Q_B]
    (path / INDEX_FILE).write_text(json.dumps(index))
    msg = _problems(path)
    # 8 heads × (16 nope + 8 rope) rows, q_lora_rank 48 columns
    assert f"missing tensor '{Q_B}' (BF16 [192, 48]), required by {path / 'config.json'}" in msg
    assert "config.json" in msg and "config.json" in msg  # what was expected, and who requires it


def test_error_unexpected_tensor(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    extra = "language_model.model.layers.1.self_attn.rotary_emb.inv_freq"
    file = _shard_of(path, Q_B)
    _rewrite(path, file, lambda t: t.__setitem__(extra, torch.zeros(4)))
    index = _index(path)
    index["weight_map"][extra] = file
    (path / INDEX_FILE).write_text(json.dumps(index))
    msg = _problems(path)
    assert f"unexpected tensor '{extra}' in {path / file}" in msg


def test_error_unindexed_tensor_and_wrong_shard(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    right = _shard_of(path, Q_B)
    index = _index(path)
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][Q_B] = wrong
    (path / INDEX_FILE).write_text(json.dumps(index))
    msg = _problems(path)
    assert f"tensor '{Q_B}': {INDEX_FILE} places it in {wrong}, which does not contain it; it is in {right}" in msg


def test_error_wrong_shape_and_dtype(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    norm = "language_model.model.layers.1.input_layernorm.weight"

    def edit(t):
        t[Q_B] = t[Q_B][:-1].clone()
        t[norm] = t[norm].float()

    file = _shard_of(path, Q_B)
    _rewrite(path, file, edit)
    msg = _problems(path)
    assert f"tensor '{Q_B}' in {path / file}: shape [191, 48], expected [192, 48]" in msg
    assert f"tensor '{norm}' in {path / file}: dtype F32, expected BF16" in msg


def test_error_int4_widths_and_weight_shape(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    other = "language_model.model.layers.1.mlp.experts.4.gate_proj"

    def edit(t):
        t[EXPERT + ".weight_packed"] = t[EXPERT + ".weight_packed"][:, :-1].clone()
        t[EXPERT + ".weight_scale"] = torch.cat([t[EXPERT + ".weight_scale"]] * 2, dim=1)
        t[other + ".weight_shape"] = torch.tensor([32, 32], dtype=torch.int32)

    _rewrite(path, _shard_of(path, EXPERT + ".weight_packed"), edit)
    msg = _problems(path)
    assert "packed width 7 != in_features/8 = 64/8 = 8" in msg and EXPERT + ".weight_packed" in msg
    assert "scale width 4 != in_features/32 = 64/32 = 2" in msg and EXPERT + ".weight_scale" in msg
    assert f"tensor '{other}.weight_shape'" in msg and "holds [32, 32], but the config's Linear is [out, in] = [32, 64]" in msg


def test_weight_shape_int64_accepted(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["flat"], tmp_path)
    name = "model.layers.1.mlp.experts.0.down_proj.weight_shape"
    _rewrite(path, _shard_of(path, name), lambda t: t.__setitem__(name, t[name].long()))
    ckpt = Checkpoint.open(path)
    assert ckpt.problems == [] and ckpt.check_weight_shapes() == []


def test_error_truncated_shard(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    file = _shard_of(path, Q_B)
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) - 100])
    msg = _problems(path)
    assert str(path / file) in msg and "truncated" in msg
    # A file cut inside its header, and one shorter than the length field.
    (path / file).write_bytes(data[:50])
    assert "truncated: header of" in _problems(path)
    (path / file).write_bytes(data[:3])
    assert "not even the 8-byte header length" in _problems(path)


@pytest.fixture(scope="module")
def shard_bytes(tiny_dirs):
    path = tiny_dirs["kimi_k25"]
    return path / _shard_of(path, Q_B), (path / _shard_of(path, Q_B)).read_bytes()


@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_any_truncation_is_an_error_naming_the_file(shard_bytes, fraction, tmp_path_factory):
    src, data = shard_bytes
    cut = tmp_path_factory.mktemp("cut") / src.name
    cut.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(CheckpointError, match=re.escape(str(cut)) + ".*truncated"):
        read_header(cut)


def test_error_shard_missing_from_disk(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    file = _shard_of(path, Q_B)
    (path / file).unlink()
    msg = _problems(path)
    assert f"{path / file}: shard missing from disk" in msg


def test_error_bad_index(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["kimi_k25"], tmp_path)
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(path / INDEX_FILE)) + ".*not valid JSON"):
        Checkpoint.open(path)
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="needs a 'weight_map' object"):
        Checkpoint.open(path)
    (path / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint.open(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(path / "config.json")


def test_single_file_checkpoint(tiny_dirs, tmp_path):
    """A checkpoint may also be one ``model.safetensors`` (no index)."""
    src = tiny_dirs["flat"]
    path = tmp_path / "single"
    path.mkdir()
    shutil.copy(src / "config.json", path / "config.json")
    tensors = {}
    for shard in sorted(set(_index(src)["weight_map"].values())):
        tensors.update(load_file(str(src / shard)))
    save_file(tensors, str(path / "model.safetensors"))
    ckpt = Checkpoint.open(path)
    assert ckpt.problems == [] and ckpt.shard_files == ["model.safetensors"]
    shutil.copy(src / INDEX_FILE, path / INDEX_FILE)
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        Checkpoint.open(path)


def test_read_slice_reads_the_rows(tiny_dirs):
    path = tiny_dirs["kimi_k25"]
    ckpt = Checkpoint.open(path)
    full = ckpt.read(Q_B)
    assert torch.equal(ckpt.read(Q_B, 0, 16, 16), full[16:32])
    o = "language_model.model.layers.2.self_attn.o_proj.weight"
    assert torch.equal(ckpt.read(o, 1, 64, 64), ckpt.read(o)[:, 64:])  # 8 heads × v 16 = 128 columns


# ---- loading into the torch model ------------------------------------------------------------------------

IDS = np.array([[1, 7, 300, 4000, 4095, 42, 9, 1234, 77], [5, 3, 2, 1, 0, 4094, 100, 2000, 3000]])


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {layout: load_model(path, dtype=torch.float32, progress=False) for layout, path in tiny_dirs.items()}


@pytest.mark.parametrize("layout", ["kimi_k25", "flat"])
def test_load_model_equals_oracle(tiny_dirs, models, layout):
    model = models[layout]
    logits = model(torch.from_numpy(IDS))
    assert logits.dtype == torch.float32 and logits.shape == (2, 9, 4096)
    assert_close(logits, oracle_forward(tiny_dirs[layout], IDS), torch.float32, what=f"{layout} logits vs oracle")
    # INT4 experts stay packed; the router bias stays fp32 whatever the model dtype.
    sd = model.state_dict()
    assert sd["model.layers.1.mlp.experts.0.up_proj.weight_packed"].dtype == torch.int32
    assert sd["model.layers.1.mlp.experts.0.up_proj.weight_scale"].dtype == torch.bfloat16
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(k.endswith("experts.0.up_proj.weight") for k in sd)


def _as_flat(src: Path, dst: Path) -> Path:
    """The kimi_k25 checkpoint rewritten in the flat layout: same text config and tensors, ``model.*``
    names, top-level quantization_config, no vision."""
    cfg = load_config(src)
    dst.mkdir()
    flat_cfg = cfg.replace(layout="flat", model_type="kimi_k2", vision=None, media_placeholder_token_id=None)
    flat_cfg.save(dst / "config.json")
    index = _index(src)
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {flat_name(n, cfg): t for n, t in load_file(str(src / shard)).items()
                   if not n.startswith(("vision_tower.", "mm_projector."))}
        if tensors:
            save_file(tensors, str(dst / shard))
            weight_map.update(dict.fromkeys(tensors, shard))
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_both_layouts_same_logits(tiny_dirs, models, tmp_path):
    ids = torch.from_numpy(IDS)
    flat = load_model(_as_flat(tiny_dirs["kimi_k25"], tmp_path / "flat"), dtype=torch.float32, progress=False)
    assert not hasattr(flat, "vision_tower") and hasattr(models["kimi_k25"], "vision_tower")
    assert torch.equal(flat(ids), models["kimi_k25"](ids))
    # make_tiny's flat layout is K2-Thinking-style: beta_fast 1 instead of 32, same weights. The config
    # decides, so the logits differ (the first position has no rotation and agrees).
    other = models["flat"](ids)
    assert models["flat"].config.rope.beta_fast == 1.0 != models["kimi_k25"].config.rope.beta_fast
    assert torch.allclose(other[:, 0], flat(ids)[:, 0], atol=1e-5) and not torch.allclose(other, flat(ids), atol=1e-3)


def test_load_model_values_and_dtype(tiny_dirs, models):
    ckpt = Checkpoint.open(tiny_dirs["kimi_k25"])
    sd = models["kimi_k25"].state_dict()
    for name in ("language_model.lm_head.weight", "vision_tower.encoder.blocks.1.wqkv.bias", Q_B):
        assert torch.equal(sd[flat_name(name, ckpt.config)], ckpt.read(name).float()), name
    bf16 = kimi_ref.load_model(tiny_dirs["flat"], progress=False)  # default: the config's dtype
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_load_model_refuses(tiny_dirs, tmp_path):
    with pytest.raises(TPError, match="--tp 3 does not divide the model"):
        load_model(tiny_dirs["flat"], tp=TP(0, 3), progress=False)
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
        load_model(tiny_dirs["flat"], dtype="float8", progress=False)
    path = _copy(tiny_dirs["flat"], tmp_path)
    name = "model.layers.2.mlp.experts.6.gate_proj.weight_shape"
    _rewrite(path, _shard_of(path, name), lambda t: t.__setitem__(name, torch.tensor([64, 32], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' in {path / _shard_of(path, name)}: holds [64, 32], "
                                                        "but the config's Linear is [out, in] = [32, 64]")):
        load_model(path, progress=False)
    (path / "model-00002-of-000004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path / "model-00002-of-000004.safetensors")) + ": shard missing"):
        load_model(path, progress=False)


def test_tp2_ranks_read_only_their_slices(tiny_dirs, models, monkeypatch):
    path = tiny_dirs["kimi_k25"]
    full = models["kimi_k25"].state_dict()
    cfg = load_config(path)
    reads: list[tuple[str, int | None, int, int]] = []
    real = checkpoint._read_slice

    def logged(handle, name, dim, start, size):
        reads.append((name, dim, start, size))
        return real(handle, name, dim, start, size)

    monkeypatch.setattr(checkpoint, "_read_slice", logged)
    for rank in range(2):
        reads.clear()
        model = load_model(path, dtype=torch.float32, tp=TP(rank, 2), progress=False)
        sd = model.state_dict()
        mine = {e for e in range(rank * 4, rank * 4 + 4)}
        experts = {int(k.split(".")[5]) for k in sd if ".mlp.experts." in k}
        assert experts == mine
        for key, value in sd.items():
            dim, start, size = rank_slice(key, tuple(full[key].shape), cfg, TP(rank, 2))
            want = full[key] if dim is None else full[key].narrow(dim, start, size)
            assert torch.equal(value, want), key
        read_names = [flat_name(n, cfg) for n, *_ in reads]
        assert sorted(read_names) == sorted(sd), "a rank read a tensor it does not hold"
        for name, dim, start, size in reads:
            if name.endswith("q_b_proj.weight"):  # 4 of 8 heads × (16 nope + 8 rope) rows
                assert (dim, start, size) == (0, rank * 96, 96)
            if name.endswith("o_proj.weight"):  # 4 of 8 heads × 16 value columns
                assert (dim, start, size) == (1, rank * 64, 64)
            if name.endswith("lm_head.weight"):
                assert (dim, start, size) == (0, rank * 2048, 2048)
            if name.startswith("vision_tower.") or "kv_a_proj" in name:
                assert dim is None


def test_load_layer_equals_the_layer_in_the_model(tiny_dirs, models):
    path = tiny_dirs["kimi_k25"]
    model = models["kimi_k25"]
    seen = {}
    layer_idx = 2
    hook = model.model.layers[layer_idx].register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(x=args[0], kw=kwargs, out=out), with_kwargs=True)
    try:
        model(torch.from_numpy(IDS))
    finally:
        hook.remove()
    args = (seen["x"], torch.arange(IDS.shape[1]))
    layer = load_layer(path, layer_idx)
    assert torch.equal(layer(*args), seen["out"])
    # Only some experts: the partial sum, i.e. the full layer with the other experts zeroed.
    subset = load_layer(path, layer_idx, experts=[1, 6])
    assert sorted(subset.mlp.experts.keys()) == ["1", "6"]
    zeroed = load_layer(path, layer_idx)
    for e, expert in zeroed.mlp.experts.items():
        if e not in ("1", "6"):
            for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
                proj.weight_scale.zero_()
    assert_close(subset(*args), zeroed(*args).double(), torch.float32, what="layer with experts 1, 6")
    with pytest.raises(CheckpointError, match="layer 3 is outside 0..2"):
        load_layer(path, 3)
    with pytest.raises(CheckpointError, match=r"experts \[8\] are outside 0..7"):
        load_layer(path, 1, experts=[8])


@pytest.mark.slow
def test_full_size_model_on_meta_matches_the_tensor_list(k25_config):
    """The real-config model (no weights): its state dict is exactly the 208,550 checkpoint tensors."""
    from kimi_ref.model import KimiForCausalLM
    from weights_tools.memory_plan import weight_bytes

    model = KimiForCausalLM(k25_config, dtype=torch.bfloat16, device="meta")
    sd = model.state_dict(keep_vars=True)
    expected = {flat_name(n, k25_config): s for n, s in expected_tensors(k25_config).items()}
    assert len(sd) == len(expected) == 208_550
    assert sd.keys() == expected.keys()
    wrong = [k for k, t in sd.items() if (tuple(t.shape), t.dtype) != (expected[k][0], checkpoint.DTYPES[expected[k][1]])]
    assert wrong == []
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert total == sum(weight_bytes(k25_config, 1).values())  # memory_plan agrees with the model at TP 1


def test_mtp_layers_are_skipped_only_when_the_config_has_them(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["flat"], tmp_path)
    extra = "model.layers.3.eh_proj.weight"  # a DeepSeek-V3 MTP tensor, one layer past the last
    file = _shard_of(path, "model.norm.weight")
    _rewrite(path, file, lambda t: t.__setitem__(extra, torch.zeros(2, 2, dtype=torch.bfloat16)))
    index = _index(path)
    index["weight_map"][extra] = file
    (path / INDEX_FILE).write_text(json.dumps(index))
    assert f"unexpected tensor '{extra}'" in _problems(path)
    load_config(path).replace(num_nextn_predict_layers=1).save(path / "config.json")
    ckpt = Checkpoint.open(path)
    assert ckpt.problems == [] and ckpt.mtp == [extra]
    model = load_model(path, dtype=torch.float32, progress=False)
    assert extra not in model.state_dict()


# ---- chapter 08 solutions --------------------------------------------------------------------------------


def _solutions():
    return load_solutions("08_model")


def test_chapter_08_solutions(k25_config, tiny_dirs):
    sol = _solutions()
    total, active = sol.parameter_counts(k25_config)
    assert 1.02e12 < total < 1.03e12 and 32e9 < active < 33.5e9  # "1T total, 32B activated"
    # Independent count of the active weights from sources §5 shapes.
    attn = 1536 * 7168 + 1536 + 12288 * 1536 + 576 * 7168 + 512 + 16384 * 512 + 7168 * 8192
    want_active = (61 * (attn + 2 * 7168) + 3 * 18432 * 7168 + 60 * (384 * 7168 + 384 + 9 * 3 * 2048 * 7168)
                   + 2 * 163840 * 7168 + 7168)
    assert active == want_active and total == want_active + 60 * (384 - 8) * 3 * 2048 * 7168
    assert sol.kv_cache_bytes_per_token(k25_config) == 61 * 576 * 2
    assert sol.kv_cache_bytes_per_token(k25_config, "naive") == 61 * 64 * (192 + 128) * 2
    cfg = load_config(tiny_dirs["flat"])
    for mode in ("absorbed", "naive"):
        from kimi_ref.model import KimiForCausalLM

        model = KimiForCausalLM(cfg, dtype=torch.float32, mla_mode=mode)
        assert model.new_cache(1, 8).bytes_per_token() == sol.kv_cache_bytes_per_token(cfg, mode, itemsize=4)
    with pytest.raises(ValueError, match="mode must be"):
        sol.kv_cache_bytes_per_token(cfg, "flash")
    from weights_tools.memory_plan import weight_bytes

    assert sol.rank_read_bytes(k25_config, 8, 3) == sum(weight_bytes(k25_config, 8).values())
    assert sum(sol.rank_read_bytes(cfg, 2, r) for r in range(2)) > sol.rank_read_bytes(cfg, 1)


# ---- the tensor list comes from the model --------------------------------------------------------------


def _variants():
    """Every fixture config, full size and tiny, plus tiny ones that flip each switch the list depends on."""
    real = [load_config(fixture_path(n)) for n in ("kimi_k25", "kimi_k2_thinking")]
    tiny = [mt.tiny_checkpoint_config(layout) for layout in ("kimi_k25", "flat")]
    t = tiny[0]
    q = t.quantization
    flipped = [
        t.replace(attention_bias=True), t.replace(q_lora_rank=None), t.replace(tie_word_embeddings=True),
        t.replace(n_shared_experts=0), t.replace(n_shared_experts=2), t.replace(dtype="float16"), t.replace(dtype=None),
        t.replace(first_k_dense_replace=5), t.replace(moe_layer_freq=2), t.replace(quantization=None),
        t.replace(first_k_dense_replace=0), t.replace(first_k_dense_replace=2, moe_layer_freq=2, num_hidden_layers=7),
        t.replace(quantization=dataclasses.replace(q, ignore=tuple(r for r in q.ignore if "shared" not in r))),
        t.replace(v_head_dim=24), tiny[1].replace(attention_bias=True),
    ]
    return real + tiny + flipped


def test_expected_tensors_equal_the_oracles_independent_list():
    """The torch list (read off the model) against the oracle's (written from the equations): every text
    tensor's shape, INT4 parts folded back into the Linear they store, and each tensor's dtype by the
    checkpoint rules (I32 packed words and shapes, BF16 scales, F32 router bias, the config dtype else)."""
    for cfg in _variants():
        declared = {None: "BF16", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}[cfg.dtype]
        dense: dict[str, tuple[int, ...]] = {}
        for name, (shape, tag) in expected_tensors(cfg, include_vision=False).items():
            key = flat_name(name, cfg)
            module, _, part = key.rpartition(".")
            want = {"weight_packed": "I32", "weight_shape": "I32", "weight_scale": "BF16"}.get(part, declared)
            if part == "e_score_correction_bias":
                want = "F32"
            assert tag == want, f"{cfg.source}: {name} is {tag}, expected {want}"
            if part == "weight_packed":
                dense[module + ".weight"] = (shape[0], shape[1] * int4.PACK_FACTOR)
            elif part not in ("weight_scale", "weight_shape"):
                dense[key] = shape
        assert dense == oracle_checkpoint.expected_tensors(cfg), cfg.source


def test_expected_tensors_build_the_model_on_meta_only():
    """No weight is made or initialised while listing (no memory, no init work): every op that makes a real
    tensor is the rotary table's qk_rope_head_dim/2 frequencies, the only thing the model computes when built."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class RealTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.shapes += [(str(func), tuple(t.shape)) for t in tree_flatten(out)[0]
                            if isinstance(t, torch.Tensor) and t.device.type != "meta"]
            return out

    cfg = mt.tiny_checkpoint_config("kimi_k25").replace(num_hidden_layers=2)  # a config no other test has cached
    seen = RealTensors()
    with seen:
        listed = expected_tensors(cfg)
    assert len(listed) > 0
    rotary = (cfg.qk_rope_head_dim // 2,)
    assert all(shape in (rotary, ()) for _, shape in seen.shapes), [s for s in seen.shapes if s[1] not in (rotary, ())]
