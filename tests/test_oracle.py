"""The float64 oracle: HF transformers' DeepseekV3 as its peer, and its own invariants.

* Peer: a tiny random ``DeepseekV3ForCausalLM`` in float64 (tests/hf_twins.py), layer by layer (MoE,
  dense MLP, both MLA forms) and end to end via ``save_pretrained`` + ``kimi_ref.oracle.forward``. The
  per-concept peers live with their concept: RoPE in test_rope.py, RMSNorm in test_norms.py, the
  router in test_router.py.
* Invariants at float64 tolerance: naive MLA == absorbed MLA; prefill + decode steps == one forward.
* The safetensors reader against the safetensors library, both weight layouts, shards, MTP and vision
  tensors skipped, INT4 experts (packed by compressed-tensors) dequantized; every error it raises.
* The oracle never imports torch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from tolerances import assert_close

from hf_twins import F32, F64, KIMI_TINY, configs, hf_checkpoint, hf_model, make_config, random_weights, t
from kimi_ref.config import KimiConfig
from kimi_ref.oracle import checkpoint, experts, forward, mla, model, rope
from kimi_ref.oracle.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The whole oracle against HF: layer pieces, logits, tied embeddings
# ------------------------------------------------------------------------------------------------


@given(c=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(1, 24),
       x_scale=st.sampled_from([1e-3, 1.0]))
@example(c=KIMI_TINY, seed=1, batch=2, length=20, x_scale=1.0)
def test_layer_pieces_match_hf(c, seed, batch, length, x_scale):
    """Dense MLP, MoE and both MLA forms, fed the same input as HF's modules (weights via save_pretrained)."""
    with tempfile.TemporaryDirectory() as d:
        m, config, weights = hf_checkpoint(c, seed, Path(d))
    x = x_scale * np.random.default_rng(seed + 1).standard_normal((batch, length, c.hidden_size))
    with torch.no_grad():
        layer0, layer1 = m.model.layers[0], m.model.layers[1]
        dense = experts.dense_mlp(x.reshape(-1, c.hidden_size), model.sub_weights(weights, "model.layers.0.mlp."))
        assert_close(dense.reshape(x.shape), layer0.mlp(t(x)), F64, what="dense MLP")  # HF's MLP is pure float64
        moe = experts.moe(x.reshape(-1, c.hidden_size), model.sub_weights(weights, "model.layers.1.mlp."), config)
        assert_close(moe.reshape(x.shape), layer1.mlp(t(x)), F32, what="MoE")

        positions = np.arange(length)
        cos_sin = m.model.rotary_emb(t(x), t(positions)[None])
        mask = torch.full((length, length), -math.inf, dtype=torch.float64).triu(1)[None, None]
        attn_w = model.sub_weights(weights, "model.layers.1.self_attn.")
        expected = layer1.self_attn(t(x), position_embeddings=cos_sin, attention_mask=mask)[0]
        for form in ("naive", "absorbed"):
            assert_close(mla.mla(x, attn_w, config, positions, form=form), expected, F32, what=f"MLA {form}")


@given(c=configs(layers=3), seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(1, 24))
@example(c=make_config(layers=3), seed=2, batch=2, length=24)
def test_logits_match_hf(c, seed, batch, length):
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, (batch, length))
    with tempfile.TemporaryDirectory() as d:
        m = hf_model(c, seed)
        m.save_pretrained(d)
        ours = forward(d, ids)
    with torch.no_grad():
        expected = m(t(ids)).logits
    assert ours.dtype == np.float64 and ours.shape == (batch, length, c.vocab_size)
    assert_close(ours, expected, F32, what="logits vs HF DeepseekV3")


def test_tied_embeddings_match_hf(tmp_path):
    c = make_config(tied=True)
    m = hf_model(c, 12)
    m.save_pretrained(tmp_path)
    config, weights = checkpoint.load_weights(tmp_path)
    assert config.tie_word_embeddings and "lm_head.weight" not in weights  # HF saves the shared tensor once
    ids = np.random.default_rng(12).integers(0, c.vocab_size, (1, 9))
    with torch.no_grad():
        expected = m(t(ids)).logits
    assert_close(forward(tmp_path, ids), expected, F32, what="tied-embedding logits")


# ------------------------------------------------------------------------------------------------
# Oracle invariants (float64 tolerance)
# ------------------------------------------------------------------------------------------------


@given(c=configs(layers=3), seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(1, 20))
@example(c=KIMI_TINY, seed=3, batch=2, length=20)
def test_naive_mla_equals_absorbed_mla(c, seed, batch, length):
    w = random_weights(c, seed)
    x = np.random.default_rng(seed).standard_normal((batch, length, c.hidden_size))
    attn = model.sub_weights(w, "model.layers.0.self_attn.")
    positions = np.arange(length)
    assert_close(mla.mla(x, attn, c, positions, form="absorbed"), mla.mla(x, attn, c, positions, form="naive"), F64,
                 what="MLA absorbed vs naive")
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, (batch, length))
    assert_close(model.logits(ids, w, c, form="absorbed"), model.logits(ids, w, c, form="naive"), F64,
                 what="logits absorbed vs naive")


@given(c=configs(layers=3), seed=st.integers(0, 2**16), length=st.integers(2, 20), data=st.data(),
       forms=st.sampled_from([("absorbed", "absorbed"), ("naive", "naive"), ("naive", "absorbed")]))
@example(c=KIMI_TINY, seed=4, length=20, data=None, forms=("absorbed", "absorbed"))
def test_prefill_then_decode_equals_one_forward(c, seed, length, data, forms):
    prefill = data.draw(st.integers(1, length - 1)) if data is not None else 7
    w = random_weights(c, seed)
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, (2, length))
    full = model.logits(ids, w, c, form="naive")

    cache = model.new_cache(c)
    steps = [model.logits(ids[:, :prefill], w, c, cache=cache, form=forms[0])]
    for i in range(prefill, length):  # one token at a time, positions continuing from the cache
        steps.append(model.logits(ids[:, i:i + 1], w, c, cache=cache, form=forms[1]))
    assert_close(np.concatenate(steps, axis=1), full, F64, what=f"prefill {prefill} + decode ({forms}) vs forward")
    # the cache holds exactly kv_lora_rank + qk_rope_head_dim numbers per token per layer
    assert len(cache) == c.num_hidden_layers
    for layer in cache:
        assert set(layer) == {"latent", "k_rope"}
        assert layer["latent"].shape == (2, length, c.kv_lora_rank)
        assert layer["k_rope"].shape == (2, length, c.qk_rope_head_dim)


def test_cache_holds_the_normalized_latent_and_the_rotated_rope_key():
    c = KIMI_TINY
    w = model.sub_weights(random_weights(c, 5), "model.layers.0.self_attn.")
    x = 1e-3 * np.random.default_rng(5).standard_normal((1, 6, c.hidden_size))  # small: eps 1e-6 vs 1e-5 shows
    cache: dict = {}
    mla.mla(x, w, c, np.arange(6), cache, form="absorbed")
    kv = x @ w["kv_a_proj_with_mqa.weight"].T
    latent, k_rope = kv[..., :c.kv_lora_rank], kv[..., c.kv_lora_rank:]
    ms = np.mean(latent ** 2, -1, keepdims=True)
    assert_close(cache["latent"], latent / np.sqrt(ms + 1e-6) * w["kv_a_layernorm.weight"], F64, what="cached latent")
    with pytest.raises(AssertionError):  # the config's eps 1e-5 would give a measurably different latent
        assert_close(cache["latent"], latent / np.sqrt(ms + 1e-5) * w["kv_a_layernorm.weight"], F64, what="eps")
    cos, sin = rope.cos_sin(np.arange(6), c.rope, c.qk_rope_head_dim)
    assert_close(cache["k_rope"], rope.apply_rope(k_rope, cos, sin), F64, what="cached rope key (after RoPE)")


def test_bad_inputs_to_the_oracle():
    c = KIMI_TINY
    w = random_weights(c, 6)
    for ids, message in ((np.array([1, 2, 3]), "batch, time"), (np.array([[1, 300]]), "outside the vocabulary"),
                         (np.array([[1.5]]), "integers"), (np.zeros((1, 0), int), "no tokens")):
        with pytest.raises(ValueError, match=message):
            model.logits(ids, w, c)
    with pytest.raises(ValueError, match="form"):
        mla.mla(np.zeros((1, 2, c.hidden_size)), model.sub_weights(w, "model.layers.0.self_attn."), c, np.arange(2),
                form="fast")
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model.logits(np.array([[1]]), w, c, cache=[{}])


# ------------------------------------------------------------------------------------------------
# The checkpoint reader
# ------------------------------------------------------------------------------------------------


def test_reader_reads_every_dtype_like_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64), "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(), "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (3,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    save_torch(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got = checkpoint.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for name, expected in tensors.items():
        want = expected.float().numpy() if expected.dtype == torch.bfloat16 else expected.numpy()
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def _write_raw(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("case, message", [
    ("short", "shorter than the 8-byte header"),
    ("header_past_end", "runs past the end of the file"),
    ("bad_json", "not valid JSON"),
    ("unknown_dtype", "tensor 'w' has unknown dtype 'F8_E4M3'"),
    ("truncated", "tensor 'w' lies at bytes \\[0, 64\\) of the data section, which holds only 40 bytes: truncated"),
    ("size_mismatch", "tensor 'w' \\(F32 \\[4, 4\\]\\) needs 64 bytes"),
    ("bad_entry", "tensor 'w': header entry must have"),
])
def test_reader_errors_name_the_file_and_tensor(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    entry = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    if case == "short":
        path.write_bytes(b"\x10\x00\x00")
    elif case == "header_past_end":
        _write_raw(path, {"w": entry}, bytes(64), length=10_000)
    elif case == "bad_json":
        path.write_bytes((5).to_bytes(8, "little") + b"{nope" + bytes(8))
    elif case == "unknown_dtype":
        _write_raw(path, {"w": {**entry, "dtype": "F8_E4M3"}}, bytes(64))
    elif case == "truncated":
        _write_raw(path, {"w": entry}, bytes(40))
    elif case == "size_mismatch":
        _write_raw(path, {"w": {**entry, "data_offsets": [0, 60]}}, bytes(64))
    elif case == "bad_entry":
        _write_raw(path, {"w": {"dtype": "F32"}}, b"")
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoint.read_safetensors(path)
    assert str(path) in str(err.value)


def test_truncating_a_real_checkpoint_is_caught(tmp_path):
    hf_model(KIMI_TINY, 7).save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' lies at bytes .* truncated file"):
        checkpoint.load_weights(tmp_path)


def _write_k25_layout(c: KimiConfig, weights: dict[str, np.ndarray], directory: Path, *, shards: int = 2,
                      extra: dict[str, np.ndarray] | None = None) -> None:
    """Write ``weights`` (flat names) the way K2.5 ships: language_model. prefix, an index, several shards."""
    directory.mkdir(parents=True, exist_ok=True)
    c.save(directory / "config.json")
    stored = {"language_model." + k: v for k, v in weights.items()}
    stored.update(extra or {})
    names = sorted(stored)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(stored[n]) for n in names[i::shards]}
        save_numpy(part, directory / shard)
        weight_map.update({n: shard for n in part})
    (directory / checkpoint.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_kimi_k25_layout_with_shards_vision_and_mtp_equals_the_flat_checkpoint(tmp_path):
    c = KIMI_TINY
    ids = np.random.default_rng(8).integers(0, c.vocab_size, (2, 11))
    m = hf_model(c, 8)
    m.save_pretrained(tmp_path / "flat")
    _, weights = checkpoint.load_weights(tmp_path / "flat")
    rng = np.random.default_rng(0)
    not_text = {  # MoonViT, its projector and a multi-token-prediction layer: none of them is the text model
        "vision_tower.patch_embed.proj.weight": rng.standard_normal((8, 3, 14, 14)).astype(np.float32),
        "mm_projector.proj.0.weight": rng.standard_normal((4, 4)).astype(np.float32),
        f"language_model.model.layers.{c.num_hidden_layers}.self_attn.q_a_proj.weight": np.zeros((3, 3), np.float32),
    }
    _write_k25_layout(c, weights, tmp_path / "k25", shards=3, extra=not_text)
    config, loaded = checkpoint.load_weights(tmp_path / "k25")
    assert config.layout == "kimi_k25" and set(loaded) == set(weights)
    assert_close(forward(tmp_path / "k25", ids), forward(tmp_path / "flat", ids), F64, what="k25 layout vs flat")


def test_bf16_checkpoint_widens_exactly(tmp_path):
    m = hf_model(KIMI_TINY, 9).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    _, weights = checkpoint.load_weights(tmp_path)
    state = m.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.kv_b_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(weights[name], state[name].double().numpy(), err_msg=name)


def _pack_with_compressed_tensors(q: np.ndarray) -> np.ndarray:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(torch.from_numpy(q.astype(np.int8)), num_bits=4).numpy()


def test_int4_experts_are_dequantized(tmp_path):
    c = make_config(hidden=64, moe_width=32, experts_n=4)  # in-features divisible by the group size 32
    assert c.quantization is not None and c.quantization.group_size == 32
    weights = random_weights(c, 10)
    rng = np.random.default_rng(10)
    stored, dense = {}, dict(weights)
    for name in list(weights):
        module = name.removesuffix(".weight")
        if ".mlp.experts." not in name or not c.quantization.is_quantized(module):
            continue
        out_f, in_f = weights[name].shape
        q = rng.integers(-8, 8, (out_f, in_f))
        scale = torch.rand(out_f, in_f // 32, dtype=torch.float64).bfloat16()  # scales are bf16 in the checkpoint
        dense[name] = q * np.repeat(scale.double().numpy(), 32, axis=1)
        stored[f"language_model.{module}.weight_packed"] = _pack_with_compressed_tensors(q)
        stored[f"language_model.{module}.weight_scale"] = scale
        stored[f"language_model.{module}.weight_shape"] = np.array([out_f, in_f], np.int32)
        del weights[name]
    assert stored, "no expert was quantized"
    c.save(tmp_path / "config.json")
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in stored.items()}
    tensors.update({"language_model." + k: torch.from_numpy(v) for k, v in weights.items()})
    save_torch(tensors, tmp_path / "model.safetensors")
    _, loaded = checkpoint.load_weights(tmp_path)
    assert set(loaded) == set(dense)
    for name, want in dense.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    ids = np.array([[1, 5, 9, 200, 42]])
    assert_close(forward(tmp_path, ids), model.logits(ids, dense, c), F64, what="INT4 checkpoint logits")

    # an incomplete INT4 triple names the module
    del tensors[f"language_model.model.layers.1.mlp.experts.0.up_proj.weight_scale"]
    save_torch(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.0\.up_proj' lacks .*weight_scale"):
        checkpoint.load_weights(tmp_path)


def _flat_checkpoint(directory: Path, c: KimiConfig, weights: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    c.replace(layout="flat").save(directory / "config.json")
    save_numpy({k: np.ascontiguousarray(v) for k, v in weights.items()}, directory / "model.safetensors")


def test_checkpoint_errors_name_the_tensor(tmp_path):
    c = KIMI_TINY.replace(vision=None)
    w = random_weights(c, 11)

    def attempt(name: str, weights: dict, message: str) -> None:
        _flat_checkpoint(tmp_path / name, c, weights)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_weights(tmp_path / name)

    attempt("missing", {k: v for k, v in w.items() if k != "model.layers.1.mlp.experts.3.down_proj.weight"},
            "missing tensor 'model.layers.1.mlp.experts.3.down_proj.weight'")
    attempt("extra", {**w, "model.layers.0.mlp.experts.0.up_proj.weight": np.zeros((2, 2))},
            "unexpected tensor 'model.layers.0.mlp.experts.0.up_proj.weight'")
    attempt("shape", {**w, "model.layers.0.self_attn.kv_b_proj.weight": np.zeros((5, 16))},
            r"'model.layers.0.self_attn.kv_b_proj.weight' has shape \[5, 16\], expected \[60, 16\]")
    attempt("dtype", {**w, "model.norm.weight": np.ones(32, np.int32)}, "'model.norm.weight' has dtype int32")

    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        (tmp_path / "empty").mkdir()
        c.save(tmp_path / "empty" / "config.json")
        checkpoint.load_weights(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.load_weights(tmp_path / "nowhere")

    _write_k25_layout(c.replace(layout="kimi_k25"), w, tmp_path / "sharded")
    index_path = tmp_path / "sharded" / checkpoint.INDEX_FILE
    original_index = json.loads(index_path.read_text())
    index = json.loads(json.dumps(original_index))
    index["weight_map"]["language_model.model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors: safetensors file not found"):
        checkpoint.load_weights(tmp_path / "sharded")
    index = json.loads(json.dumps(original_index))
    moved = next(n for n, shard in index["weight_map"].items() if shard.startswith("model-00002"))
    index["weight_map"][moved] = "model-00001-of-00002.safetensors"  # the index points at the wrong shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"model-00001-of-00002.safetensors: missing tensor '{moved}'"):
        checkpoint.load_weights(tmp_path / "sharded")
    save_numpy({"x": np.zeros(1)}, tmp_path / "sharded" / "model.safetensors")
    with pytest.raises(CheckpointError, match="both model.safetensors and model.safetensors.index.json"):
        checkpoint.load_weights(tmp_path / "sharded")


# ------------------------------------------------------------------------------------------------
# No torch in the oracle
# ------------------------------------------------------------------------------------------------

_NO_TORCH_SCRIPT = textwrap.dedent('''
    import importlib, importlib.abc, pathlib, sys, tempfile

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"blocked: the oracle imported {name}")
            return None

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import kimi_ref.oracle
    for f in sorted(pathlib.Path(kimi_ref.oracle.__file__).parent.glob("*.py")):
        importlib.import_module("kimi_ref.oracle." + f.stem)

    # and run it end to end, INT4 experts included, so lazy imports inside functions are caught too
    from safetensors.numpy import save_file
    from kimi_ref.config import fixture_path, load_config, tiny_config
    from kimi_ref.oracle import checkpoint, forward, int4
    c = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=260, hidden_size=32, num_hidden_layers=2,
                    moe_intermediate_size=32, vision=False)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in checkpoint.expected_tensors(c).items():
        w = rng.standard_normal(shape) * 0.2
        if ".mlp.experts." in name:
            packed, scale = int4.quantize(w.astype(np.float32))
            module = "language_model." + name[: -len(".weight")]
            tensors[module + ".weight_packed"] = packed
            tensors[module + ".weight_scale"] = scale.astype(np.float32)
            tensors[module + ".weight_shape"] = np.array(shape, np.int32)
        else:
            tensors["language_model." + name] = w
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, d + "/model.safetensors")
        c.save(d + "/config.json")
        logits = forward(d, np.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 260) and np.isfinite(logits).all()
    loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    assert not loaded, loaded
    print("no torch")
''')


def test_the_oracle_never_imports_torch():
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr[-3000:]
