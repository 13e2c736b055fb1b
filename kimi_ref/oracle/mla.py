"""Multi-head Latent Attention (MLA), float64 oracle, in two forms that must agree.

Sizes: b batch, t query positions (T of them), s key positions (S = cached + T), d hidden_size,
h heads, c kv_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim
(Kimi: d 7168, h 64, c 512, n 128, r 64, v 128, q_lora_rank 1536).

Weights (names relative to ``self_attn.``):
    q_a_proj [q_lora, d], q_a_layernorm [q_lora], q_b_proj [h(n+r), q_lora]   (or q_proj [h(n+r), d])
    kv_a_proj_with_mqa [c+r, d], kv_a_layernorm [c], kv_b_proj [h(n+v), c], o_proj [d, h·v]
    (+ ``.bias`` on q_a_proj, kv_a_proj_with_mqa, o_proj when attention_bias; Kimi has none)

Equations, per token:
    q            = q_b_proj(rms_norm(q_a_proj(x), eps=1e-6))      -> per head [n | r] = (q_nope, q_rope)
    [latent|k_r] = kv_a_proj_with_mqa(x)                            latent [c], k_r [r], one k_r for all heads
    latent       = rms_norm(latent, eps=1e-6)                      (the latent norms ignore rms_norm_eps)
    q_rope, k_r  = rope(q_rope, pos), rope(k_r, pos)
    W_uk [h,n,c], W_uv [h,v,c] = kv_b_proj.weight viewed as [h, n+v, c] and split

naive form (materialize every head's K and V, then ordinary attention):
    k[s,h]   = [W_uk[h] latent[s] | k_r[s]]      v[s,h] = W_uv[h] latent[s]
    score[h,t,s] = scale · q[t,h] · k[s,h]

absorbed form (attend straight to the cached latent; W_uk moves into the query, W_uv to the output):
    score[h,t,s] = scale · ((W_uk[h]^T q_nope[t,h]) · latent[s] + q_rope[t,h] · k_r[s])
    out[t,h]     = W_uv[h] Σ_s p[h,t,s] latent[s]

both: p = softmax_s(score + causal mask), out = o_proj(concat_h out[t,h]),
scale = softmax_scale(config) = qk_head_dim^-0.5 · mscale² (1/√192 · mscale² for Kimi, never 1/√576).

Cache: a dict ``{"latent": [B,S,c], "k_rope": [B,S,r]}`` holding the *normalized* latent and the rope
key *after* RoPE: c + r numbers per token (576 for Kimi). Each call appends its T tokens in place
(start with ``{}``). Both forms read the same cache, so a prefill in one form can be continued in the
other. Query t of this call sits at key index S - T + t and sees keys 0 .. S - T + t.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kimi_ref.config import KimiConfig
from kimi_ref.oracle.norms import rms_norm
from kimi_ref.oracle.rope import apply_rope, cos_sin, softmax_scale

__all__ = ["LATENT_NORM_EPS", "mla", "query", "compress_kv", "split_kv_b", "causal_mask", "probabilities", "softmax",
           "scores_naive", "scores_absorbed"]

# DeepSeek builds q_a_layernorm and kv_a_layernorm as RMSNorm(rank) with the class default eps=1e-6;
# config.rms_norm_eps (1e-5 for Kimi) is only passed to the decoder-layer norms.
LATENT_NORM_EPS = 1e-6

Record = Callable[[str, np.ndarray], None]  # record(name, value): how a trace sees the inside of a forward


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    """``x @ W.T (+ b)`` for the weight ``name.weight`` (and ``name.bias`` if the checkpoint has one)."""
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def query(x: np.ndarray, w: dict[str, np.ndarray], config: KimiConfig,
          record: Record | None = None) -> tuple[np.ndarray, np.ndarray]:
    """q_nope [B,T,h,n] and q_rope [B,T,h,r] (before RoPE), through the low-rank q_a/q_b pair."""
    b, t, _ = x.shape
    h, n, r = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    if config.q_lora_rank is None:
        q = _linear(x, w, "q_proj")
    else:
        q_latent = rms_norm(_linear(x, w, "q_a_proj"), w["q_a_layernorm.weight"], LATENT_NORM_EPS)
        if record is not None:
            record("q_latent", q_latent)
        q = _linear(q_latent, w, "q_b_proj")
    # Head j owns columns j·(n+r) .. j·(n+r)+n-1 (nope) and the r after them (rope): picked by index, head by
    # head, rather than by a reshape, so a wrong head layout in the torch path's view cannot hide here.
    q_nope = np.stack([q[..., j * (n + r): j * (n + r) + n] for j in range(h)], axis=2)
    q_rope = np.stack([q[..., j * (n + r) + n: (j + 1) * (n + r)] for j in range(h)], axis=2)
    return q_nope, q_rope


def compress_kv(x: np.ndarray, w: dict[str, np.ndarray], config: KimiConfig,
                record: Record | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The normalized latent [B,T,c] and the shared rope key [B,T,r] (before RoPE)."""
    c = config.kv_lora_rank
    kv = _linear(x, w, "kv_a_proj_with_mqa")
    latent = rms_norm(kv[..., :c], w["kv_a_layernorm.weight"], LATENT_NORM_EPS)
    if record is not None:
        record("kv_latent", latent)
    return latent, kv[..., c:]


def split_kv_b(w: dict[str, np.ndarray], config: KimiConfig) -> tuple[np.ndarray, np.ndarray]:
    """W_uk [h,n,c] (latent -> key nope) and W_uv [h,v,c] (latent -> value) out of kv_b_proj [h(n+v), c]."""
    h, n, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    kv_b = w["kv_b_proj.weight"]
    # rows j·(n+v) .. +n-1 make head j's key (nope part), the v rows after them its value
    w_uk = np.stack([kv_b[j * (n + v): j * (n + v) + n] for j in range(h)])
    w_uv = np.stack([kv_b[j * (n + v) + n: (j + 1) * (n + v)] for j in range(h)])
    return w_uk, w_uv


def causal_mask(t: int, s: int) -> np.ndarray:
    """[T,S] additive mask: 0 where key s <= the query's own index S-T+t, -inf after it."""
    visible = np.tril(np.ones((t, s), dtype=bool), k=s - t)  # row t sees keys 0 .. S-T+t
    return np.where(visible, 0.0, -np.inf)


def probabilities(scores: np.ndarray, config: KimiConfig) -> np.ndarray:
    """Attention probabilities [B,h,T,S] from unscaled scores: softmax(scale · scores + causal mask)."""
    t, s = scores.shape[-2:]
    return softmax(scores * softmax_scale(config) + causal_mask(t, s))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, as exp(score - logsumexp): -inf entries get probability 0."""
    top = np.max(scores, axis=-1, keepdims=True)
    log_total = top + np.log(np.sum(np.exp(scores - top), axis=-1, keepdims=True))
    return np.exp(scores - log_total)


# The attention itself is written head by head with plain matrix products (``@``): the torch path uses
# einsums over all heads at once, and a wrong index letter there has no twin here to hide behind.


def scores_naive(q_nope: np.ndarray, q_rope: np.ndarray, latent: np.ndarray, k_rope: np.ndarray,
                 w_uk: np.ndarray) -> np.ndarray:
    """Unscaled logits [B,h,T,S] from materialized per-head keys k = [W_uk·latent | k_rope]."""
    per_head = []
    for j in range(w_uk.shape[0]):
        keys = np.concatenate([latent @ w_uk[j].T, k_rope], axis=-1)  # head j's keys [B,S,n+r]
        queries = np.concatenate([q_nope[:, :, j], q_rope[:, :, j]], axis=-1)  # [B,T,n+r]
        per_head.append(queries @ keys.transpose(0, 2, 1))  # [B,T,S]
    return np.stack(per_head, axis=1)


def scores_absorbed(q_nope: np.ndarray, q_rope: np.ndarray, latent: np.ndarray, k_rope: np.ndarray,
                    w_uk: np.ndarray) -> np.ndarray:
    """Unscaled logits [B,h,T,S] against the latent itself: (W_uk^T q_nope)·latent + q_rope·k_rope."""
    per_head = []
    for j in range(w_uk.shape[0]):
        q_latent = q_nope[:, :, j] @ w_uk[j]  # head j's query moved into latent space [B,T,c]
        per_head.append(q_latent @ latent.transpose(0, 2, 1) + q_rope[:, :, j] @ k_rope.transpose(0, 2, 1))
    return np.stack(per_head, axis=1)


def mla(x: np.ndarray, w: dict[str, np.ndarray], config: KimiConfig, positions: np.ndarray,
        cache: dict[str, np.ndarray] | None = None, form: str = "naive", record: Record | None = None) -> np.ndarray:
    """Multi-head latent attention [B,T,d] -> [B,T,d] in the ``"naive"`` or ``"absorbed"`` form (see the module doc).

    ``record(name, array)``, if given, receives ``q_latent`` and ``kv_latent`` (the trace tool's names)."""
    if form not in ("naive", "absorbed"):
        raise ValueError(f"mla: form must be 'naive' or 'absorbed', found {form!r}")
    x = np.asarray(x, dtype=np.float64)
    b, t, _ = x.shape
    positions = np.asarray(positions)
    if positions.shape != (t,):
        raise ValueError(f"mla: positions must have shape ({t},) for {t} tokens, found {positions.shape}")
    r = config.qk_rope_head_dim

    q_nope, q_rope = query(x, w, config, record)
    latent, k_rope = compress_kv(x, w, config, record)
    cos, sin = cos_sin(positions, config.rope, r)  # [T, r/2]
    q_rope = apply_rope(q_rope, cos[:, None, :], sin[:, None, :])  # same angle for every head
    k_rope = apply_rope(k_rope, cos, sin)

    if cache is not None:
        if cache:
            if cache["latent"].shape[0] != b:
                raise ValueError(f"mla: cache holds batch {cache['latent'].shape[0]}, input has batch {b}")
            latent = np.concatenate([cache["latent"], latent], axis=1)
            k_rope = np.concatenate([cache["k_rope"], k_rope], axis=1)
        cache["latent"], cache["k_rope"] = latent, k_rope

    w_uk, w_uv = split_kv_b(w, config)
    score_fn = scores_naive if form == "naive" else scores_absorbed
    p = probabilities(score_fn(q_nope, q_rope, latent, k_rope, w_uk), config)  # [B,h,T,S]

    outputs = []
    for j in range(w_uv.shape[0]):
        if form == "naive":
            outputs.append(p[:, j] @ (latent @ w_uv[j].T))  # head j's values [B,S,v] materialized, then mixed
        else:
            outputs.append((p[:, j] @ latent) @ w_uv[j].T)  # mixed in latent space, then up to v
    return _linear(np.concatenate(outputs, axis=-1), w, "o_proj")  # heads side by side: [B,T,h·v]
