"""The real checkpoint: config.json + safetensors shards → ``KimiForCausalLM``, strictly, one rank's slices.

A Kimi K2.x checkpoint directory (sources §5; K2.5 has 64 shards, 554.3 GiB, 208,550 tensors):

    config.json                         nested ``kimi_k25`` layout, or flat ``kimi_k2``/``deepseek_v3``
    model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}
    model-00001-of-000064.safetensors   layer 0 (dense MLP)
    model-00002-of-000064.safetensors   layer 1 (MoE), … one shard per MoE layer …
    model-00062-of-000064.safetensors   embed_tokens, lm_head, final norm
    model-00063 / 00064                 mm_projector / vision_tower
    (or a single model.safetensors)

**Names.** This file is the one place that maps them. Our model's state-dict keys are the flat names:

    checkpoint, kimi_k25 layout               model key
    language_model.model.layers.L.…      ↔    model.layers.L.…
    language_model.model.embed_tokens.…  ↔    model.embed_tokens.…
    language_model.lm_head.weight        ↔    lm_head.weight
    vision_tower.…, mm_projector.…       ↔    the same (not under language_model)

The flat layout (K2-Thinking, HF DeepseekV3) already uses the model keys.

**INT4.** A Linear module ``X`` that ``quantization_config`` quantizes (targets ``Linear`` minus its
``ignore`` list; for Kimi exactly the routed experts) is stored as ``X.weight_packed`` int32
[out, in/8], ``X.weight_scale`` bf16 [out, in/group] and ``X.weight_shape`` int32 [2] (int64 from
some writers is accepted); every other Linear as ``X.weight`` in the checkpoint dtype (bf16). The
router's ``e_score_correction_bias`` is fp32.

**One rank's share.** Rank r of N reads the rows or columns ``parallel.shard_dim`` names
(``parallel.TP.split``), and of the routed experts only its own ``[r·E/N, (r+1)·E/N)`` — with
``safe_open(...).get_slice`` it never reads the rest from disk. A pipeline stage (``parallel.PP``)
reads only its own layers, plus the embedding and vision tower (first stage) or the final norm and
lm_head (last stage): :func:`stage_holds`.

**Strictness.** Everything is checked from the index and the headers before any weight is read, and
every problem is collected: a shard missing from disk, a truncated shard, a tensor the index places in
the wrong shard, a missing or unexpected tensor, a wrong shape or dtype (INT4 widths get their own
message), a ``weight_shape`` that disagrees with the config. They are raised together in one
:class:`CheckpointError`, each naming the tensor and the file. Multi-token-prediction layers
(``num_hidden_layers ≤ L < num_hidden_layers + num_nextn_predict_layers``) are skipped knowingly.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from . import int4
from .config import KimiConfig, load_config, read_json
from .model import DecoderLayer, KimiForCausalLM
from .parallel import ONE_STAGE, PP, SINGLE, TP, shard_dim, stage_layers, validate_layout

__all__ = [
    "CheckpointError",
    "SINGLE_FILE",
    "INDEX_FILE",
    "DTYPES",
    "checkpoint_name",
    "flat_name",
    "is_mtp",
    "is_quantized",
    "component",
    "expected_tensors",
    "rank_slice",
    "rank_tensors",
    "stage_holds",
    "read_header",
    "Checkpoint",
    "load_model",
    "load_layer",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEXT_PREFIX = "language_model."
VISION_PREFIXES = ("vision_tower.", "mm_projector.")
INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape")

# safetensors dtype tags ↔ torch dtypes, and their sizes in bytes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TAGS: dict[torch.dtype, str] = {dtype: tag for tag, dtype in DTYPES.items()}
_CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: every problem found, each naming tensor and file."""

    def __init__(self, problems: list[str] | str, where: str = "checkpoint"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:50]
        more = f"\n  … and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n  " + "\n  ".join(shown) + more)


# ----------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------


def checkpoint_name(key: str, config: KimiConfig) -> str:
    """Model state-dict key → the name stored in this config's checkpoint layout."""
    if config.layout == "kimi_k25" and not key.startswith(VISION_PREFIXES):
        return TEXT_PREFIX + key
    return key


def flat_name(name: str, config: KimiConfig) -> str:
    """Stored name → model state-dict key (the inverse of :func:`checkpoint_name`)."""
    if config.layout == "kimi_k25" and name.startswith(TEXT_PREFIX):
        return name[len(TEXT_PREFIX):]
    return name


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def is_mtp(name: str, config: KimiConfig) -> bool:
    """A multi-token-prediction layer's tensor: present in some DeepSeek-style checkpoints, unused here."""
    layer = _layer_of(flat_name(name, config))
    n = config.num_hidden_layers
    return layer is not None and n <= layer < n + config.num_nextn_predict_layers


def component(key: str) -> str:
    """Which part of the model a (flat) key belongs to, for byte counts in inspect / memory_plan."""
    if key.startswith("vision_tower."):
        return "vision_tower"
    if key.startswith("mm_projector."):
        return "mm_projector"
    if key.startswith("model.embed_tokens."):
        return "embed_tokens"
    if key.startswith("lm_head."):
        return "lm_head"
    if ".self_attn." in key:
        return "attention"
    if ".mlp.experts." in key:
        return "routed_experts"
    if ".mlp.shared_experts." in key:
        return "shared_experts"
    if ".mlp.gate." in key:
        return "router"
    if ".mlp." in key:
        return "dense_mlp"
    return "norms"


# ----------------------------------------------------------------------------------------------------------
# The tensor list a config implies
# ----------------------------------------------------------------------------------------------------------


def _text_dtype(config: KimiConfig) -> str:
    # The checkpoint's declared dtype for every non-quantized tensor (Kimi: bfloat16).
    if config.dtype is None:
        return "BF16"
    if config.dtype not in _CONFIG_DTYPES:
        raise CheckpointError(f"'dtype' {config.dtype!r} is not one of {sorted(_CONFIG_DTYPES)}", config.source)
    return _CONFIG_DTYPES[config.dtype]


def is_quantized(config: KimiConfig, module: str) -> bool:
    """Is the Linear ``module`` (text-model name, e.g. ``model.layers.1.mlp.experts.0.up_proj``) INT4?"""
    return config.quantization is not None and config.quantization.is_quantized(module)


def expected_tensors(config: KimiConfig, include_vision: bool = True) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor the checkpoint of ``config`` holds: {stored name: (shape, safetensors dtype tag)}.

    Read off the model itself, so the architecture is written down once (``model.py`` and the modules it
    builds): ``KimiForCausalLM`` is built on the meta device (shapes and dtypes only, no memory, no
    values) and each state-dict entry becomes a stored name through :func:`checkpoint_name`. Two checkpoint
    rules decide how an entry is stored: a text Linear [out, in] that ``quantization_config`` quantizes
    is three INT4 tensors (``weight_packed`` I32 [out, in/8], ``weight_scale`` BF16 [out, in/group],
    ``weight_shape`` I32 [2]; readers also accept I64 for the last), any other one a ``weight`` (the
    model builds its routed experts INT4 by the same rule; a config quantizing a Linear the model keeps
    dense gets the INT4 names, and loading it then fails naming the tensor); and a floating tensor is
    stored in the config's ``dtype`` unless the model keeps it in fp32 (the router's
    ``e_score_correction_bias``). 208,550 entries for K2.5 with vision; multi-token-prediction layers
    are not listed (see :func:`is_mtp`).
    """
    keep = (lambda key: True) if include_vision else (lambda key: not key.startswith(VISION_PREFIXES))
    return {checkpoint_name(key, config): spec for key, spec in _model_tensors(config).items() if keep(key)}


@functools.lru_cache(maxsize=8)
def _model_tensors(config: KimiConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    # A layer's index only names its tensors (and the INT4 rule, applied below per name, is the only thing
    # that reads it), so the model is built up to one layer of each kind — dense, MoE — and that layer's
    # entries are repeated for every layer of its kind: ~2 s for the real config instead of ~10 s for
    # 70,000 expert modules. Everything is made on the meta device; the one real computation is the
    # rotary table's qk_rope_head_dim/2 frequencies.
    kinds = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    first = {kind: kinds.index(kind) for kind in set(kinds)}  # the first layer of each kind
    try:
        model = KimiForCausalLM(config.replace(num_hidden_layers=max(first.values()) + 1),
                                dtype=DTYPES[_text_dtype(config)], device="meta")
    except int4.Int4Error as e:
        raise CheckpointError(str(e), config.source) from None
    linears = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, int4.W4A16Linear)) and not name.startswith(VISION_PREFIXES)}
    state = model.state_dict(keep_vars=True)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for key in state:
        if _layer_of(key) is not None:
            by_layer[_layer_of(key)].append(key)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}

    def add(name: str, key: str) -> None:  # model key ``key`` (of the built model) stored as ``name``
        module, _, part = key.rpartition(".")
        if module not in linears or part == "bias":
            tensors[name] = (tuple(state[key].shape), _TAGS[state[key].dtype])
        elif part in ("weight", "weight_packed"):  # the Linear itself, stored as the rule says
            tensors.update(_linear_tensors(name.rpartition(".")[0], linears[module], config, _text_dtype(config)))

    for key in state:  # in the model's order: embedding, layers 0..L-1, final norm, lm_head, vision
        layer = _layer_of(key)
        if layer is None:
            add(key, key)
        elif key == by_layer[0][0]:  # where the layers begin: all of them, each from its kind's first layer
            for i, kind in enumerate(kinds):
                for template in by_layer[first[kind]]:
                    add(_LAYER.sub(f"model.layers.{i}.", template, count=1), template)
    return tensors


def _linear_tensors(module: str, shape: tuple[int, int], config: KimiConfig,
                    dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """How the text Linear ``module`` [out, in] is stored: one ``weight`` in ``dtype``, or, if the config
    quantizes it, the three compressed-tensors INT4 parts (sources §7)."""
    if not is_quantized(config, module):
        return {f"{module}.weight": (shape, dtype)}
    out_f, in_f = shape
    group = config.quantization.group_size  # type: ignore[union-attr]
    if in_f % group or in_f % int4.PACK_FACTOR:
        raise CheckpointError(f"'{module}' has in_features {in_f}, not divisible by the INT4 group size {group}",
                              config.source)
    return {f"{module}.weight_packed": ((out_f, in_f // int4.PACK_FACTOR), "I32"),
            f"{module}.weight_scale": ((out_f, in_f // group), "BF16"),
            f"{module}.weight_shape": ((2,), "I32")}


def _expert_of(key: str) -> int | None:
    m = _EXPERT.match(key)
    return int(m.group(2)) if m else None


def rank_slice(key: str, shape: tuple[int, ...], config: KimiConfig, tp: TP) -> tuple[int | None, int, int] | None:
    """What rank ``tp.rank`` reads of tensor ``key`` (a model key) with full ``shape``:
    ``(dim, start, size)`` along the split dim (``dim`` None = all of it), or None: not this rank's.
    """
    expert = _expert_of(key)
    if expert is not None:
        start, size = tp.split(config.n_routed_experts, "n_routed_experts")
        return (None, 0, 0) if start <= expert < start + size else None
    dim = shard_dim(key)
    if dim is None or tp.world_size == 1:
        return None, 0, 0
    start, size = tp.split(shape[dim], f"{key} dim {dim}")
    return dim, start, size


def stage_holds(key: str, config: KimiConfig, pp: PP) -> bool:
    """Whether pipeline stage ``pp.stage`` holds model tensor ``key``: its own layers; the embedding and
    the vision tower on the first stage; the final norm and lm_head on the last (a tied head: the
    embedding on the last stage too)."""
    if pp.stages == 1:
        return True
    layer = _layer_of(key)
    if layer is not None:
        return layer in stage_layers(config.num_hidden_layers, pp.stages)[pp.stage]
    if key.startswith("model.embed_tokens."):
        return pp.first or (pp.last and config.tie_word_embeddings)
    if key.startswith(VISION_PREFIXES):
        return pp.first
    if key.startswith(("lm_head.", "model.norm.")):
        return pp.last
    return True


def rank_tensors(config: KimiConfig, tp: TP = SINGLE, include_vision: bool = True,
                 pp: PP = ONE_STAGE) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors rank ``tp.rank`` of stage ``pp.stage`` holds: {model key: (local shape, stored dtype tag)}."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in expected_tensors(config, include_vision).items():
        key = flat_name(name, config)
        if not stage_holds(key, config, pp):
            continue
        where = rank_slice(key, shape, config, tp)
        if where is None:
            continue
        dim, _, size = where
        out[key] = (shape if dim is None else shape[:dim] + (size,) + shape[dim + 1:], dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading headers (no tensor data)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Header:
    """One safetensors file's header: {name: {"dtype", "shape", "data_offsets"}} and where data starts."""

    path: Path
    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int
    size: int


def _count(x: Any) -> bool:
    """An integer >= 0 (JSON's true/false are not)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors header: 8-byte little-endian length, JSON, every tensor's bytes
    inside the file. A truncated or corrupt file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, not even the 8-byte header length", str(path))
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: header of {n} bytes but the file has {size}", str(path))
        raw = f.read(n)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}): corrupt or not safetensors", str(path)) from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: header is not a JSON object", str(path))
    metadata = entries.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: header __metadata__ must be a JSON object of strings, found {metadata!r:.80}",
                              str(path))
    data_size = size - 8 - n
    problems = []
    for name, info in entries.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: tensor '{name}': malformed header entry {info!r:.200}")
            continue
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            problems.append(f"{path}: tensor '{name}': shape must be a list of integers >= 0, found {shape!r:.80}")
            continue
        if not (_count(begin) and _count(end) and begin <= end):
            problems.append(f"{path}: tensor '{name}': data_offsets must be [begin, end] with 0 <= begin <= end, "
                            f"found {[begin, end]!r:.80}")
            continue
        if not isinstance(tag, str) or tag not in ITEMSIZE:
            problems.append(f"{path}: tensor '{name}': unknown dtype {tag!r}")
            continue
        need = math.prod(shape) * ITEMSIZE[tag]
        if end - begin != need:
            problems.append(f"{path}: tensor '{name}': {tag} {shape} needs {need} bytes, data_offsets span {end - begin}")
        elif end > data_size:
            problems.append(
                f"{path}: tensor '{name}': its bytes [{begin}, {end}) lie past the end of the data "
                f"({data_size} bytes): truncated file"
            )
    if problems:
        raise CheckpointError(problems, str(path))
    return Header(path, entries, metadata, 8 + n, size)


# ----------------------------------------------------------------------------------------------------------
# A checkpoint directory
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint directory, opened from its config, index and headers (no tensor data read).

    ``weight_map``: {stored name: shard file name}. ``headers``: {shard file name: Header} for every
    shard present and readable. ``issues``: (tensor name or None for a whole file, message) for
    everything wrong found so far; ``problems`` the messages alone (see the module doc).
    ``expected``: :func:`expected_tensors` of the config. ``mtp``: stored names skipped as MTP layers.
    """

    path: Path
    config: KimiConfig
    weight_map: dict[str, str]
    headers: dict[str, Header]
    index: dict[str, Any] | None
    expected: dict[str, tuple[tuple[int, ...], str]]
    issues: list[tuple[str | None, str]] = field(default_factory=list)
    mtp: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every problem found, as messages naming tensor and file."""
        return [message for _, message in self.issues]

    # ---- opening ----
    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with config.json and safetensors)")
        config = load_config(path)
        single, index_path = path / SINGLE_FILE, path / INDEX_FILE
        problems: list[tuple[str | None, str]] = []
        index = None
        if index_path.is_file() and single.is_file():
            raise CheckpointError(f"{path}: both {SINGLE_FILE} and {INDEX_FILE} exist; which one is the checkpoint?")
        if index_path.is_file():
            index = read_json(index_path, CheckpointError)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: needs a 'weight_map' object of tensor name → shard file name")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

        headers: dict[str, Header] = {}
        for file in files:
            if not (path / file).is_file():
                names = [n for n, f in weight_map.items() if f == file]
                problems.append((None,
                    f"{path / file}: shard missing from disk; {INDEX_FILE} places {len(names)} tensor(s) in it, "
                    f"e.g. '{names[0]}'"
                ))
                continue
            try:
                headers[file] = read_header(path / file)
            except CheckpointError as e:
                problems.extend((None, p) for p in e.problems)
        if index is None and SINGLE_FILE in headers:
            weight_map = {name: SINGLE_FILE for name in headers[SINGLE_FILE].entries}

        ckpt = cls(path, config, dict(weight_map), headers, index, expected_tensors(config), problems)
        ckpt._check_placement()
        ckpt._check_against_config()
        return ckpt

    def file(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def _problem(self, name: str | None, message: str) -> None:
        self.issues.append((name, message))

    def _check_placement(self) -> None:
        # Each tensor must sit in the shard the index names, and every shard tensor must be indexed.
        where: dict[str, list[str]] = defaultdict(list)
        for file, header in self.headers.items():
            for name in header.entries:
                where[name].append(file)
        for name, file in self.weight_map.items():
            if file in self.headers and name not in self.headers[file].entries:
                found = f"; it is in {', '.join(where[name])}" if where.get(name) else "; no shard holds it"
                self._problem(name, f"tensor '{name}': {INDEX_FILE} places it in {file}, which does not contain it{found}")
        for name, files in where.items():
            if name not in self.weight_map:
                for file in files:
                    self._problem(name, f"tensor '{name}' in {self.path / file} is not listed in {INDEX_FILE}")
            elif len(files) > 1:
                self._problem(name, f"tensor '{name}' is stored in several shards: {', '.join(files)}")

    def entry(self, name: str) -> dict[str, Any] | None:
        """The header entry of a stored tensor, where the index says it is (None if absent)."""
        header = self.headers.get(self.weight_map.get(name, ""))
        return None if header is None else header.entries.get(name)

    def _check_against_config(self) -> None:
        source = self.config.source
        for name, (shape, dtype) in self.expected.items():
            if name not in self.weight_map:
                hint = _other_form_hint(name, self.weight_map)
                self._problem(name, f"missing tensor '{name}' ({dtype} {list(shape)}), required by {source}{hint}")
                continue
            info = self.entry(name)
            if info is None:
                continue  # its shard is missing/truncated or it is misplaced: reported already
            found_shape, found_dtype = tuple(info["shape"]), info["dtype"]
            where = self.file(name)
            ok_dtypes = ("I32", "I64") if name.endswith(".weight_shape") else (dtype,)
            if found_dtype not in ok_dtypes:
                self._problem(name, f"tensor '{name}' in {where}: dtype {found_dtype}, expected {' or '.join(ok_dtypes)}")
            if found_shape != shape:
                self._problem(name, f"tensor '{name}' in {where}: {_shape_problem(name, found_shape, shape, self.config)}")
        for name, file in self.weight_map.items():
            if name in self.expected:
                continue
            if is_mtp(name, self.config):
                self.mtp.append(name)
                continue
            hint = _other_form_hint(name, self.expected)
            self._problem(name, f"unexpected tensor '{name}' in {self.path / file}: {source} implies no such tensor{hint}")

    def check_weight_shapes(self, names: Iterable[str] | None = None) -> list[str]:
        """Read the (tiny) ``weight_shape`` tensors and compare them with the config's (out, in)."""
        problems = []
        wanted = [n for n in (names if names is not None else self.expected) if n.endswith(".weight_shape")]
        for name in wanted:
            if self.entry(name) is None:
                continue
            problem = self._weight_shape_problem(name, self.read(name))
            if problem:
                problems.append(problem)
        return problems

    def _weight_shape_problem(self, name: str, value: torch.Tensor) -> str | None:
        packed = self.expected.get(name[: -len("shape")] + "packed")
        if packed is None:
            return f"tensor '{name}' in {self.file(name)}: no weight_packed beside it in the config's tensor list"
        want = (packed[0][0], packed[0][1] * int4.PACK_FACTOR)
        try:
            found = int4.read_weight_shape(value, name)
        except int4.Int4Error as e:
            return f"tensor '{name}' in {self.file(name)}: {e}"
        if found != want:
            return f"tensor '{name}' in {self.file(name)}: holds {list(found)}, but the config's Linear is [out, in] = {list(want)}"
        return None

    # ---- reading data ----
    def read(self, name: str, dim: int | None = None, start: int = 0, size: int = 0) -> torch.Tensor:
        """Tensor ``name`` (a stored name), or its ``[start, start+size)`` slice along ``dim``, from disk."""
        with safe_open(self.file(name), framework="pt", device="cpu") as f:
            return _read_slice(f, name, dim, start, size)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise CheckpointError(self.problems, str(self.path))

    @property
    def shard_files(self) -> list[str]:
        """Shard file names in index order (sorted), present ones only."""
        return [f for f in sorted(set(self.weight_map.values())) if f in self.headers]


def _read_slice(handle: Any, name: str, dim: int | None, start: int, size: int) -> torch.Tensor:
    if dim is None:
        return handle.get_tensor(name)
    sl = handle.get_slice(name)
    index = (slice(None),) * dim + (slice(start, start + size),)
    return sl[index]


def _shape_problem(name: str, found: tuple[int, ...], want: tuple[int, ...], config: KimiConfig) -> str:
    """A shape mismatch, explained in INT4 terms for packed weights and scales."""
    base = f"shape {list(found)}, expected {list(want)}"
    if len(found) == 2 and len(want) == 2 and found[0] == want[0]:
        if name.endswith(".weight_packed"):
            in_f = want[1] * int4.PACK_FACTOR
            return f"{base}: packed width {found[1]} != in_features/8 = {in_f}/8 = {want[1]}"
        if name.endswith(".weight_scale") and config.quantization is not None:
            group = config.quantization.group_size
            in_f = want[1] * group
            return f"{base}: scale width {found[1]} != in_features/{group} = {in_f}/{group} = {want[1]}"
    return base


def _other_form_hint(name: str, names: Any) -> str:
    """Point out a Linear stored dense where the config says INT4 (or the reverse)."""
    if name.endswith(".weight"):
        if name[: -len(".weight")] + ".weight_packed" in names:
            return " (this Linear is INT4 per quantization_config; the checkpoint stores it dense)"
    for part in INT4_PARTS:
        if name.endswith("." + part) and name[: -len(part)] + "weight" in names:
            return " (the checkpoint stores this Linear INT4-packed; quantization_config says dense)"
    return ""


# ----------------------------------------------------------------------------------------------------------
# Loading into the torch model
# ----------------------------------------------------------------------------------------------------------


def _torch_dtype(config: KimiConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.itemsize < 2:  # int8, bool, float8: the model computes in floats
            raise CheckpointError(f"dtype {dtype} cannot hold the model's weights; use torch.bfloat16, torch.float16, "
                                  "torch.float32 or torch.float64")
        return dtype
    name = dtype if dtype is not None else (config.dtype or "bfloat16")
    if name not in _CONFIG_DTYPES and name not in ("float64",):
        raise CheckpointError(f"unknown dtype {name!r}; use a torch dtype or one of {sorted(_CONFIG_DTYPES)}")
    return getattr(torch, name)


def _torch_device(device: Any) -> torch.device:
    """``device`` as a torch.device this machine has, or a CheckpointError saying what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device {device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
    if dev.type == "meta":
        raise CheckpointError("device 'meta' holds no values; load onto 'cpu' or 'cuda'")
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise CheckpointError(f"device {device!r}: torch has no {dev.type} device on this machine; use 'cpu'"
                                  + (" or 'cuda'" if torch.cuda.is_available() else ""))
        count = getattr(backend, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise CheckpointError(f"device {device!r}: this machine has {count} {dev.type} device(s)")
    return dev


def _progress(items: list[str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="shard")


def _load_into(ckpt: Checkpoint, module: torch.nn.Module, key_prefix: str, tp: TP, device: Any,
               progress: bool, skip: Any = None) -> None:
    """Fill ``module`` (built on the meta device; its state-dict keys are the model keys under
    ``key_prefix``) from ``ckpt``: plan every tensor and check it, read shard by shard, then assign.

    ``skip(stored name) -> bool`` marks checkpoint tensors deliberately left out (other layers, vision).
    """
    config = ckpt.config
    meta = module.state_dict(keep_vars=True)
    problems: list[str] = []
    plan: dict[str, dict[str, tuple[str, int | None, int, int, torch.Tensor]]] = defaultdict(dict)
    wanted: set[str] = set()
    for local_key, target in meta.items():
        key = key_prefix + local_key
        name = checkpoint_name(key, config)
        if name not in ckpt.expected:
            problems.append(f"model tensor '{key}' has no counterpart '{name}' in the tensor list of {config.source}")
            continue
        wanted.add(name)
        full_shape = ckpt.expected[name][0]
        where = rank_slice(key, full_shape, config, tp)
        if where is None:
            problems.append(f"model tensor '{key}' belongs to another rank's experts (tp rank {tp.rank} of {tp.world_size})")
            continue
        dim, start, size = where
        local = full_shape if dim is None else full_shape[:dim] + (size,) + full_shape[dim + 1:]
        if tuple(target.shape) != local:
            problems.append(
                f"model tensor '{key}' has shape {list(target.shape)}, but rank {tp.rank}/{tp.world_size} of "
                f"'{name}' {list(full_shape)} is {list(local)}"
            )
            continue
        if name in ckpt.weight_map and ckpt.entry(name) is not None:
            plan[ckpt.weight_map[name]][local_key] = (name, dim, start, size, target)
    # Checkpoint tensors this module does not take: other ranks' experts and deliberate skips are fine.
    for name in ckpt.expected:
        if name in wanted or (skip is not None and skip(name)):
            continue
        key = flat_name(name, config)
        if not key.startswith(key_prefix):
            continue
        if _expert_of(key) is not None and rank_slice(key, ckpt.expected[name][0], config, tp) is None:
            continue
        problems.append(f"checkpoint tensor '{name}' ({ckpt.weight_map.get(name, 'not in the index')}) has no place in the model")
    if problems:
        raise CheckpointError(problems, str(ckpt.path))

    state: dict[str, torch.Tensor] = {}
    for file in _progress(sorted(plan), progress, f"loading {ckpt.path.name}"):
        with safe_open(ckpt.path / file, framework="pt", device="cpu") as f:
            for local_key, (name, dim, start, size, target) in plan[file].items():
                value = _read_slice(f, name, dim, start, size)
                if name.endswith(".weight_shape"):
                    problem = ckpt._weight_shape_problem(name, value)
                    if problem:
                        problems.append(problem)
                        continue
                state[local_key] = value.to(device=device, dtype=target.dtype)
    if problems:
        raise CheckpointError(problems, str(ckpt.path))
    module.load_state_dict(state, strict=True, assign=True)


def _check_materialized(module: torch.nn.Module, ckpt: Checkpoint) -> None:
    # Anything still on the meta device was neither loaded nor rebuilt: refuse to hand it out.
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError([f"'{n}' is still on the meta device after loading" for n in left], str(ckpt.path))


def load_model(
    path: str | Path,
    device: Any = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    tp: TP = SINGLE,
    pp: PP = ONE_STAGE,
    mla_mode: str = "absorbed",
    backend: str = "torch",
    progress: bool = True,
) -> torch.nn.Module:
    """Build ``KimiForCausalLM`` from a checkpoint directory, strictly (see the module doc).

    ``dtype``: compute dtype of the dense weights (default: the config's, bfloat16 for Kimi). INT4
    buffers stay int32/bf16 and ``e_score_correction_bias`` fp32 whatever it is. ``tp``: this
    process's place in tensor parallelism (loading needs no process group). ``pp``: its pipeline
    stage, whose tensors alone are read (:func:`stage_holds`). The model is built on the meta device
    and only what this rank loads is materialized on ``device``.
    """
    device = _torch_device(device)
    ckpt = Checkpoint.open(path)
    ckpt.raise_if_problems()
    config = ckpt.config
    validate_layout(config, tp.world_size, pp.stages)
    dtype = _torch_dtype(config, dtype)
    model = KimiForCausalLM(config, tp=tp, pp=pp, dtype=dtype, device="meta", mla_mode=mla_mode, backend=backend)
    has_vision = any(k.startswith(VISION_PREFIXES) for k in model.state_dict(keep_vars=True))

    def skip(name: str) -> bool:  # other stages' tensors; the vision tower when the model has none
        return (not has_vision and name.startswith(VISION_PREFIXES)) or not stage_holds(flat_name(name, config), config, pp)

    _load_into(ckpt, model, "", tp, device, progress, skip=skip)
    _rebuild_buffers(model, device)
    _check_materialized(model, ckpt)
    return model.eval()


def _rebuild_buffers(model: torch.nn.Module, device: Any) -> None:
    """Non-persistent buffers (not in any checkpoint) are computed from the config: ask the model."""
    rebuild = getattr(model, "init_non_persistent_buffers", None)
    if rebuild is not None:
        rebuild(device)


def load_layer(
    path: str | Path,
    layer: int,
    experts: Iterable[int] | None = None,
    device: Any = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    *,
    mla_mode: str = "absorbed",
    backend: str = "torch",
    progress: bool = False,
) -> torch.nn.Module:
    """One decoder layer of a checkpoint, read lazily from its shard(s): runs a real layer on a CPU.

    ``experts``: the routed experts to load (default all). With a subset the layer's MoE output is the
    partial sum over the loaded experts that tokens are routed to (the router still scores all of them).
    Call it as the model calls its layers (see ``kimi_ref.model``).
    """
    device = _torch_device(device)
    ckpt = Checkpoint.open(path)
    config = ckpt.config
    if not 0 <= layer < config.num_hidden_layers:
        raise CheckpointError(f"layer {layer} is outside 0..{config.num_hidden_layers - 1}", str(ckpt.path))
    prefix = f"model.layers.{layer}."
    chosen: list[int] | None = None
    if experts is not None and config.is_moe_layer(layer):
        chosen = sorted(set(int(e) for e in experts))
        bad = [e for e in chosen if not 0 <= e < config.n_routed_experts]
        if bad:
            raise CheckpointError(f"experts {bad} are outside 0..{config.n_routed_experts - 1}", str(ckpt.path))

    def skip(name: str) -> bool:
        key = flat_name(name, config)
        if not key.startswith(prefix):
            return True
        e = _expert_of(key)
        return chosen is not None and e is not None and e not in chosen

    # Only this layer's tensors (and the shards holding them) have to be sound.
    needed = {n for n in ckpt.expected if not skip(n)}
    files = {str(ckpt.path / ckpt.weight_map[n]) for n in needed if n in ckpt.weight_map}
    relevant = [m for n, m in ckpt.issues if n in needed or (n is None and any(m.startswith(f) for f in files))]
    if relevant:
        raise CheckpointError(relevant, str(ckpt.path))

    dtype = _torch_dtype(config, dtype)
    module = DecoderLayer(config, layer, dtype=dtype, device="meta", mla_mode=mla_mode, backend=backend)
    if chosen is not None:
        for e in list(module.mlp.experts.keys()):
            if int(e) not in chosen:
                del module.mlp.experts[e]
    _load_into(ckpt, module, prefix, SINGLE, device, progress, skip=skip)
    _rebuild_buffers(module, device)
    _check_materialized(module, ckpt)
    return module.eval()
