"""The decoder layer and the causal language model, float64 oracle.

    input_ids [B,T] (int)  ->  logits [B,T,V]

    x = embed_tokens[input_ids]                                               [B,T,d]
    for each layer i:                                                         (pre-norm residual blocks)
        x = x + mla(rms_norm(x, input_layernorm, rms_norm_eps), positions)
        x = x + mlp_i(rms_norm(x, post_attention_layernorm, rms_norm_eps))
            mlp_i = dense SwiGLU for i < first_k_dense_replace, else the MoE (router + experts + shared)
    logits = rms_norm(x, model.norm, rms_norm_eps) · lm_headᵀ

Weights: one flat dict keyed by the checkpoint names without a ``language_model.`` prefix
(``model.embed_tokens.weight``, ``model.layers.3.self_attn.kv_b_proj.weight``, ``lm_head.weight`` ...),
float64, INT4 experts already dequantized (``checkpoint.load_weights`` gives exactly this).

Incremental decoding: pass ``cache = new_cache(config)`` (one MLA cache dict per layer); each call
continues at position ``cache length`` and appends its tokens, so a prefill followed by one-token
steps gives the same logits as one call on the whole sequence.
"""

from __future__ import annotations

import numpy as np

from kimi_ref.config import KimiConfig
from kimi_ref.oracle.experts import dense_mlp, moe
from kimi_ref.oracle.mla import Record, mla
from kimi_ref.oracle.norms import rms_norm

__all__ = ["sub_weights", "new_cache", "cache_length", "decoder_layer", "hidden_states", "logits"]


def sub_weights(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors under ``prefix`` (e.g. ``"model.layers.2."``), with the prefix removed from their names."""
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def new_cache(config: KimiConfig) -> list[dict[str, np.ndarray]]:
    """An empty cache: one MLA cache dict per layer."""
    return [{} for _ in range(config.num_hidden_layers)]


def cache_length(cache: list[dict[str, np.ndarray]] | None) -> int:
    """How many tokens the cache already holds (0 for none)."""
    if not cache or not cache[0]:
        return 0
    return cache[0]["latent"].shape[1]


def decoder_layer(x: np.ndarray, w: dict[str, np.ndarray], config: KimiConfig, layer_idx: int, positions: np.ndarray,
                  cache: dict[str, np.ndarray] | None = None, *, form: str = "naive",
                  record: Record | None = None) -> np.ndarray:
    """One pre-norm block [B,T,d] -> [B,T,d]; ``w`` holds the layer's tensors named relative to ``model.layers.i.``.

    ``record(name, array)``, if given, sees every named activation of the block (``docs/numerics.md``, traces)."""
    note = record or (lambda name, value: None)
    eps = config.rms_norm_eps
    attn_in = rms_norm(x, w["input_layernorm.weight"], eps)
    note("attn_in", attn_in)
    attn_out = mla(attn_in, sub_weights(w, "self_attn."), config, positions, cache, form, record)
    note("attn_out", attn_out)
    x = x + attn_out

    mlp_in = rms_norm(x, w["post_attention_layernorm.weight"], eps)
    note("mlp_in", mlp_in)
    flat = mlp_in.reshape(-1, mlp_in.shape[-1])  # the MLP sees tokens, not sequences
    mlp_w = sub_weights(w, "mlp.")
    if config.is_moe_layer(layer_idx):
        # the router's per-token arrays come back [B·T, ...]: give them the batch shape of everything else
        out = moe(flat, mlp_w, config, record and (lambda name, v: record(name, v.reshape(*x.shape[:2], -1))))
    else:
        out = dense_mlp(flat, mlp_w)
    note("mlp_out", out.reshape(x.shape))
    x = x + out.reshape(x.shape)
    note("residual", x)
    return x


def hidden_states(input_ids: np.ndarray, weights: dict[str, np.ndarray], config: KimiConfig, *,
                  cache: list[dict[str, np.ndarray]] | None = None, form: str = "naive",
                  record: Record | None = None) -> np.ndarray:
    """The final-norm hidden states [B,T,d] (what lm_head reads); ``record`` sees ``embed``,
    ``layers.{i}.<name>`` for every block and ``final_norm``."""
    ids = _check_ids(input_ids, config)
    if cache is not None and len(cache) != config.num_hidden_layers:
        raise ValueError(f"cache has {len(cache)} layers, the config has {config.num_hidden_layers}; "
                         "use new_cache(config)")
    start = cache_length(cache)
    positions = np.arange(start, start + ids.shape[1])
    x = np.asarray(weights["model.embed_tokens.weight"], dtype=np.float64)[ids]
    if record is not None:
        record("embed", x)
    for i in range(config.num_hidden_layers):
        layer_w = sub_weights(weights, f"model.layers.{i}.")
        layer_record = record and (lambda name, v, i=i: record(f"layers.{i}.{name}", v))
        x = decoder_layer(x, layer_w, config, i, positions, None if cache is None else cache[i], form=form,
                          record=layer_record)
    out = rms_norm(x, weights["model.norm.weight"], config.rms_norm_eps)
    if record is not None:
        record("final_norm", out)
    return out


def logits(input_ids: np.ndarray, weights: dict[str, np.ndarray], config: KimiConfig, *,
           cache: list[dict[str, np.ndarray]] | None = None, form: str = "naive",
           record: Record | None = None) -> np.ndarray:
    """Next-token logits [B,T,V] in float64 (``record``: see :func:`hidden_states`; it also sees ``logits``)."""
    h = hidden_states(input_ids, weights, config, cache=cache, form=form, record=record)
    head = weights.get("lm_head.weight")
    if head is None and config.tie_word_embeddings:
        head = weights["model.embed_tokens.weight"]  # tied: the output projection is the embedding
    if head is None:
        raise KeyError("lm_head.weight is missing and tie_word_embeddings is false")
    out = h @ np.asarray(head, dtype=np.float64).T
    if record is not None:
        record("logits", out)
    return out


def _check_ids(input_ids: np.ndarray, config: KimiConfig) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be a [batch, time] array, found shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must hold integers, found dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError(f"input_ids has no tokens (shape {ids.shape})")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = ids[(ids < 0) | (ids >= config.vocab_size)][0]
        raise ValueError(f"input_ids holds {int(bad)}, outside the vocabulary 0..{config.vocab_size - 1}")
    return ids.astype(np.int64)
