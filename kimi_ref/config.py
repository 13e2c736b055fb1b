"""Kimi K2.x configuration: every number the model needs, read from a real ``config.json``.

Two layouts exist in the wild, and both are read here:

* **nested** (``model_type: "kimi_k25"``; K2.5, K2.6, K2.7-Code): the language model's settings live in
  ``text_config`` (with ``quantization_config`` inside it), the MoonViT settings in ``vision_config``,
  and a few ids (``media_placeholder_token_id``, bos/eos/pad) at the top level.
* **flat** (``model_type: "kimi_k2"`` or ``"deepseek_v3"``; K2-Instruct, K2-Thinking, and what HF
  ``DeepseekV3Config.save_pretrained`` writes): everything at the top level, no vision.

RoPE comes in two spellings: Kimi ships transformers-4 style ``rope_theta`` + ``rope_scaling``;
transformers 5 rewrites it as one ``rope_parameters`` dict. Both are accepted; if both are present
they must agree.

**One declaration per key.** A field stored under one JSON key is declared once, with its kind, its
meaning and (if it may be absent) its default: ``vocab_size: int = config_key(count, "embedding rows")``
(``config_keys.py``). Reading (``from_dict``), writing (``to_dict``) and the list of known keys (the rest
is kept in ``extra``) are loops over those declarations; ``help(KimiConfig)`` lists them. What is not
one key per field is explicit code: the two layouts, the two RoPE spellings, the quantization block,
dtype and the HF defaults.

Nothing is assumed: a key that changes the forward pass and is missing is a :class:`ConfigError`
naming the key and the file. (The one exception is documented where it happens: transformers'
``DeepseekV3Config`` has no ``topk_method``/``scoring_func`` keys because its model implements only
``noaux_tc``/``sigmoid``; a file written by it gets exactly those values.)

This module imports no torch: the float64 oracle reads its configuration through it too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config_keys import (ConfigError, Reader, about, config_key, count, count_pair, declared, documented, flag,
                          integer, integer_or_null, number, read_declared, read_json, square, string, three_numbers,
                          token_id, token_ids, write_declared)

__all__ = ["ConfigError", "RopeConfig", "QuantConfig", "VisionConfig", "MediaConfig", "KimiConfig", "load_config",
           "load_media_config", "read_json", "tiny_config", "fixture_path"]


# ----------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------

_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings.

    theta:  base of the frequencies ``theta^(-2i/d)`` (Kimi: 50000.0).
    type:   ``"default"`` (plain RoPE) or ``"yarn"`` (Kimi).
    factor: YaRN context-extension factor (Kimi: 64.0; 4096 × 64 = 262144 positions).
    original_max_position_embeddings: the pre-extension context (Kimi: 4096); sets the YaRN ramp.
    beta_fast / beta_slow: rotations per original context that bound the YaRN ramp (K2.5: 32 / 1;
        K2-Instruct-0905: 1 / 1 — read it, never assume it).
    mscale / mscale_all_dim: YaRN magnitude corrections. cos/sin are scaled by
        ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` and the softmax scale by
        ``get_mscale(factor, mscale_all_dim)²`` (Kimi: both 1.0, so cos/sin are unscaled and the
        softmax scale grows by 1.41589² ≈ 2.0048).
    """

    theta: float
    type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def to_rope_scaling(self) -> dict[str, Any] | None:
        """The transformers-4 ``rope_scaling`` dict Kimi ships (``None`` for plain RoPE)."""
        if self.type == "default":
            return None
        out: dict[str, Any] = {"type": self.type}
        out.update({k: getattr(self, k) for k in _YARN_KEYS})
        return out


def _read_rope(r: Reader) -> RopeConfig:
    old = _rope_from_scaling(r) if (r.has("rope_scaling") or r.has("rope_theta")) else None
    new = _rope_from_parameters(r) if r.has("rope_parameters") else None
    if old is None and new is None:
        raise ConfigError(f"{r.source}: no RoPE settings: expected 'rope_theta' (+ 'rope_scaling') or 'rope_parameters'")
    if old is not None and new is not None and old != new:
        raise ConfigError(
            f"{r.source}: 'rope_scaling'/'rope_theta' and 'rope_parameters' disagree: {old} vs {new}"
        )
    return old if old is not None else new  # type: ignore[return-value]


def _rope_from_scaling(r: Reader) -> RopeConfig:
    theta = r.get("rope_theta", float)
    scaling = r.get("rope_scaling", dict, None, nullable=True)
    if scaling is None:
        return RopeConfig(theta=theta)
    return _rope_fields(Reader(scaling, r.source, r.keypath("rope_scaling")), theta)


def _rope_from_parameters(r: Reader) -> RopeConfig:
    p = r.child("rope_parameters")
    return _rope_fields(p, p.get("rope_theta", float))


def _rope_fields(s: Reader, theta: float) -> RopeConfig:
    kind = s.get("rope_type", str, None) or s.get("type", str, None)
    if kind is None:
        raise ConfigError(f"{s.source}: '{s.where}' needs 'type' or 'rope_type'")
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "yarn":
        raise ConfigError(f"{s.source}: '{s.where}.type' is {kind!r}; Kimi uses 'yarn' (or 'default')")
    values = {k: s.get(k, float) for k in _YARN_KEYS}
    values["original_max_position_embeddings"] = s.positive("original_max_position_embeddings")
    return RopeConfig(theta=theta, type="yarn", **values)


# ----------------------------------------------------------------------------------------------------------
# Quantization (compressed-tensors pack-quantized INT4)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """compressed-tensors ``quantization_config`` (Kimi: INT4 routed experts, everything else bf16).

    quant_method: ``"compressed-tensors"``.     format: ``"pack-quantized"`` (8 nibbles per int32).
    num_bits: 4.   type: ``"int"``.   symmetric: true (no zero point).   strategy: ``"group"``.
    group_size: 32 input columns share one bf16 scale.
    targets: module kinds/names quantized (``["Linear"]``).
    ignore: names excluded from quantization: exact names, or ``re:`` regexes matched with
        ``re.match`` (compressed-tensors semantics). Names are relative to the text model, e.g.
        ``model.layers.1.mlp.experts.0.gate_proj`` or ``lm_head``.
    raw: the dict as read, written back verbatim by ``to_dict``.
    """

    quant_method: str
    format: str
    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def is_quantized(self, module_name: str, is_linear: bool = True) -> bool:
        """Is the Linear module ``module_name`` stored packed? (targets match and no ignore entry matches)"""
        targeted = any(_ct_match(module_name, t) or (is_linear and t == "Linear") for t in self.targets)
        return targeted and not any(_ct_match(module_name, pattern) for pattern in self.ignore)


def _ct_match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _read_quant(q: Reader) -> QuantConfig:
    method = q.get("quant_method", str)
    if method != "compressed-tensors":
        raise ConfigError(f"{q.source}: '{q.keypath('quant_method')}' is {method!r}; only 'compressed-tensors' is supported")
    fmt = q.get("format", str)
    if fmt != "pack-quantized":
        raise ConfigError(f"{q.source}: '{q.keypath('format')}' is {fmt!r}; only 'pack-quantized' is supported")
    groups = q.child("config_groups")
    if len(groups.data) != 1:
        raise ConfigError(f"{q.source}: '{groups.where}' must hold exactly one group, found {list(groups.data)}")
    group = groups.child(next(iter(groups.data)))
    w = group.child("weights")
    num_bits, kind = w.positive("num_bits"), w.get("type", str)
    symmetric, strategy = w.get("symmetric", bool), w.get("strategy", str)
    if (num_bits, kind, symmetric, strategy) != (4, "int", True, "group"):
        raise ConfigError(
            f"{q.source}: '{w.where}' describes {num_bits}-bit {kind}, symmetric={symmetric}, strategy={strategy!r}; "
            "kimi_ref implements 4-bit int, symmetric, group strategy"
        )
    group_size = w.positive("group_size")
    targets = group.get("targets", list)
    ignore = q.get("ignore", list, [])
    for name, items in (("targets", targets), ("ignore", ignore)):
        if not all(isinstance(x, str) for x in items):
            raise ConfigError(f"{q.source}: '{q.where}' {name} must be a list of strings, found {items!r}")
    return QuantConfig(
        quant_method=method, format=fmt, num_bits=num_bits, type=kind, symmetric=symmetric, strategy=strategy,
        group_size=group_size, targets=tuple(targets), ignore=tuple(ignore), raw=dict(q.data),
    )


# ----------------------------------------------------------------------------------------------------------
# Vision (MoonViT-3D) and media preprocessing
# ----------------------------------------------------------------------------------------------------------


@documented
@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """MoonViT-3D tower and patch-merger projector (``vision_config``; K2.5 values in brackets)."""

    patch_size: int = config_key(count, "side of a square patch in pixels [14]")
    init_pos_emb_height: int = config_key(count, "rows of the learnable position-embedding grid [64], bicubically "
                                                 "interpolated to each image's h in patches")
    init_pos_emb_width: int = config_key(count, "its columns [64], interpolated to w")
    init_pos_emb_time: int = config_key(count, "frames covered by the fixed sin-cos time embedding [4]")
    pos_emb_type: str = config_key(string, '``"divided_fixed"`` (learnable 2D + fixed 1D time)')
    hidden_size: int = config_key(count, "tower width [1152]", key="vt_hidden_size")
    intermediate_size: int = config_key(count, "tower MLP width [4304]", key="vt_intermediate_size")
    num_attention_heads: int = config_key(count, "tower heads [16, head dim 72]", key="vt_num_attention_heads")
    num_hidden_layers: int = config_key(count, "tower blocks [27]", key="vt_num_hidden_layers")
    merge_kernel_size: tuple[int, int] = config_key(count_pair, "spatial patch merge [2, 2]")
    merge_type: str = config_key(string, '``"sd2_tpool"`` (temporal mean, then 2×2)')
    video_attn_type: str = config_key(string, '``"spatial_temporal"``')
    mm_projector_type: str = config_key(string, '``"patchmerger"``')
    mm_hidden_size: int = config_key(count, "projector input width per patch [1152]")
    text_hidden_size: int = config_key(count, "projector output width [7168]")
    projector_hidden_act: str = config_key(string, '``"gelu"`` (exact erf GELU)')
    projector_ln_eps: float = config_key(number, "projector LayerNorm eps [1e-5]")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return write_declared(self)


_VISION_IMPLEMENTED = {"pos_emb_type": "divided_fixed", "merge_type": "sd2_tpool", "mm_projector_type": "patchmerger",
                       "projector_hidden_act": "gelu"}


def _read_vision(v: Reader) -> VisionConfig:
    cfg = VisionConfig(**read_declared(VisionConfig, v))
    for key, want in _VISION_IMPLEMENTED.items():
        if getattr(cfg, key) != want:
            raise ConfigError(f"{v.source}: '{v.keypath(key)}' is {getattr(cfg, key)!r}; kimi_ref implements {want!r}")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
        raise ConfigError(
            f"{v.source}: vt_hidden_size {cfg.hidden_size} / vt_num_attention_heads {cfg.num_attention_heads} must give "
            "a head dim divisible by 4 (2D RoPE splits it into x and y complex pairs)"
        )
    return cfg


@documented
@dataclass(frozen=True, kw_only=True)
class MediaConfig:
    """Image/video preprocessing (``preprocessor_config.json`` → ``media_proc_cfg``; K2.5 values in brackets)."""

    patch_size: int = config_key(count, "side of a square patch in pixels [14]")
    merge_kernel_size: int = config_key(square, "patches merged per side [2]; pixels are padded to multiples of "
                                                "patch × merge = 28")
    in_patch_limit: int = config_key(count, "patches per image [16384]")
    patch_limit_on_one_side: int = config_key(count, "patches per side [512]")
    in_patch_limit_each_frame: int | None = config_key(integer_or_null, "patches per video frame [4096]", default=None)
    in_patch_limit_video: int | None = config_key(integer_or_null, "patches per whole video [null]", default=None)
    sample_fps: float = config_key(number, "video frames per second at most [2.0]")
    max_num_frames_each_video: int | None = config_key(integer_or_null, "frames per video at most [null: no limit]",
                                                         default=None)
    temporal_merge_kernel_size: int = config_key(count, "frames per video chunk [4]")
    timestamp_mode: str = config_key(string, 'how a video chunk\'s time is written ["hh:mm:ss.fff"]')
    image_mean: tuple[float, float, float] = config_key(three_numbers, "per-channel mean [0.5, 0.5, 0.5]: "
                                                                       "``(x/255 - mean) / std``")
    image_std: tuple[float, float, float] = config_key(three_numbers, "per-channel std [0.5, 0.5, 0.5], no zero")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "MediaConfig":
        top = Reader(data, source)
        m = top.child("media_proc_cfg") if top.has("media_proc_cfg") else top
        cfg = cls(**read_declared(cls, m))
        if any(s == 0 for s in cfg.image_std):
            raise ConfigError(f"{source}: '{m.keypath('image_std')}' must not contain 0, found {list(cfg.image_std)!r}")
        if cfg.sample_fps <= 0:
            raise ConfigError(f"{source}: '{m.keypath('sample_fps')}' must be positive, found {cfg.sample_fps}")
        fixed = m.get("fixed_output_tokens", int, None, nullable=True)
        if fixed is not None:  # a processor mode that resizes to a token budget: not implemented, so refuse
            raise ConfigError(f"{source}: '{m.keypath('fixed_output_tokens')}' is {fixed}; kimi_ref implements the "
                              "NaViT resize (fixed_output_tokens null, as K2.5 ships it) only")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content, nested under ``media_proc_cfg`` as Kimi ships it."""
        return {"media_proc_cfg": {**write_declared(self), "fixed_output_tokens": None,
                                   "config_type": "media_proc.processors.moonvit.MoonViTMediaProcessorConfig"}}


def load_media_config(ckpt_dir: str | Path) -> MediaConfig:
    """Read ``preprocessor_config.json`` from a checkpoint directory."""
    path = Path(ckpt_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; images need the checkpoint's preprocessor_config.json")
    return MediaConfig.from_dict(read_json(path), str(path))


# ----------------------------------------------------------------------------------------------------------
# The text model
# ----------------------------------------------------------------------------------------------------------

_FLAT_TYPES = ("kimi_k2", "deepseek_v3")
_NESTED_TYPES = ("kimi_k25",)
# transformers' DeepseekV3Config dropped these keys because its model always does noaux_tc/sigmoid routing on
# every layer past the dense prefix. Only in a file it wrote (see from_dict) may they be absent.
_HF_DEFAULTS = {"moe_layer_freq": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
# Keys explicit code reads (or derives again: transformers 5's head_dim, qk_head_dim), besides the declared ones.
_EXPLICIT_TEXT_KEYS = ("architectures", "model_type", "rope_theta", "rope_scaling", "rope_parameters", "dtype",
                       "torch_dtype", "quantization_config", "text_config", "vision_config", "media_placeholder_token_id",
                       "head_dim", "qk_head_dim")
_EXPLICIT_TOP_KEYS = ("architectures", "model_type", "text_config", "vision_config", "media_placeholder_token_id",
                      "dtype", "torch_dtype", "quantization_config")


@documented
@dataclass(frozen=True, kw_only=True)
class KimiConfig:
    """Everything the Kimi K2.x language model needs (K2.5/K2.7-Code values in brackets).

    Each field below says what it means; the ones stored under one key of the text config are declared
    with :func:`config_key`, so that adding a key is adding one line here.
    """

    # ---- layout (explicit code) ----
    layout: str = about('``"kimi_k25"`` (nested; weights under ``language_model.``) or ``"flat"`` '
                        "(K2-Instruct, K2-Thinking, HF DeepseekV3; weights under ``model.`` / ``lm_head``)")
    model_type: str = about('the top-level ``model_type`` as written [``"kimi_k25"``]')
    text_model_type: str = about('``text_config.model_type`` (nested) or ``model_type`` (flat) [``"kimi_k2"``]')
    # ---- sizes ----
    vocab_size: int = config_key(count, "embedding rows [163840 = 163584 BPE ranks + 256 special slots]")
    hidden_size: int = config_key(count, "residual width d [7168]")
    num_hidden_layers: int = config_key(count, "decoder layers [61]")
    max_position_embeddings: int = config_key(count, "longest sequence [262144]")
    # ---- attention (MLA) ----
    num_attention_heads: int = config_key(count, "query heads h [64]")
    num_key_value_heads: int = config_key(count, "ignored by MLA (every head reads the same latent) [64]")
    q_lora_rank: int | None = config_key(integer_or_null, "query down-projection rank [1536] (null: a plain q_proj)")
    kv_lora_rank: int = config_key(count, "the cached latent's width [512]")
    qk_nope_head_dim: int = config_key(count, "per-head query/key part without position [128]")
    qk_rope_head_dim: int = config_key(count, "per-head rotary part [64]; the rotary key is one head shared by all")
    v_head_dim: int = config_key(count, "per-head value width [128] (may differ from qk_nope_head_dim)")
    attention_bias: bool = config_key(flag, "bias on q_a/kv_a/o projections [false]")
    rope: RopeConfig = about("RoPE, from either spelling (explicit code) [YaRN, θ 50000, factor 64, β 32/1, "
                             "mscale 1/1, original 4096]")
    rope_interleave: bool = config_key(flag, "rotary dims stored as adjacent pairs (x0, y0, x1, y1, …) [true; "
                                       "DeepSeek always interleaves; transformers 5 writes it, Kimi does not]",
                                       default=True, write=False)
    # ---- MLP / MoE ----
    hidden_act: str = config_key(string, '``"silu"`` (SwiGLU)')
    intermediate_size: int = config_key(count, "dense MLP width of the first first_k_dense_replace layers [18432]")
    first_k_dense_replace: int = config_key(integer, "number of leading dense layers [1]")
    moe_layer_freq: int = config_key(count, "every n-th layer after those is MoE [1]")
    moe_intermediate_size: int = config_key(count, "width of each routed expert and of one shared expert [2048]")
    n_routed_experts: int = config_key(count, "experts per MoE layer [384]")
    n_shared_experts: int = config_key(integer, "always-on experts, fused into one MLP of width moe_intermediate × n [1]")
    num_experts_per_tok: int = config_key(count, "experts each token is routed to, k [8]")
    n_group: int = config_key(count, "expert groups for group-limited routing [1 = off]")
    topk_group: int = config_key(count, "groups chosen before experts [1]")
    topk_method: str = config_key(string, '``"noaux_tc"``: selection uses scores + e_score_correction_bias')
    scoring_func: str = config_key(string, '``"sigmoid"``: scores = sigmoid(logits) (fp32)')
    norm_topk_prob: bool = config_key(flag, "renormalise the k chosen scores to sum to 1 [true]")
    routed_scaling_factor: float = config_key(number, "multiplies the routed weights, not the shared expert [2.827]")
    # ---- norms ----
    rms_norm_eps: float = config_key(number, "eps of input/post-attention/final RMSNorms [1e-5] (the MLA latent norms "
                                     "q_a_layernorm/kv_a_layernorm use 1e-6 whatever this says; see mla.py)")
    # ---- tokens and the rest ----
    bos_token_id: int | None = config_key(token_id, "beginning-of-sequence id [163584 ``[BOS]``]", default=None,
                                          also_top=True)
    eos_token_id: int | tuple[int, ...] | None = config_key(
        token_ids, "end-of-sequence id [163585 ``[EOS]``]; a list in some files (kept as a tuple)", default=None,
        also_top=True)
    pad_token_id: int | None = config_key(token_id, "padding id [163839 ``[PAD]``]", default=None, also_top=True)
    media_placeholder_token_id: int | None = about("``<|media_pad|>`` [163605], top level of the nested layout only")
    tie_word_embeddings: bool = config_key(flag, "lm_head shares the embedding [false]", default=False, also_top=True)
    num_nextn_predict_layers: int = config_key(integer, "multi-token-prediction layers [0; their tensors are not used]",
                                               default=0)
    dtype: str | None = about('the declared dtype of non-quantized tensors [``"bfloat16"``]; informational (each '
                              "tensor's header gives its real dtype; load_model takes the compute dtype)")
    quantization: QuantConfig | None = about("QuantConfig or None (K2-Instruct's FP8 is refused with a clear error)",
                                             default=None)
    vision: VisionConfig | None = about("VisionConfig or None", default=None)
    extra: dict = about("text-config keys that do not change inference (aux_loss_alpha, ep_size, use_cache, ...), "
                        "kept for to_dict", default_factory=dict, compare=False, repr=False)
    top_extra: dict = about("the same for the nested layout's top level", default_factory=dict, compare=False,
                            repr=False)
    source: str = about("the file this came from (for error messages)", default="<dict>", compare=False)

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope [192]."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` has routed experts (DeepSeek's rule: past the dense prefix, every moe_layer_freq-th)."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def weight_prefix(self) -> str:
        """Where the language model's tensors live in the checkpoint: ``"language_model."`` or ``""``."""
        return "language_model." if self.layout == "kimi_k25" else ""

    def replace(self, **changes: Any) -> "KimiConfig":
        """A copy with some fields changed, validated again."""
        new = dataclasses.replace(self, **changes)
        new._validate()
        return new

    # ---- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "KimiConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "KimiConfig":
        top = Reader(data, source)
        model_type = top.get("model_type", str)
        if model_type in _NESTED_TYPES:
            text = top.child("text_config")
            layout = "kimi_k25"
            vision = _read_vision(top.child("vision_config")) if top.has("vision_config") else None
            # The real K2.5 file keeps quantization_config only under text_config; transformers
            # dumps add a top-level copy. Prefer the text_config one; they must agree if both exist.
            quant_src = text if text.has("quantization_config") else (top if top.has("quantization_config") else None)
            if text.has("quantization_config") and top.has("quantization_config"):
                if top.data["quantization_config"] != text.data["quantization_config"]:
                    raise ConfigError(f"{source}: top-level 'quantization_config' differs from 'text_config.quantization_config'")
        elif model_type in _FLAT_TYPES:
            text, layout, vision = top, "flat", None
            quant_src = top if top.has("quantization_config") else None
        else:
            raise ConfigError(
                f"{source}: unknown config layout: model_type {model_type!r}; expected one of "
                f"{_NESTED_TYPES + _FLAT_TYPES}"
            )
        quantization = None
        if quant_src is not None and quant_src.data.get("quantization_config") is not None:
            qdata = quant_src.data["quantization_config"]
            if isinstance(qdata, dict) and qdata.get("quant_method") == "fp8":
                raise ConfigError(
                    f"{source}: this checkpoint stores experts in block FP8 (K2-Instruct); kimi_ref loads the "
                    "INT4 compressed-tensors releases (K2-Thinking, K2.5, K2.6, K2.7-Code)"
                )
            quantization = _read_quant(quant_src.child("quantization_config"))

        text_model_type = text.get("model_type", str, model_type)
        written_by_hf = text_model_type == "deepseek_v3" and not text.has("topk_method")
        dtype = text.get("dtype", str, None, nullable=True) or text.get("torch_dtype", str, None, nullable=True) \
            or top.get("dtype", str, None, nullable=True) or top.get("torch_dtype", str, None, nullable=True)
        text_keys = set(_EXPLICIT_TEXT_KEYS) | {key for _, key, _ in declared(cls)}
        top_keys = set(_EXPLICIT_TOP_KEYS) | {key for _, key, spec in declared(cls) if spec.also_top}
        cfg = cls(
            layout=layout, model_type=model_type, text_model_type=text_model_type,
            **read_declared(cls, text, top, _HF_DEFAULTS if written_by_hf else None),
            rope=_read_rope(text),
            media_placeholder_token_id=top.get("media_placeholder_token_id", int, None, nullable=True),
            dtype=dtype, quantization=quantization, vision=vision,
            extra={k: v for k, v in text.data.items() if k not in text_keys},
            top_extra={k: v for k, v in top.data.items() if k not in top_keys} if layout == "kimi_k25" else {},
            source=source,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        s = self.source

        def bad(msg: str) -> None:
            raise ConfigError(f"{s}: {msg}")

        if self.hidden_act != "silu":
            bad(f"'hidden_act' is {self.hidden_act!r}; Kimi's experts are SwiGLU ('silu')")
        if self.topk_method != "noaux_tc":
            bad(f"'topk_method' is {self.topk_method!r}; kimi_ref implements 'noaux_tc'")
        if self.scoring_func != "sigmoid":
            bad(f"'scoring_func' is {self.scoring_func!r}; kimi_ref implements 'sigmoid'")
        if not self.rope_interleave:
            bad("'rope_interleave' is false; Kimi's rotary dims are interleaved pairs")
        if self.qk_rope_head_dim % 2:
            bad(f"'qk_rope_head_dim' must be even, found {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            bad(f"'n_routed_experts' {self.n_routed_experts} must be divisible by 'n_group' {self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            bad(f"'topk_group' {self.topk_group} must lie in 1..n_group ({self.n_group})")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad(f"'num_experts_per_tok' {self.num_experts_per_tok} exceeds the experts in {self.topk_group} chosen group(s)")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            bad("group-limited routing scores each group by its top-2 experts: each group needs at least 2")
        if self.first_k_dense_replace < 0:  # larger than num_hidden_layers is legal: every layer is dense
            bad(f"'first_k_dense_replace' must be >= 0, found {self.first_k_dense_replace}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad(f"'q_lora_rank' must be positive or null, found {self.q_lora_rank}")
        if self.rms_norm_eps <= 0:
            bad(f"'rms_norm_eps' must be positive, found {self.rms_norm_eps}")
        if self.rope.type == "yarn":
            r = self.rope
            if r.factor is None or r.factor < 1:
                bad(f"YaRN 'factor' must be >= 1, found {r.factor}")
            if r.beta_fast is None or r.beta_slow is None or r.beta_fast < r.beta_slow:
                bad(f"YaRN 'beta_fast' ({r.beta_fast}) must be >= 'beta_slow' ({r.beta_slow})")
        for name in ("bos_token_id", "pad_token_id", "media_placeholder_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                bad(f"'{name}' {value} is outside the vocabulary (0..{self.vocab_size - 1})")
        for value in self.eos_token_ids:
            if not 0 <= value < self.vocab_size:
                bad(f"'eos_token_id' {value} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.vision is not None and self.vision.text_hidden_size != self.hidden_size:
            bad(f"'vision_config.text_hidden_size' {self.vision.text_hidden_size} != 'hidden_size' {self.hidden_size}")

    # ---- writing ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """config.json content in this config's own layout, Kimi spelling (rope_theta + rope_scaling)."""
        text: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": self.text_model_type,
                                **write_declared(self), "rope_theta": self.rope.theta,
                                "rope_scaling": self.rope.to_rope_scaling(), "dtype": self.dtype, **self.extra}
        if self.quantization is not None:
            text["quantization_config"] = dict(self.quantization.raw) or _quant_to_dict(self.quantization)
        if self.layout == "flat":
            return text
        top: dict[str, Any] = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": self.model_type,
                               "text_config": text, **write_declared(self, only_top=True),
                               "media_placeholder_token_id": self.media_placeholder_token_id, "dtype": self.dtype}
        if self.vision is not None:
            top["vision_config"] = self.vision.to_dict()
        top.update(self.top_extra)
        return top

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _quant_to_dict(q: QuantConfig) -> dict[str, Any]:
    return {
        "quant_method": q.quant_method, "format": q.format, "quantization_status": "compressed", "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": list(q.targets), "input_activations": None, "output_activations": None,
            "weights": {"num_bits": q.num_bits, "type": q.type, "symmetric": q.symmetric, "strategy": q.strategy,
                        "group_size": q.group_size, "dynamic": False, "observer": "minmax", "observer_kwargs": {},
                        "actorder": None, "block_structure": None}}},
        "ignore": list(q.ignore),
    }


def load_config(path: str | Path) -> KimiConfig:
    """Read ``config.json`` (or a checkpoint directory holding one)."""
    return KimiConfig.from_file(path)


# ----------------------------------------------------------------------------------------------------------
# Shipped fixtures and tiny configs
# ----------------------------------------------------------------------------------------------------------

_FIXTURES = Path(__file__).parent / "data" / "configs"


def fixture_path(name: str) -> Path:
    """Path of a shipped config.json written from docs/sources.md: ``"kimi_k25"`` (K2.5/K2.7-Code layout) or
    ``"kimi_k2_thinking"`` (flat layout). Used by tests, ``memory_plan`` and the meta-device check."""
    path = _FIXTURES / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"no shipped config fixture {name!r}; have {sorted(p.stem for p in _FIXTURES.glob('*.json'))}")
    return path


def tiny_config(real: KimiConfig, *, vocab_size: int | None = None, hidden_size: int = 64, num_hidden_layers: int = 3,
                num_attention_heads: int = 4, q_lora_rank: int | None = 48, kv_lora_rank: int = 32,
                qk_nope_head_dim: int = 16, qk_rope_head_dim: int = 8, v_head_dim: int = 16,
                intermediate_size: int = 128, moe_intermediate_size: int = 32, n_routed_experts: int = 8,
                num_experts_per_tok: int = 2, n_group: int | None = None, topk_group: int | None = None,
                max_position_embeddings: int | None = None, original_max_position_embeddings: int | None = None,
                vision: bool = True, vision_hidden_size: int = 32, vision_heads: int = 2, vision_layers: int = 2,
                vision_intermediate_size: int = 64, vision_pos_emb: int = 8) -> KimiConfig:
    """Shrink a real config in size only, the litgpt way.

    Every behaviour flag is kept: YaRN (factor, betas, mscale, mscale_all_dim, theta), sigmoid
    ``noaux_tc`` scoring, ``norm_topk_prob``, ``routed_scaling_factor``, ``first_k_dense_replace``,
    ``n_shared_experts``, both eps, the quantization config and the layout. Special-token ids keep
    their place at the end of the vocabulary: an id ``s`` becomes ``s - real.vocab_size + vocab_size``.
    ``q_lora_rank`` keeps ``None`` if the real config has none.
    """
    vocab = vocab_size if vocab_size is not None else real.vocab_size

    def move(token: int | None) -> int | None:
        return None if token is None else token - real.vocab_size + vocab

    eos = tuple(move(t) for t in real.eos_token_id) if isinstance(real.eos_token_id, tuple) else move(real.eos_token_id)
    rope = real.rope
    if original_max_position_embeddings is not None and rope.type == "yarn":
        rope = dataclasses.replace(rope, original_max_position_embeddings=original_max_position_embeddings)
    vis = None
    if vision and real.vision is not None:
        vis = dataclasses.replace(
            real.vision, hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size,
            num_attention_heads=vision_heads, num_hidden_layers=vision_layers, mm_hidden_size=vision_hidden_size,
            text_hidden_size=hidden_size, init_pos_emb_height=vision_pos_emb, init_pos_emb_width=vision_pos_emb,
        )
    groups = n_group if n_group is not None else min(real.n_group, n_routed_experts)
    cfg = dataclasses.replace(
        real,
        vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
        q_lora_rank=None if real.q_lora_rank is None else q_lora_rank, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
        intermediate_size=intermediate_size, moe_intermediate_size=moe_intermediate_size,
        n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
        n_group=groups, topk_group=topk_group if topk_group is not None else min(real.topk_group, groups),
        max_position_embeddings=max_position_embeddings or real.max_position_embeddings, rope=rope,
        first_k_dense_replace=min(real.first_k_dense_replace, num_hidden_layers),
        bos_token_id=move(real.bos_token_id), eos_token_id=eos, pad_token_id=move(real.pad_token_id),
        media_placeholder_token_id=move(real.media_placeholder_token_id), vision=vis,
        source=f"tiny_config({real.source})",
    )
    cfg._validate()
    return cfg

