"""Multi-head Latent Attention (MLA): every head's keys and values come out of one small cached latent.

Sizes (Kimi K2.x in brackets): b batch, t query positions (T of them), s key positions (S = cached
+ T), d hidden_size [7168], h heads [64; this rank's share under tensor parallelism], c kv_lora_rank
[512], n qk_nope_head_dim [128], r qk_rope_head_dim [64], v v_head_dim [128], q_lora_rank [1536].

Weights (the checkpoint's names under ``self_attn.``):

    q_a_proj [q_lora, d] → q_a_layernorm [q_lora] → q_b_proj [h(n+r), q_lora]   (q_proj [h(n+r), d] if q_lora_rank is null)
    kv_a_proj_with_mqa [c+r, d] → kv_a_layernorm [c]      kv_b_proj [h(n+v), c]      o_proj [d, h·v]

Per token:

    q_nope, q_rope = q_b_proj(rms_norm(q_a_proj(x), eps=1e-6))    viewed [h, n+r], split [n | r]
    latent, k_rope = kv_a_proj_with_mqa(x)                          split [c | r]; one rope key for all heads
    latent         = rms_norm(latent, eps=1e-6)                     (the latent norms ignore rms_norm_eps)
    q_rope, k_rope = rope(q_rope, pos), rope(k_rope, pos)            interleaved, see rope.py
    W_uk [h,n,c], W_uv [h,v,c] = kv_b_proj.weight viewed [h, n+v, c], split

Two forms with the same parameters and the same numbers:

* **naive**: materialise every head's key ``[W_uk·latent | k_rope]`` and value ``W_uv·latent`` and run
  ordinary attention. Its cache is the MHA-equivalent one: h·(n+r+v) numbers per token per layer
  (64 · 320 = 20,480 for Kimi).
* **absorbed**: never build per-head keys. Since ``q_nope·(W_uk latent) = (W_ukᵀ q_nope)·latent``, move
  W_uk into the query and attend straight to the latent; since the value is linear in the latent,
  attend over latents and apply W_uv to the result:

      score[h,t,s] = (W_uk[h]ᵀ q_nope[t,h]) · latent[s] + q_rope[t,h] · k_rope[s]
      out[t,h]     = W_uv[h] · Σ_s p[h,t,s] latent[s]

  Its cache is the normalized latent and the rope key *after* RoPE: c + r numbers per token per
  layer (576 for Kimi, 35.6× smaller).

Both: ``p = softmax_s(scale · score + causal mask)``, the scores, softmax and weighted sum in fp32
whatever the model dtype (the caches stay in the model dtype), ``scale = softmax_scale(config)``
(1/√192 · mscale², never 1/√576), and ``o_proj`` over the concatenated heads. Under tensor
parallelism each rank owns h/N heads: q_b_proj and kv_b_proj hold their rows, o_proj its columns, and
o_proj's partial sums meet in one all-reduce; an o_proj bias is added once, after it.

Kernels (handed over by :mod:`kimi_ref.backend`): ``rope_kernel`` turns q_rope and k_rope
(``kernels.apply_rope``), ``decode_kernel`` runs a one-token absorbed step (``kernels.mla_decode``);
prefill, the naive form and ``track_max_logit`` stay on the torch path, which is the reference.

Float64 twin: ``kimi_ref/oracle/mla.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_ref import parallel
from kimi_ref.config import KimiConfig
from kimi_ref.norms import RMSNorm
from kimi_ref.parallel import SINGLE, TP
from kimi_ref.rope import RotaryEmbedding, apply_rope, softmax_scale

__all__ = ["LATENT_NORM_EPS", "MLA_MODES", "MLA", "LayerCache", "KVCache", "causal_mask", "absorbed_scores",
           "mix_latents"]

# DeepSeek builds q_a_layernorm and kv_a_layernorm as RMSNorm(rank) with the class default eps=1e-6;
# config.rms_norm_eps (1e-5 for Kimi) is only passed to the decoder-layer norms. Kimi inherits this.
LATENT_NORM_EPS = 1e-6
MLA_MODES = ("absorbed", "naive")


def causal_mask(t: int, s: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [T,S]: query t (the key index S-T+t) may see keys 0 .. S-T+t."""
    query_index = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= query_index


# ----------------------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------------------


def absorbed_scores(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """Unscaled scores [B,h,T,S] in fp32 of queries moved into latent space, q_latent [B,T,h,c] and q_rope
    [B,T,h,r], against the cached latent [B,S,c] and rope key [B,S,r] (shared by every head)."""
    return (torch.einsum("bthc,bsc->bhts", q_latent.float(), latent.float())
            + torch.einsum("bthr,bsr->bhts", q_rope.float(), k_rope.float()))


def mix_latents(p: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Σ_s p[b,h,t,s] latent[b,s] -> [B,T,h,c] fp32: each head's output, still in latent space."""
    return torch.einsum("bhts,bsc->bthc", p.float(), latent.float())


class LayerCache:
    """One layer's KV cache, allocated once for ``max_len`` tokens; the first ``length`` are filled.

    absorbed: ``latent`` [B, max_len, c] and ``k_rope`` [B, max_len, r]  (c + r values per token)
    naive:    ``k`` [B, max_len, h, n+r] and ``v`` [B, max_len, h, v]   (the MHA-equivalent cache)
    """

    def __init__(self, tensors: dict[str, torch.Tensor], mode: str):
        self.tensors, self.mode, self.length = tensors, mode, 0
        first = next(iter(tensors.values()))
        self.batch, self.max_len = first.shape[0], first.shape[1]

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write T new tokens at ``length`` and advance it; return views of every filled token [B, S, ...]."""
        if set(new) != set(self.tensors):
            raise ValueError(f"{self.mode} cache holds {sorted(self.tensors)}, was given {sorted(new)}")
        first = next(iter(new.values()))
        if first.dim() < 2 or first.shape[0] != self.batch:
            raise ValueError(f"the {self.mode} cache was made for batch {self.batch}, the input has shape {tuple(first.shape)}")
        t = first.shape[1]
        for name, value in new.items():
            expected = (self.batch, t) + tuple(self.tensors[name].shape[2:])
            if tuple(value.shape) != expected:
                raise ValueError(f"{self.mode} cache {name!r}: new entries have shape {tuple(value.shape)}, expected "
                                 f"{expected} (was the cache made by another layer or config?)")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens: {self.length} cached + {t} new do not fit; "
                             "make a longer one with new_cache(batch, max_len)")
        for name, value in new.items():
            self.tensors[name][:, self.length:end] = value
        self.length = end
        return {name: buffer[:, :end] for name, buffer in self.tensors.items()}

    def values_per_token(self) -> int:
        return sum(buf[0, 0].numel() for buf in self.tensors.values())

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in this layer."""
        return sum(buf[0, 0].numel() * buf.element_size() for buf in self.tensors.values())


class KVCache:
    """The whole model's cache: one :class:`LayerCache` per decoder layer and the shared ``length``.

    ``length`` is how many tokens every layer holds; setting it (e.g. back to a shorter prefix)
    rewinds every layer.
    """

    def __init__(self, layers: list[LayerCache]):
        if not layers:
            raise ValueError("KVCache needs at least one layer")
        self.layers = layers
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        if not 0 <= value <= self.max_len:
            raise ValueError(f"cache length must lie in 0..{self.max_len}, found {value}")
        self._length = value
        for layer in self.layers:
            layer.length = value

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes, summed over layers (Kimi absorbed bf16: 61 × 576 × 2)."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    def values_per_token(self) -> int:
        """Numbers one token of one sequence takes, summed over layers."""
        return sum(layer.values_per_token() for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]


# ----------------------------------------------------------------------------------------------------------
# The attention module
# ----------------------------------------------------------------------------------------------------------


class MLA(nn.Module):
    """Multi-head latent attention [B,T,d] -> [B,T,d], ``mode`` "absorbed" (default) or "naive".

    ``track_max_logit``: when True, each forward stores ``self.max_logit`` (fp32 [local heads]), the
    largest scaled pre-softmax logit of that forward, for QK-Clip (it is overwritten, not accumulated).
    """

    def __init__(self, config: KimiConfig, *, tp: TP = SINGLE, mode: str = "absorbed",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 track_max_logit: bool = False):
        super().__init__()
        if mode not in MLA_MODES:
            raise ValueError(f"MLA mode must be one of {MLA_MODES}, found {mode!r}")
        d, c = config.hidden_size, config.kv_lora_rank
        n, r, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        h = tp.local(config.num_attention_heads, "num_attention_heads")
        self.heads, self.nope, self.rope_dim, self.value_dim, self.latent_dim = h, n, r, v, c
        self.mode, self.tp = mode, tp
        self.rope_kernel = self.decode_kernel = None  # set by kimi_ref.backend
        self.backend = "torch"
        self.scale = softmax_scale(config)
        self.rotary = RotaryEmbedding(config.rope, r)
        self.track_max_logit: bool = track_max_logit
        self.max_logit: torch.Tensor | None = None  # fp32 [h] after a forward with track_max_logit
        kw = {"dtype": dtype, "device": device}
        bias = config.attention_bias  # DeepSeek puts it on q_a, kv_a and o_proj only; never on q_b/kv_b/q_proj

        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * (n + r), bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, **kw)  # eps 1e-6, not the config's
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * (n + r), bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(d, c + r, bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(c, LATENT_NORM_EPS, **kw)  # eps 1e-6, not the config's
        self.kv_b_proj = nn.Linear(c, h * (n + v), bias=False, **kw)
        self.o_proj = nn.Linear(h * v, d, bias=bias, **kw)

    # ---- the pieces ----------------------------------------------------------------------------------

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B,T,h,n] and q_rope [B,T,h,r] (before RoPE)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.heads, self.nope + self.rope_dim))  # head j owns columns j(n+r) .. (j+1)(n+r)-1
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        return q_nope, q_rope

    def compress_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized latent [B,T,c] and the shared rope key [B,T,r] (before RoPE)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [h,n,c] (latent → key nope) and W_uv [h,v,c] (latent → value): views of kv_b_proj."""
        kv_b = self.kv_b_proj.weight.unflatten(0, (self.heads, self.nope + self.value_dim))
        w_uk, w_uv = kv_b.split([self.nope, self.value_dim], dim=1)
        return w_uk, w_uv

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """softmax_s(scale · scores + causal mask) [B,h,T,S] from fp32 scores, in fp32."""
        t, s = scores.shape[-2:]
        logits = scores.float() * self.scale  # fp32 island
        if t > 1:  # one query (decode) is the newest token: it sees every cached key
            logits = logits.masked_fill(~causal_mask(t, s, logits.device), float("-inf"))
        if self.track_max_logit:
            self.max_logit = logits.detach().amax(dim=(0, 2, 3))  # per head, over batch, queries, visible keys
        return torch.softmax(logits, dim=-1)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """o_proj over the concatenated heads [B,T,h,v] -> [B,T,d]: partial sums, all-reduce, then the bias."""
        out = F.linear(heads.flatten(-2), self.o_proj.weight)
        out = parallel.all_reduce(out, self.tp)
        return out if self.o_proj.bias is None else out + self.o_proj.bias  # added once, not once per rank

    # ---- the two forms -------------------------------------------------------------------------------

    def attend_naive(self, q_nope, q_rope, latent, k_rope, cache: LayerCache | None) -> torch.Tensor:
        """Per-head keys and values materialised from the latent; returns heads [B,T,h,v]."""
        b, t, h = latent.shape[0], latent.shape[1], self.heads
        k_nope, value = self.kv_b_proj(latent).unflatten(-1, (h, self.nope + self.value_dim)).split(
            [self.nope, self.value_dim], dim=-1)
        key = torch.cat([k_nope, k_rope[:, :, None, :].expand(b, t, h, self.rope_dim)], dim=-1)  # [B,T,h,n+r]
        if cache is not None:
            kv = cache.append(k=key, v=value)
            key, value = kv["k"], kv["v"]
        query = torch.cat([q_nope, q_rope], dim=-1)  # [B,T,h,n+r]
        # The attention core runs in fp32 whatever the model dtype: bf16 logits of size ~20 would be
        # off by ~0.1 before the softmax even starts. The cache itself stays in the model dtype.
        p = self.probabilities(torch.einsum("bthq,bshq->bhts", query.float(), key.float()))
        return torch.einsum("bhts,bshv->bthv", p, value.float()).to(value.dtype)

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, cache: LayerCache | None) -> torch.Tensor:
        """Attention straight over the latent, W_uk absorbed into the query and W_uv into the output."""
        if cache is not None:
            kv = cache.append(latent=latent, k_rope=k_rope)
            latent, k_rope = kv["latent"], kv["k_rope"]  # [B,S,c], [B,S,r]
        w_uk, w_uv = self.split_kv_b()
        # fp32 from the absorbed query to the latent output (see attend_naive); the cache stays in the model dtype
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope.float(), w_uk.float())  # the query, moved into latent space
        if self.decode_kernel is not None and q_latent.shape[1] == 1 and not self.track_max_logit:
            # One new token per sequence attending to the whole latent cache: the decode kernel.
            # (It does not report logits, so QK-Clip tracking keeps the torch path.)
            latent_out = self.decode_kernel(q_latent[:, 0], q_rope[:, 0].float(), latent, k_rope,
                                            latent.shape[1], self.scale)[:, None]  # [B,1,h,c] fp32
        else:
            p = self.probabilities(absorbed_scores(q_latent, q_rope, latent, k_rope))
            latent_out = mix_latents(p, latent)  # still in latent space
        return torch.einsum("bthc,hvc->bthv", latent_out, w_uv.float()).to(w_uv.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None, *,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B,T,d] -> [B,T,d].

        positions: [T] or [B,T] RoPE positions (default: continue after the cache, or 0..T-1).
        cache: this layer's :class:`LayerCache`; the T new tokens are appended to it.
        cos_sin: the rotary table for ``positions`` if the caller already has it (the model computes
        it once for all layers).
        """
        cos, sin = self._check_inputs(x, positions, cache, cos_sin)  # [T, r/2] or [B, T, r/2]
        q_nope, q_rope = self.query(x)
        latent, k_rope = self.compress_kv(x)
        if self.rope_kernel is not None and cos.dim() == 2:  # the kernel takes one [T, r/2] table for the batch
            q_rope = self.rope_kernel(q_rope, cos, sin)
            k_rope = self.rope_kernel(k_rope[:, :, None, :], cos, sin)[:, :, 0, :]
        else:
            q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2))  # every head turns by the same angle
            k_rope = apply_rope(k_rope, cos, sin)
        attend = self.attend_absorbed if self.mode == "absorbed" else self.attend_naive
        return self.output(attend(q_nope, q_rope, latent, k_rope, cache))

    def _check_inputs(self, x: torch.Tensor, positions: torch.Tensor | None, cache: LayerCache | None,
                      cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every input of :meth:`forward` checked (each error names what was expected); the rotary table."""
        if x.dim() != 3 or x.shape[-1] != self.kv_a_proj_with_mqa.in_features:
            raise ValueError(f"MLA: input must be [batch, time, {self.kv_a_proj_with_mqa.in_features}], found {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, LayerCache):
            raise TypeError(f"MLA: cache must be this layer's LayerCache (kv_cache[i]), found {type(cache).__name__}")
        if cache is not None and cache.mode != self.mode:
            raise ValueError(f"MLA in {self.mode!r} mode was given a {cache.mode!r} cache")
        b, t = x.shape[:2]
        if cos_sin is None:
            if positions is None:
                start = 0 if cache is None else cache.length
                positions = torch.arange(start, start + t, device=x.device)
            if tuple(positions.shape) not in ((t,), (b, t)):
                raise ValueError(f"MLA: positions must have shape ({t},) or ({b}, {t}) for input {tuple(x.shape)}, "
                                 f"found {tuple(positions.shape)}")
            cos_sin = self.rotary(positions)
        cos, sin = cos_sin
        half = self.rope_dim // 2
        if tuple(cos.shape) not in ((t, half), (b, t, half)) or sin.shape != cos.shape:
            raise ValueError(f"MLA: cos/sin must have shape ({t}, {half}) or ({b}, {t}, {half}), "
                             f"found {tuple(cos.shape)}/{tuple(sin.shape)}")
        return cos, sin

    # ---- caches --------------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> LayerCache:
        """An empty cache for this layer, in the module's dtype and on its device."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, found batch={batch}, max_len={max_len}")
        w = self.kv_a_proj_with_mqa.weight
        kw = {"dtype": w.dtype, "device": w.device}
        if self.mode == "absorbed":
            tensors = {"latent": torch.zeros(batch, max_len, self.latent_dim, **kw),
                       "k_rope": torch.zeros(batch, max_len, self.rope_dim, **kw)}
        else:
            tensors = {"k": torch.zeros(batch, max_len, self.heads, self.nope + self.rope_dim, **kw),
                       "v": torch.zeros(batch, max_len, self.heads, self.value_dim, **kw)}
        return LayerCache(tensors, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, heads={self.heads}, scale={self.scale:.7f}, backend={self.backend!r}"
