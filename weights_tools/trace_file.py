"""The trace file: every named activation of one forward pass, in one safetensors file any engine can write.

    save_trace(path, tensors: {name: Tensor}, header: dict, force=False)      atomic; never overwrites unless force
    load_trace(path) -> Trace(header, tensors)                                checks what a diff relies on

Names, for a model of L layers (``[B,T,…]``: the prompt's batch and tokens; shapes in docs/numerics.md):

    embed                              [B,T,d]   token embeddings
    layers.{i}.attn_in                 [B,T,d]   input_layernorm(x): what attention reads
    layers.{i}.q_latent                [B,T,q]   q_a_layernorm(q_a_proj(attn_in))      (absent without q_lora_rank)
    layers.{i}.kv_latent               [B,T,c]   kv_a_layernorm(latent part of kv_a_proj_with_mqa(attn_in))
    layers.{i}.attn_out                [B,T,d]   the attention block's output (after o_proj and its all-reduce)
    layers.{i}.mlp_in                  [B,T,d]   post_attention_layernorm(x + attn_out)
    layers.{i}.router_scores           [B,T,E]   sigmoid(mlp_in · gateᵀ), before the bias      (MoE layers)
    layers.{i}.router_experts          [B,T,k]   the chosen expert ids, int64, in any order    (MoE layers)
    layers.{i}.mlp_out                 [B,T,d]   dense MLP or MoE (routed + shared) output
    layers.{i}.residual                [B,T,d]   the layer's output: x + attn_out + mlp_out
    final_norm                         [B,T,d]   model.norm(x)
    logits                             [B,T,V]

Values are stored in the dtype they were computed in (bf16 stays bf16: the diff counts its ulps).
The safetensors metadata key ``kimi_ref_trace`` holds a JSON header; required: ``format`` (1),
``input_ids`` ([[int]]), ``dtype`` (the compute dtype: float64, float32, float16, bfloat16);
optional: ``precision`` (a row of ``kimi_ref.tolerances.RTOL`` when it differs from ``dtype``, e.g.
"tf32"), ``source``, ``checkpoint``, ``prompt``, ``backend``, ``tp``, ``mla_mode``, ``versions``,
``names`` (the order of the forward pass; default: the order above).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from weights_tools.safe_write import OutputError, write_file

__all__ = ["FORMAT", "META_KEY", "DTYPES", "LAYER_NAMES", "TraceError", "Trace", "canonical_order", "split_name",
           "save_trace", "load_trace"]

FORMAT = 1
META_KEY = "kimi_ref_trace"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYER_NAMES = ("attn_in", "q_latent", "kv_latent", "attn_out", "mlp_in", "router_scores", "router_experts", "mlp_out",
               "residual")
_LAYER = re.compile(r"^layers\.(\d+)\.(\w+)$")


class TraceError(ValueError):
    """A trace file that cannot be read, or two that cannot be compared."""


@dataclass
class Trace:
    """One forward pass: the header and the activations by name, in forward order."""

    path: str
    header: dict
    tensors: dict[str, torch.Tensor]

    @property
    def precision(self) -> object:
        """The tolerance row this trace's numbers answer to: a torch dtype, or e.g. "tf32"."""
        name = self.header.get("precision", self.header["dtype"])
        return DTYPES.get(name, name)

    def describe(self) -> str:
        h = self.header
        parts = [h.get("source", "?"), h["dtype"]]
        if h.get("precision") not in (None, h["dtype"]):
            parts.append(f"precision {h['precision']}")
        parts += [f"{k} {h[k]}" for k in ("backend", "tp", "mla_mode") if h.get(k) not in (None, "")]
        return ", ".join(str(p) for p in parts)


def split_name(name: str) -> tuple[int | None, str]:
    """``"layers.3.attn_out"`` → (3, "attn_out"); ``"logits"`` → (None, "logits")."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def canonical_order(names) -> list[str]:
    """Forward order: embed, each layer's names in ``LAYER_NAMES`` order, final_norm, logits, anything else last."""
    def key(name: str):
        layer, act = split_name(name)
        if layer is None:
            first = {"embed": (0,), "final_norm": (2,), "logits": (3,)}
            return first.get(act, (4,)) + (0, 0, act)
        rank = LAYER_NAMES.index(act) if act in LAYER_NAMES else len(LAYER_NAMES)
        return (1, layer, rank, act)

    return sorted(names, key=key)


def save_trace(path: str | Path, tensors: dict[str, torch.Tensor], header: dict, *, force: bool = False) -> Path:
    """Write ``tensors`` (CPU, any dtype) and ``header`` (JSON) to ``path`` atomically (a temp file, then rename)."""
    from safetensors.torch import save_file

    header = {"format": FORMAT, **header, "names": list(tensors)}
    _check_header(header, str(path))
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:  # the project's one write policy: no overwrite without force, a temporary name, then a rename
        return write_file(path, lambda tmp: save_file(data, str(tmp), metadata={META_KEY: json.dumps(header), "format": "pt"}),
                          force=force, what="trace")
    except OutputError as err:
        raise TraceError(str(err)) from None


def _check_header(header: dict, where: str) -> None:
    if header.get("format") != FORMAT:
        raise TraceError(f"{where}: trace format {header.get('format')!r}, this kimi_ref reads format {FORMAT}")
    if header.get("dtype") not in DTYPES:
        raise TraceError(f"{where}: header 'dtype' is {header.get('dtype')!r}, expected one of {sorted(DTYPES)}")
    ids = header.get("input_ids")
    if not (isinstance(ids, list) and ids and all(isinstance(r, list) and r and all(isinstance(i, int) for i in r)
                                                  for r in ids)):
        raise TraceError(f"{where}: header 'input_ids' must be a non-empty list of lists of token ids, found {ids!r}")


def load_trace(path: str | Path) -> Trace:
    """Read a trace file, checking its header and that every activation is batch × tokens first."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TraceError(f"{path}: not a safetensors file ({err})") from None
    if META_KEY not in meta:
        raise TraceError(f"{path}: no '{META_KEY}' metadata; expected a file written by python -m weights_tools.trace "
                         "or by another engine following docs/numerics.md (Traces)")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as err:
        raise TraceError(f"{path}: the '{META_KEY}' metadata is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise TraceError(f"{path}: the '{META_KEY}' metadata must be a JSON object")
    _check_header(header, str(path))
    b, t = len(header["input_ids"]), len(header["input_ids"][0])
    for name, value in tensors.items():
        if tuple(value.shape[:2]) != (b, t):
            raise TraceError(f"{path}: activation '{name}' has shape {tuple(value.shape)}; every activation starts "
                             f"with [batch, tokens] = [{b}, {t}] of input_ids")
    names = header.get("names") or canonical_order(tensors)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise TraceError(f"{path}: the header names {unknown[:3]} but the file holds no such tensors")
    order = names + [n for n in canonical_order(tensors) if n not in names]
    return Trace(str(path), header, {n: tensors[n] for n in order})
