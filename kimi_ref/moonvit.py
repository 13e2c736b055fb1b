"""MoonViT-3D: pictures and video clips into rows of the language model's input embeddings.

The journey of one image (K2.5 sizes; p patch 14, m merge 2, D vt_hidden_size 1152, H heads 16,
hd head dim 72, L layers 27, d text hidden_size 7168):

    any image ──media.preprocess──> pixel_values [N, 3, p, p], grid_thw (t, h, w) in patches, N = t·h·w
      (RGB, NaViT resize, pad to multiples of p·m, normalize, patchify: kimi_ref/media.py)

    VisionTower (weights ``vision_tower.*``):
      x = Conv2d(3, D, p, stride p)(pixel_values)                               [N, D]
        + bicubic(pos_emb.weight [64, 64, D] -> [h, w, D])   (+ sin-cos time embedding [t, D] if t > 1)
      L × pre-LN block, attention only within each image/chunk (cu_seqlens):
        x = x + wo(attention(rope2d(q), rope2d(k), v))        q, k, v = wqkv(LayerNorm0(x)) split [3, H, hd]
        x = x + fc1(gelu_tanh(fc0(LayerNorm1(x))))
      final_layernorm                                                            [N, D]

    sd2_tpool: mean over the t frames, then group 2×2 neighbours             [(h/2)(w/2), 4, D]
    Projector (weights ``mm_projector.*``): LayerNorm(D) per patch, flatten -> 4D,
      Linear(4D, 4D), exact GELU, Linear(4D, d)                                  [(h/2)(w/2), d]

    splice: the prompt's one ``<|media_pad|>`` per image becomes those (h/2)(w/2) rows (LLaVA style).

2D RoPE (per head, pairs of adjacent dims rotate as complex numbers): with f_j = θ^(-4j/hd),
j = 0 .. hd/4-1, θ = 10000, pair 2j turns by ``col · f_j`` and pair 2j+1 by ``row · f_j``
(x and y interleaved: [x0, y0, x1, y1, ...]), for q and k alike, so q·k sees only the 2D offset.

Video: media.py cuts a clip into chunks of ``temporal_merge_kernel_size`` (4) frames; each chunk is one
"image" with t ≤ 4 (its own ``<|media_pad|>``), whose frames sd2_tpool averages over t.

Sources of the facts: docs/sources.md §3, §5, §11 (MS-MM ``modeling_kimi_k25.py``/``media_utils.py``, vLLM
``kimi_k25_vit.py``, HF ``kimi_k25_vision_processing.py``). The float64 twin is ``oracle/moonvit.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimi_ref.config import VisionConfig
# Preprocessing is media.py's; re-exported so that ``moonvit.preprocess(image)`` reads as the journey does.
from kimi_ref.media import (IMAGE_PROMPT, MEDIA_PAD, VIDEO_PLACEHOLDER, PreprocessedVideo, Video, VideoChunk,
                            chunk_prompt, default_media_config, expand_video_placeholders, load_image, open_video,
                            padded_grid, preprocess, preprocess_frames, preprocess_video, resize_size,
                            sample_frame_indices, split_video_chunks, timestamp_text, tokens_per_image)

__all__ = [
    "ROPE_THETA", "VISION_LN_EPS",
    "interpolate_pos_emb", "time_embedding", "rope_2d_angles", "rope_2d_cos_sin", "apply_rope_2d",
    "FP32LayerNorm", "PatchEmbed", "VisionBlock", "VisionTower", "sd2_tpool", "Projector", "encode",
    "Spliced", "splice",
    # from kimi_ref.media
    "IMAGE_PROMPT", "VIDEO_PLACEHOLDER", "MEDIA_PAD", "default_media_config", "load_image", "resize_size",
    "padded_grid", "preprocess", "preprocess_frames", "tokens_per_image", "Video", "VideoChunk",
    "PreprocessedVideo", "open_video", "sample_frame_indices", "timestamp_text", "chunk_prompt",
    "split_video_chunks", "preprocess_video", "expand_video_placeholders",
]

# Neither number is in vision_config: MoonViT's Rope2DPosEmbRepeated and its sin-cos time embedding
# use a base of 10000, and every tower LayerNorm is nn.LayerNorm's default eps (only the projector's
# eps, projector_ln_eps, is configurable).
ROPE_THETA = 10000.0
VISION_LN_EPS = 1e-5


# ==========================================================================================================
# Position information: interpolated learnable 2D table, fixed time embedding, 2D RoPE
# ==========================================================================================================


def _grid_list(grid_thws) -> list[tuple[int, int, int]]:
    if isinstance(grid_thws, torch.Tensor):
        grid_thws = grid_thws.tolist()
    if isinstance(grid_thws, tuple) and len(grid_thws) == 3 and all(isinstance(v, int) for v in grid_thws):
        grid_thws = [grid_thws]
    grids = []
    for i, g in enumerate(grid_thws):
        if len(g) != 3 or not all(int(v) >= 1 for v in g):
            raise ValueError(f"grid_thws[{i}] must be three positive integers (t, h, w), found {g!r}")
        grids.append(tuple(int(v) for v in g))
    if not grids:
        raise ValueError("grid_thws is empty: nothing to encode")
    return grids


def interpolate_pos_emb(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The learnable table [H0, W0, D] resized to [h·w, D] (row-major), fp32.

    ``F.interpolate(mode="bicubic")`` with PyTorch's defaults: align_corners False, cubic A = -0.75,
    edge samples clamped, no antialias even when shrinking. Same size is the identity (the reference
    skips the call then; the bicubic weights at offset 0 are (0, 1, 0, 0), so both agree).
    """
    H0, W0, D = weight.shape
    if (h, w) == (H0, W0):
        return weight.float().reshape(h * w, D)
    grid = weight.float().permute(2, 0, 1).unsqueeze(0)  # [1, D, H0, W0]
    out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(h * w, D)


def time_embedding(dim: int, t: int) -> torch.Tensor:
    """Fixed 1D sin-cos embedding [t, dim], fp32: row s = [sin(s·ω), cos(s·ω)], ω_i = 10000^(-i/(dim/2)).

    Halves concatenated, not interleaved (MAE's ``get_1d_sincos_pos_embed``).
    """
    if dim % 2:
        raise ValueError(f"time_embedding: dim must be even, found {dim}")
    omega = 1.0 / ROPE_THETA ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(t, dtype=torch.float64)[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def rope_2d_angles(grid_thws, head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """float64 [Σ t·h·w, head_dim/2]: pair 2j turns by col·f_j, pair 2j+1 by row·f_j, f_j = θ^(-4j/head_dim).

    Every frame of a chunk repeats its grid's angles (time is told by the time embedding, not RoPE).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, found {head_dim}")
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)  # [hd/4]
    parts = []
    for t, h, w in _grid_list(grid_thws):
        rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # row of patch r·w + c
        cols = torch.arange(w, dtype=torch.float64).repeat(h)
        xy = torch.stack([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1)  # [h·w, hd/4, 2]: x then y
        parts.append(xy.reshape(h * w, head_dim // 2).repeat(t, 1))
    return torch.cat(parts)


def rope_2d_cos_sin(grid_thws, head_dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [N, head_dim/2]; angles are float64 before the cast (house rule for RoPE)."""
    angles = rope_2d_angles(grid_thws, head_dim)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd]: rotate adjacent pairs (x_2i, x_2i+1) by the angles of cos/sin [N, hd/2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [N, heads, hd/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


# ==========================================================================================================
# The tower
# ==========================================================================================================


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 whatever the parameter dtype (an fp32 island), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class PositionEmbedding(nn.Module):
    """``pos_emb.weight`` [H0, W0, D] (learnable), plus the fixed time embedding computed on the fly
    (it is not in the checkpoint, and a buffer would not survive building the model on the meta device)."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.num_frames = config.init_pos_emb_time
        self.weight = nn.Parameter(torch.empty(config.init_pos_emb_height, config.init_pos_emb_width,
                                               config.hidden_size, dtype=dtype, device=device))
        # A fresh tower must compute something finite before a checkpoint is loaded (torch.empty may hold
        # NaNs); small normal values, as ViTs start their learnable tables. Skipped on the meta device
        # (checkpoint loading), as in Router: there is nothing to fill, and nn.init there imports torch._dynamo (~2 s).
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """fp32 [Σ t·h·w, D]."""
        out = []
        for t, h, w in grids:
            if t > self.num_frames:
                raise ValueError(f"a chunk of {t} frames is longer than the time embedding "
                                 f"(init_pos_emb_time {self.num_frames})")
            grid = interpolate_pos_emb(self.weight, h, w)  # [h·w, D]
            if t == 1:
                out.append(grid)  # a still image (or a 1-frame chunk) gets no time term at all...
            else:  # ...while frame 0 of a longer chunk gets sin(0)=0, cos(0)=1 added: the reference's quirk
                time = time_embedding(grid.shape[1], t).to(grid.device)
                out.append((grid[None] + time[:, None, :]).reshape(t * h * w, -1))
        return torch.cat(out)


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p) on each [3, p, p] patch (a Linear over 3·p·p numbers) + positions."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p, dtype=dtype, device=device)
        self.pos_emb = PositionEmbedding(config, dtype, device)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)  # [N, D, 1, 1] -> [N, D]
        return x + self.pos_emb(grids).to(x.dtype)


class VisionMLP(nn.Module):
    """fc1(gelu_tanh(fc0(x))): D -> intermediate -> D, with biases."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))  # the tower's MLP uses the tanh GELU


class VisionBlock(nn.Module):
    """Pre-LN transformer block; attention is bidirectional inside each image/chunk and blind across them."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        D = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.norm0 = FP32LayerNorm(D, eps=VISION_LN_EPS, dtype=dtype, device=device)
        self.wqkv = nn.Linear(D, 3 * D, dtype=dtype, device=device)  # rows: all q heads, all k heads, all v heads
        self.wo = nn.Linear(D, D, dtype=dtype, device=device)
        self.norm1 = FP32LayerNorm(D, eps=VISION_LN_EPS, dtype=dtype, device=device)
        self.mlp = VisionMLP(config, dtype, device)

    def attention(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.wqkv(x).view(N, 3, self.heads, self.head_dim).unbind(1)  # each [N, heads, hd]
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            # One image or chunk at a time: the same as a block-diagonal mask, without the N×N mask.
            # SDPA keeps softmax statistics in fp32 for bf16/fp16 inputs (the fp32 island).
            qs, ks, vs = (z[start:end].transpose(0, 1) for z in (q, k, v))  # [heads, n, hd]
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5).transpose(0, 1)
        return self.wo(out.reshape(N, -1))

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm1(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.blocks = nn.ModuleList(VisionBlock(config, dtype, device) for _ in range(config.num_hidden_layers))
        self.final_layernorm = FP32LayerNorm(config.hidden_size, eps=VISION_LN_EPS, dtype=dtype, device=device)


class VisionTower(nn.Module):
    """MoonViT-3D. Parameter names are the checkpoint's, relative to ``vision_tower.``.

    ``forward(pixel_values [N, 3, p, p], grid_thws [(t, h, w), ...]) -> [N, D]`` (after final_layernorm),
    several images/chunks packed one after another, N = Σ t·h·w. Replicated on every tensor-parallel rank.
    """

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config, dtype, device)
        self.encoder = VisionEncoder(config, dtype, device)

    def forward(self, pixel_values: torch.Tensor, grid_thws) -> torch.Tensor:
        grids = _grid_list(grid_thws)
        p = self.config.patch_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(f"pixel_values must be [N, 3, {p}, {p}], found {list(pixel_values.shape)}")
        lengths = [t * h * w for t, h, w in grids]
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(f"grid_thws {grids} cover {sum(lengths)} patches but pixel_values has {pixel_values.shape[0]}")
        x = self.patch_embed(pixel_values, grids)
        cos, sin = rope_2d_cos_sin(grids, self.config.head_dim, device=x.device)
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        for block in self.encoder.blocks:
            x = block(x, cu_seqlens, cos, sin)
        return self.encoder.final_layernorm(x)


def sd2_tpool(x: torch.Tensor, grid_thws, merge_kernel_size: tuple[int, int] = (2, 2)) -> list[torch.Tensor]:
    """[Σ t·h·w, D] -> per image/chunk [(h/kh)(w/kw), kh·kw, D]: mean over t, then group kh×kw neighbours.

    Group r·(w/kw) + c holds patches (kh·r + i, kw·c + j) in the order (i, j) = (0,0), (0,1), (1,0), (1,1).
    The mean is taken in fp32.
    """
    kh, kw = merge_kernel_size
    grids = _grid_list(grid_thws)
    lengths = [t * h * w for t, h, w in grids]
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"sd2_tpool: grid_thws {grids} cover {sum(lengths)} rows but x has {x.shape[0]}")
    out = []
    for seq, (t, h, w) in zip(x.split(lengths), grids):
        if h % kh or w % kw:
            raise ValueError(f"sd2_tpool: grid {h}×{w} is not a multiple of the merge kernel {kh}×{kw}")
        v = seq.float().view(t, h // kh, kh, w // kw, kw, -1).mean(dim=0)  # [h/kh, kh, w/kw, kw, D]
        out.append(v.permute(0, 2, 1, 3, 4).reshape((h // kh) * (w // kw), kh * kw, -1).to(x.dtype))
    return out


class Projector(nn.Module):
    """Patch merger (names relative to ``mm_projector.``): [n, kh·kw, mm_hidden] -> [n, text_hidden].

    pre_norm: LayerNorm(mm_hidden, projector_ln_eps) on each patch; flatten the group; proj.0 Linear,
    proj.1 exact (erf) GELU, proj.2 Linear to the language model's width.
    """

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.config = config
        merged = config.mm_hidden_size * config.merge_kernel_size[0] * config.merge_kernel_size[1]
        self.pre_norm = FP32LayerNorm(config.mm_hidden_size, eps=config.projector_ln_eps, dtype=dtype, device=device)
        self.proj = nn.Sequential(
            nn.Linear(merged, merged, dtype=dtype, device=device),
            nn.GELU(),  # exact GELU here, the tanh one inside the tower
            nn.Linear(merged, config.text_hidden_size, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kk = self.config.merge_kernel_size[0] * self.config.merge_kernel_size[1]
        if x.ndim != 3 or x.shape[1:] != (kk, self.config.mm_hidden_size):
            raise ValueError(f"Projector: expected [n, {kk}, {self.config.mm_hidden_size}], found {list(x.shape)}")
        x = self.pre_norm(x.to(self.proj[0].weight.dtype))
        return self.proj(x.flatten(1))


def encode(tower: VisionTower, projector: Projector, pixel_values: torch.Tensor, grid_thws) -> list[torch.Tensor]:
    """Images/chunks -> one [(h/2)(w/2), text_hidden] block of LLM input rows each, in grid_thws order."""
    grids = _grid_list(grid_thws)
    merged = sd2_tpool(tower(pixel_values, grids), grids, tower.config.merge_kernel_size)
    rows = projector(torch.cat(merged))
    return list(rows.split([m.shape[0] for m in merged]))


# ==========================================================================================================
# Splicing the vision rows into the text embeddings
# ==========================================================================================================


class Spliced(NamedTuple):
    embeds: torch.Tensor      # [B, T', d]   text rows and vision rows, in prompt order
    input_ids: torch.Tensor   # [B, T']      the placeholder id repeated on every vision row (vLLM's expanded ids)
    positions: torch.Tensor   # [B, T']      0 .. T'-1: positions count the expanded rows


def splice(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: Sequence[torch.Tensor],
           placeholder_id: int, pad_id: int | None = None) -> Spliced:
    """Replace each ``placeholder_id`` token by its image's feature rows (HF LLaVA-style expansion).

    Placeholders take ``features`` in reading order: row 0 left to right, then row 1, ... When the rows
    of a batch expand to different lengths they are right-padded with ``pad_id`` (zero embeddings); without
    a ``pad_id`` that is an error, since the model has no attention mask to hide left-over rows.
    """
    if inputs_embeds.ndim != 3 or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"splice: inputs_embeds must be [B, T, d] and input_ids [B, T], "
                         f"found {list(inputs_embeds.shape)} and {list(input_ids.shape)}")
    B, T, d = inputs_embeds.shape
    n_placeholders = int((input_ids == placeholder_id).sum())
    if n_placeholders != len(features):
        raise ValueError(f"splice: the prompt has {n_placeholders} media placeholders (id {placeholder_id}) "
                         f"but {len(features)} feature blocks were given: one per image or video chunk")
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[1] != d:
            raise ValueError(f"splice: features[{i}] must be [n, {d}], found {list(f.shape)}")
    feats = iter(features)
    rows_e, rows_i = [], []
    for b in range(B):
        pieces_e, pieces_i, last = [], [], 0
        for t in (input_ids[b] == placeholder_id).nonzero().flatten().tolist():
            f = next(feats)
            pieces_e += [inputs_embeds[b, last:t], f.to(inputs_embeds.dtype)]
            pieces_i += [input_ids[b, last:t], input_ids.new_full((f.shape[0],), placeholder_id)]
            last = t + 1
        rows_e.append(torch.cat(pieces_e + [inputs_embeds[b, last:]]))
        rows_i.append(torch.cat(pieces_i + [input_ids[b, last:]]))
    length = max(r.shape[0] for r in rows_e)
    if any(r.shape[0] != length for r in rows_e):
        if pad_id is None:
            raise ValueError(f"splice: the batch rows expand to different lengths {[r.shape[0] for r in rows_e]}; "
                             "pass pad_id to right-pad them")
        rows_e = [F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows_e]
        rows_i = [F.pad(r, (0, length - r.shape[0]), value=pad_id) for r in rows_i]
    positions = torch.arange(length, device=input_ids.device).expand(B, length)
    return Spliced(torch.stack(rows_e), torch.stack(rows_i), positions)
