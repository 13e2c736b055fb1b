"""Read a checkpoint directory into float64 numpy arrays, with its own safetensors reader.

    load_weights(dir) -> (KimiConfig, {flat name: float64 array})

A checkpoint directory holds ``config.json`` (read through ``kimi_ref.config``) and either one
``model.safetensors`` or ``model.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``)
plus its shards.

The safetensors format, all of it:

    bytes 0..7        N, the header length, unsigned 64-bit little-endian
    bytes 8..8+N      a JSON object: {name: {"dtype": "BF16", "shape": [out, in], "data_offsets": [begin, end]}},
                      plus an optional "__metadata__" entry of strings
    bytes 8+N..       the data section; a tensor's raw little-endian, row-major bytes sit at
                      [begin, end) of it, and end - begin = prod(shape) · itemsize

BF16 is the top half of a float32: ``float32 bits = uint16 << 16``, so it widens exactly.

Names: the kimi_k25 layout prefixes text tensors with ``language_model.`` (stripped here); its
``vision_tower.*`` and ``mm_projector.*`` tensors are not part of the text model and are skipped, as
are multi-token-prediction layers (``model.layers.i`` with i >= num_hidden_layers). INT4 routed experts
(compressed-tensors pack-quantized: ``X.weight_packed`` int32 [out, in/8], ``X.weight_scale`` [out,
in/32], ``X.weight_shape`` int32 [2]) become a dense float64 ``X.weight`` through
``kimi_ref.oracle.int4.dequantize``. The result is checked against the shapes the config implies:
a missing, unexpected or wrongly shaped tensor is an error naming it.

Every error names the file and the tensor. Holding a model in float64 takes 8 bytes per parameter:
this is for tiny and small checkpoints, not the 1T-parameter one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from kimi_ref.config import KimiConfig, load_config
from kimi_ref.oracle import int4  # the numpy twin of kimi_ref.int4 (sources §7)

__all__ = ["CheckpointError", "SAFETENSORS_DTYPES", "read_header", "read_safetensors", "bf16_to_float32",
           "checkpoint_tensors", "flat_name", "expected_tensors", "load_weights"]


class CheckpointError(ValueError):
    """A checkpoint file is malformed, or its tensors do not match its config."""


# safetensors dtype tag -> numpy little-endian dtype of the stored bytes (BF16 is read as raw uint16)
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_FLOAT_TAGS = ("F64", "F32", "F16", "BF16")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TEXT_PREFIX = "language_model."
_NOT_TEXT = ("vision_tower.", "mm_projector.")
_INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape")


# ---------------------------------------------------------------------------------------------------
# The safetensors reader
# ---------------------------------------------------------------------------------------------------


def read_header(path: str | Path) -> tuple[dict[str, dict], int, int]:
    """(tensor entries, byte offset of the data section, file size) of one safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated file: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the {n}-byte header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object, found {type(header).__name__}")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        _check_entry(path, name, info, size - data_start)
    return header, data_start, size


def _check_entry(path: Path, name: str, info: object, data_size: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(
            f"{path}: tensor '{name}': header entry must have dtype, shape and data_offsets, found {info!r}"
        )
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if tag not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor '{name}' has unknown dtype {tag!r}; this reader knows {sorted(SAFETENSORS_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor '{name}' has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor '{name}' has bad data_offsets {offsets!r}")
    begin, end = offsets
    want = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[tag]).itemsize
    if end - begin != want:
        raise CheckpointError(
            f"{path}: tensor '{name}' ({tag} {shape}) needs {want} bytes, its data_offsets span {end - begin}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor '{name}' lies at bytes [{begin}, {end}) of the data section, which holds only "
            f"{data_size} bytes: truncated file"
        )


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bf16 is the upper 16 bits of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def read_safetensors(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one file (all, or ``names``) as numpy arrays: floats as stored (BF16 widened to float32)."""
    path = Path(path)
    header, data_start, _ = read_header(path)
    wanted = list(header) if names is None else names
    out: dict[str, np.ndarray] = {}
    with path.open("rb") as f:
        for name in wanted:
            if name not in header:
                raise CheckpointError(f"{path}: missing tensor '{name}'")
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            raw = f.read(end - begin)
            if len(raw) != end - begin:  # the file shrank after read_header looked at it
                raise CheckpointError(f"{path}: tensor '{name}': truncated file")
            array = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            out[name] = bf16_to_float32(array) if info["dtype"] == "BF16" else array.copy()
    return out


# ---------------------------------------------------------------------------------------------------
# Checkpoint directory -> flat text-model names
# ---------------------------------------------------------------------------------------------------


def checkpoint_tensors(ckpt: Path) -> dict[str, Path]:
    """{stored tensor name: file holding it}, from the index or the single file's header."""
    single, index = ckpt / SINGLE_FILE, ckpt / INDEX_FILE
    if single.is_file() and index.is_file():
        raise CheckpointError(f"{ckpt}: both {SINGLE_FILE} and {INDEX_FILE} exist; keep one")
    if single.is_file():
        header, _, _ = read_header(single)
        return {name: single for name in header}
    if not index.is_file():
        raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} and no {INDEX_FILE}")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file")
    return {name: ckpt / shard for name, shard in weight_map.items()}


def flat_name(stored: str, config: KimiConfig) -> str | None:
    """The flat (text-model) name of a stored tensor, or None for tensors the text model does not use.

    The twin of ``kimi_ref.checkpoint.flat_name``, which maps every stored name (vision included)."""
    name = stored[len(_TEXT_PREFIX):] if stored.startswith(_TEXT_PREFIX) else stored
    if name.startswith(_NOT_TEXT):
        return None  # MoonViT and its projector
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return None  # multi-token-prediction layers come after the last decoder layer; inference ignores them
    return name


def expected_tensors(config: KimiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the text model reads: {flat name: shape}, INT4 experts listed as their dequantized weight.

    The twin of ``kimi_ref.checkpoint.expected_tensors``, written out by hand on purpose: that one is read
    off the torch model, this one from the equations, so a shape wrong in the model shows up here."""
    d, h = config.hidden_size, config.num_attention_heads
    n, r, v, c = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)

    def mlp(prefix: str, width: int) -> None:
        shapes[f"{prefix}gate_proj.weight"] = (width, d)
        shapes[f"{prefix}up_proj.weight"] = (width, d)
        shapes[f"{prefix}down_proj.weight"] = (d, width)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if config.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (h * (n + r), d)
        else:
            shapes[a + "q_a_proj.weight"] = (config.q_lora_rank, d)
            shapes[a + "q_a_layernorm.weight"] = (config.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (h * (n + r), config.q_lora_rank)
            if config.attention_bias:
                shapes[a + "q_a_proj.bias"] = (config.q_lora_rank,)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c + r, d)
        shapes[a + "kv_a_layernorm.weight"] = (c,)
        shapes[a + "kv_b_proj.weight"] = (h * (n + v), c)
        shapes[a + "o_proj.weight"] = (d, h * v)
        if config.attention_bias:
            shapes[a + "kv_a_proj_with_mqa.bias"] = (c + r,)
            shapes[a + "o_proj.bias"] = (d,)
        if config.is_moe_layer(i):
            e = config.n_routed_experts
            shapes[p + "mlp.gate.weight"] = (e, d)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (e,)
            for j in range(e):
                mlp(f"{p}mlp.experts.{j}.", config.moe_intermediate_size)
            if config.n_shared_experts > 0:
                mlp(f"{p}mlp.shared_experts.", config.moe_intermediate_size * config.n_shared_experts)
        else:
            mlp(f"{p}mlp.", config.intermediate_size)
    return shapes


def _dequantize_int4(module: str, parts: dict[str, np.ndarray], where: dict[str, Path],
                     config: KimiConfig) -> np.ndarray:
    packed, scale, shape = (parts[k] for k in _INT4_PARTS)
    if packed.dtype != np.int32:
        raise CheckpointError(
            f"{where['weight_packed']}: tensor '{module}.weight_packed' has dtype {packed.dtype}, expected int32")
    if shape.shape != (2,) or not np.issubdtype(shape.dtype, np.integer):
        raise CheckpointError(
            f"{where['weight_shape']}: tensor '{module}.weight_shape' must be two integers, found {shape!r}")
    if not np.issubdtype(scale.dtype, np.floating):
        raise CheckpointError(
            f"{where['weight_scale']}: tensor '{module}.weight_scale' has dtype {scale.dtype}, expected a float")
    out_features, in_features = (int(s) for s in shape)
    group = config.quantization.group_size if config.quantization is not None else None
    if group is not None and scale.shape != (out_features, in_features // group):
        raise CheckpointError(
            f"{where['weight_scale']}: tensor '{module}.weight_scale' has shape {list(scale.shape)}, expected "
            f"{[out_features, in_features // group]} for group_size {group}"
        )
    try:
        dense = int4.dequantize(packed, scale, (out_features, in_features))
    except ValueError as e:
        raise CheckpointError(f"{where['weight_packed']}: INT4 tensor '{module}': {e}") from None
    return np.asarray(dense, dtype=np.float64)


def load_weights(path: str | Path) -> tuple[KimiConfig, dict[str, np.ndarray]]:
    """(config, {flat name: float64 array}) for every tensor the text model reads; see the module doc."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    config = load_config(ckpt)
    stored = checkpoint_tensors(ckpt)

    # which stored tensors to read, grouped by file, under their flat names
    by_file: dict[Path, dict[str, str]] = {}
    for stored_name, file in stored.items():
        name = flat_name(stored_name, config)
        if name is not None:
            by_file.setdefault(file, {})[stored_name] = name

    dense: dict[str, np.ndarray] = {}
    int4_parts: dict[str, dict[str, np.ndarray]] = {}
    int4_files: dict[str, dict[str, Path]] = {}
    for file, names in by_file.items():
        tensors = read_safetensors(file, list(names))
        for stored_name, array in tensors.items():
            name = names[stored_name]
            module, _, part = name.rpartition(".")
            if part in _INT4_PARTS:
                int4_parts.setdefault(module, {})[part] = array
                int4_files.setdefault(module, {})[part] = file
                continue
            if not np.issubdtype(array.dtype, np.floating):
                raise CheckpointError(f"{file}: tensor '{stored_name}' has dtype {array.dtype}, expected a float dtype")
            if name in dense:
                raise CheckpointError(f"{file}: tensor '{name}' appears twice (with and without '{_TEXT_PREFIX}'?)")
            dense[name] = array.astype(np.float64)

    for module, parts in int4_parts.items():
        missing = [p for p in _INT4_PARTS if p not in parts]
        if missing:
            present = next(iter(int4_files[module].values()))
            raise CheckpointError(f"{present}: INT4 tensor '{module}' lacks {[f'{module}.{p}' for p in missing]}")
        if f"{module}.weight" in dense:
            raise CheckpointError(f"{ckpt}: tensor '{module}.weight' is stored both dense and INT4-packed")
        dense[f"{module}.weight"] = _dequantize_int4(module, parts, int4_files[module], config)

    _check_against_config(ckpt, dense, config)
    return config, dense


def _check_against_config(ckpt: Path, weights: dict[str, np.ndarray], config: KimiConfig) -> None:
    expected = expected_tensors(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt}: missing tensor '{missing[0]}'{more}, which {ckpt / 'config.json'} requires")
    unexpected = [name for name in weights if name not in expected and name not in optional]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for this config")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(f"{ckpt}: tensor '{name}' has shape {list(weights[name].shape)}, expected {list(shape)}")
    if "lm_head.weight" in weights and weights["lm_head.weight"].shape != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"{ckpt}: tensor 'lm_head.weight' has shape {list(weights['lm_head.weight'].shape)}, "
                              f"expected {[config.vocab_size, config.hidden_size]}")
