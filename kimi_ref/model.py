"""The decoder layer and the whole causal language model (and, for K2.5+, where the images go in).

    input_ids [B,T]  ->  logits float32 [B,T,V]

    x = embed_tokens[input_ids]                                  [B,T,d]   vocab-parallel
    (images: MoonViT rows replace each <|media_pad|> placeholder; see moonvit.py)
    for each of the L layers (pre-norm residual blocks):
        x = x + self_attn(input_layernorm(x), positions)        MLA, mla.py
        x = x + mlp(post_attention_layernorm(x))                 dense SwiGLU for i < first_k_dense_replace,
                                                                 else MoE (router + experts + shared expert)
    logits = lm_head(norm(x))                                    vocab-parallel, all-gathered, fp32

Kimi K2.x: d 7168, L 61 (layer 0 dense, 1..60 MoE), V 163840, every norm eps 1e-5 (the MLA latent
norms excepted), no tied embeddings.

**Names.** The state-dict keys are exactly the checkpoint's flat names (``model.embed_tokens.weight``,
``model.layers.3.mlp.experts.17.up_proj.weight_packed``, ``lm_head.weight``; with vision
``vision_tower.…`` and ``mm_projector.…``), so loading is a rename of the ``language_model.`` prefix
at most (``checkpoint.py``).

**Positions and the cache.** Without a cache the T tokens sit at positions 0..T-1. With one
(``new_cache(batch, max_len)``) they continue at ``cache.length``; every layer appends its K/V and the
cache advances by T, so a prefill followed by one-token steps gives the logits of one full forward.
``positions`` overrides the RoPE positions only (e.g. the expanded positions of a spliced image
prompt); the causal mask always follows the order of the rows.

**Tensor parallelism** (``parallel.py``): the embedding and lm_head hold V/N rows each. A rank looks up
only its own ids (zeros elsewhere) and one all-reduce completes the embedding; logits are all-gathered
along the vocabulary. Attention and MLP each end in one all-reduce (inside ``mla.py``/``experts.py``).

**Pipeline stages** (``pp``, see ``parallel.py``): a stage builds only its block of layers, keyed by
their global index (so its state-dict keys are the checkpoint's ``model.layers.{i}.…``), and its cache
holds only those layers. Stage 0 also holds the embedding (and the vision tower), the last stage the
final norm and lm_head. ``forward`` on a later stage ignores ``input_ids`` and receives the residual
stream [B,T,d] from the stage before; a stage before the last sends its residual stream on and returns
None. Only the last stage's ranks get logits.

Float64 twin: ``kimi_ref/oracle/model.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_ref import moonvit, parallel
from kimi_ref.backend import BACKENDS, use_backend
from kimi_ref.config import KimiConfig
from kimi_ref.experts import DenseMLP, MoE
from kimi_ref.mla import MLA, MLA_MODES, KVCache
from kimi_ref.norms import RMSNorm
from kimi_ref.parallel import ONE_STAGE, PP, SINGLE, TP
from kimi_ref.rope import RotaryEmbedding

__all__ = ["BACKENDS", "DecoderLayer", "LayerBlock", "VocabParallelEmbedding", "KimiModel", "KimiForCausalLM"]

class DecoderLayer(nn.Module):
    """One pre-norm block [B,T,d] -> [B,T,d]: attention then MLP, each added to the residual stream."""

    def __init__(self, config: KimiConfig, layer_idx: int, *, tp: TP = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = "cpu", mla_mode: str = "absorbed", backend: str = "torch"):
        super().__init__()
        if not 0 <= layer_idx < config.num_hidden_layers:
            raise ValueError(f"layer_idx {layer_idx} is outside 0..{config.num_hidden_layers - 1}")
        kw = {"dtype": dtype, "device": device}
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = MLA(config, tp=tp, mode=mla_mode, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MoE(config, layer_idx, tp=tp, **kw) if config.is_moe_layer(layer_idx) else DenseMLP(config, tp=tp, **kw)
        use_backend(self, backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None, *,
                cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B,T,d]; ``positions``/``cache``/``cos_sin`` as in :meth:`kimi_ref.mla.MLA.forward`
        (``cache`` is this layer's ``LayerCache``)."""
        attended = self.self_attn(self.input_layernorm(x), positions, cache, cos_sin=cos_sin)
        # h = x + attended, and its norm, in one step (one kernel reads both on the triton backend)
        normed, h = self.post_attention_layernorm(attended, residual=x)
        return h + self.mlp(normed)


class VocabParallelEmbedding(nn.Module):
    """``embed_tokens``: weight [V/N, d], this rank's rows [r·V/N, (r+1)·V/N) of the vocabulary."""

    def __init__(self, vocab_size: int, hidden: int, *, tp: TP = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.start, rows = tp.split(vocab_size, "vocab_size")
        self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype, device=device))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return parallel.all_reduce(x, self.tp)  # exactly one rank holds each id: the sum is that row

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0] - 1} of {self.vocab_size}, d={self.weight.shape[1]}"


class LayerBlock(nn.ModuleDict):
    """Decoder layers keyed by their index in the whole model: all of them, or one pipeline stage's block.

    Reads like the ``nn.ModuleList`` it replaces: ``layers[i]`` is layer i (a global index), iterating
    yields the layers in order, ``len`` counts them. The keys make the state-dict names
    ``layers.{i}.…`` whichever block a stage holds.
    """

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__({str(i): layer for i, layer in sorted(layers.items())})

    def __getitem__(self, index: int) -> nn.Module:
        if str(index) not in self._modules:
            raise IndexError(f"layer {index} is not in this block (layers {', '.join(self._modules)})")
        return self._modules[str(index)]

    def __iter__(self):
        return iter(self._modules.values())


class KimiModel(nn.Module):
    """``model.``: embedding, the decoder layers, the final norm. Returns the final-norm hidden states.

    With ``pp`` (a pipeline stage): only that stage's layers; the embedding on the first stage, the
    final norm on the last (``None`` elsewhere).
    """

    def __init__(self, config: KimiConfig, *, tp: TP = SINGLE, pp: PP = ONE_STAGE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = "cpu", mla_mode: str = "absorbed", backend: str = "torch"):
        super().__init__()
        self.config, self.pp = config, pp
        kw = {"tp": tp, "dtype": dtype, "device": device}
        self.layer_range = parallel.stage_layers(config.num_hidden_layers, pp.stages)[pp.stage]
        # A tied lm_head reads the embedding, so the last stage then holds it too.
        holds_embedding = pp.first or (pp.last and config.tie_word_embeddings)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **kw) if holds_embedding else None
        self.layers = LayerBlock({i: DecoderLayer(config, i, mla_mode=mla_mode, backend=backend, **kw)
                                  for i in self.layer_range})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device) if pp.last else None
        self.rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim)  # one table for every layer
        use_backend(self, backend)

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype: the dense weights' (every stage holds a layer's norm)."""
        return next(iter(self.layers)).input_layernorm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B,T,d] of checked ids [B,T]."""
        if self.embed_tokens is None:
            raise ValueError(f"pipeline stage {self.pp.stage} of {self.pp.stages} holds no embedding: token ids "
                             "go to stage 0, later stages take the residual stream as inputs_embeds")
        return self.embed_tokens(_check_ids(input_ids, self.config.vocab_size))

    def forward(self, input_ids: torch.Tensor | None = None, cache: KVCache | None = None, *,
                positions: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B,T,d] (what lm_head reads). Give ``input_ids`` or ``inputs_embeds``.

        On a pipeline stage: ``inputs_embeds`` is the residual stream from the stage before, and a stage
        before the last returns its residual stream (no final norm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("KimiModel: give exactly one of input_ids [B,T] and inputs_embeds [B,T,d]")
        if inputs_embeds is None:
            x = self.embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size or inputs_embeds.shape[1] == 0:
                raise ValueError(f"inputs_embeds must be [batch, time >= 1, {self.config.hidden_size}], "
                                 f"found {tuple(inputs_embeds.shape)}")
            x = inputs_embeds.to(self.dtype)
        b, t = x.shape[:2]
        start = 0 if cache is None else self._check_cache(cache, b, t)
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)
        elif positions.shape not in ((t,), (b, t)):
            raise ValueError(f"positions must be [{t}] or [{b}, {t}] for an input of {t} tokens, found {tuple(positions.shape)}")
        cos_sin = self.rotary(positions.to(x.device))  # computed once, shared by every layer
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, None if cache is None else cache[i], cos_sin=cos_sin)
        if cache is not None:
            cache.length = start + t  # each layer advanced itself; keep the shared counter in step
        return x if self.norm is None else self.norm(x)

    def _check_cache(self, cache: KVCache, b: int, t: int) -> int:
        if not isinstance(cache, KVCache) or len(cache) != len(self.layers):
            raise ValueError(f"cache must be a KVCache with {len(self.layers)} layers (use model.new_cache), "
                             f"found {type(cache).__name__} with {len(cache) if isinstance(cache, KVCache) else '?'}")
        if cache.batch != b:
            raise ValueError(f"the cache was made for batch {cache.batch}, the input has batch {b}")
        if cache.length + t > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} tokens: {cache.length} cached + {t} new do not fit")
        return cache.length


class KimiForCausalLM(nn.Module):
    """Kimi K2.x: ``model`` (:class:`KimiModel`) + vocab-parallel ``lm_head`` (+ MoonViT when the config has vision).

    ``forward(input_ids [B,T], cache=None, *, positions=None, inputs_embeds=None, pixel_values=None,
    grid_thws=None) -> logits float32 [B,T',V]`` (T' = T, or the expanded length when images are spliced).
    """

    def __init__(self, config: KimiConfig, *, tp: TP = SINGLE, pp: PP = ONE_STAGE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = "cpu", mla_mode: str = "absorbed", backend: str = "torch"):
        super().__init__()
        if mla_mode not in MLA_MODES:
            raise ValueError(f"mla_mode must be one of {MLA_MODES}, found {mla_mode!r}")
        parallel.validate_layout(config, tp.world_size, pp.stages)
        self.config, self.tp, self.pp, self.mla_mode = config, tp, pp, mla_mode
        self.model = KimiModel(config, tp=tp, pp=pp, dtype=dtype, device=device, mla_mode=mla_mode, backend=backend)
        if config.tie_word_embeddings or not pp.last:
            self.lm_head = None  # tied: the output projection is model.embed_tokens.weight; or no head on this stage
        else:
            self.lm_head = nn.Linear(config.hidden_size, tp.local(config.vocab_size, "vocab_size"), bias=False,
                                     dtype=dtype, device=device)
        if config.vision is not None and pp.first:  # kimi_k25 layout: MoonViT tower + patch-merger projector, replicated
            self.vision_tower = moonvit.VisionTower(config.vision, dtype=dtype, device=device)
            self.mm_projector = moonvit.Projector(config.vision, dtype=dtype, device=device)
        self.set_backend(backend)

    # ---- conveniences --------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (the MLA mode's layout)."""
        return KVCache([layer.self_attn.new_cache(batch, max_len) for layer in self.model.layers])

    def set_backend(self, name: str) -> "KimiForCausalLM":
        """Switch every kernel-capable module (RMSNorm, MLA, MoE, W4A16Linear) to ``name``."""
        use_backend(self, name)
        return self

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over final hidden states [B,T,d] -> fp32 logits [B,T,V], gathered over the vocabulary."""
        local = F.linear(hidden, self.head_weight()).float()  # [B,T,V/N]
        return parallel.all_gather(local, self.tp, dim=-1)

    # ---- the forward pass ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, cache: KVCache | None = None, *,
                positions: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, grid_thws=None) -> torch.Tensor | None:
        if pixel_values is not None and self.pp.first:  # later stages get the spliced stream itself
            inputs_embeds, positions = self.splice_media(input_ids, pixel_values, grid_thws, inputs_embeds, positions,
                                                         0 if cache is None else cache.length)
            input_ids = None
        elif grid_thws is not None and pixel_values is None:
            raise ValueError("grid_thws was given without pixel_values")
        if not self.pp.first:  # the residual stream comes from the stage before; input_ids stay unread
            input_ids, inputs_embeds = None, _recv_stream(self.pp, self.config.hidden_size, self.model.dtype,
                                                          self._device())
        hidden = self.model(input_ids, cache, positions=positions, inputs_embeds=inputs_embeds)
        if not self.pp.last:
            _send_stream(hidden, self.pp)
            return None
        return self.logits(hidden)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def splice_media(self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor, grid_thws,
                     inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                     start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B,T',d] with MoonViT rows in place of each ``<|media_pad|>`` and their positions [B,T']."""
        if not hasattr(self, "vision_tower"):
            raise ValueError(f"pixel_values given, but this model has no vision tower ({self.config.source} "
                             "has no vision_config)")
        if input_ids is None or grid_thws is None:
            raise ValueError("pixel_values needs input_ids (to find the <|media_pad|> placeholders) and grid_thws")
        if inputs_embeds is not None or positions is not None:
            raise ValueError("with pixel_values the model builds inputs_embeds and positions itself; pass neither")
        placeholder = self.config.media_placeholder_token_id
        if placeholder is None:
            raise ValueError(f"{self.config.source}: no media_placeholder_token_id, so images cannot be placed")
        features = moonvit.encode(self.vision_tower, self.mm_projector, pixel_values, grid_thws)
        spliced = moonvit.splice(self.model.embed(input_ids), input_ids, features, placeholder,
                                 pad_id=self.config.pad_token_id)
        return spliced.embeds, spliced.positions + start

    def extra_repr(self) -> str:
        block = self.model.layer_range
        stage = f", stage {self.pp.stage}/{self.pp.stages} (layers {block.start}..{block.stop - 1})" if self.pp.stages > 1 else ""
        return f"mla_mode={self.mla_mode!r}, tp={self.tp.rank}/{self.tp.world_size}{stage}"


# The residual stream between stages: its [B, T] first (a later stage cannot know T' when images were
# spliced), then the values, TP rank t to TP rank t of the next stage.

def _send_stream(x: torch.Tensor, pp: PP) -> None:
    parallel.send(torch.tensor(x.shape[:2], dtype=torch.long, device=x.device), pp.next, pp)
    parallel.send(x, pp.next, pp)


def _recv_stream(pp: PP, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    shape = parallel.recv(torch.empty(2, dtype=torch.long, device=device), pp.prev, pp)
    return parallel.recv(torch.empty(*shape.tolist(), hidden, dtype=dtype, device=device), pp.prev, pp)


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, time] LongTensor, found "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integers, found dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has no tokens (shape {tuple(input_ids.shape)})")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        raise ValueError(f"input_ids holds {int(input_ids[bad][0])}, outside the vocabulary 0..{vocab_size - 1}")
    return input_ids.long()
