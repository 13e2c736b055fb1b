"""MoonViT-3D, float64 oracle: the vision tower, sd2_tpool, the projector, splicing (preprocessing: media.py).

Shapes (p patch 14, D vt_hidden_size, H heads, hd = D/H, N = Σ t·h·w patches, d text hidden):

    media.preprocess(image, media_config)      -> pixel_values [N, 3, p, p], (1, h, w)   (oracle/media.py)
    interpolate_pos_emb(table [H0,W0,D], h, w) -> [h, w, D]       bicubic, PyTorch's rules written out
    time_embedding(D, t)                       -> [t, D]          [sin(s·ω) | cos(s·ω)], ω_i = 10000^(-2i/D)
    rope_2d(x [N, H, hd], grid_thws, hd)       -> [N, H, hd]      complex multiply of adjacent pairs
    block(x [N, D], w, config, grid_thws)      -> [N, D]
    tower(pixel_values, w, config, grid_thws)  -> [N, D]
    sd2_tpool(x, grid_thws, (kh, kw))          -> per chunk [(h/kh)(w/kw), kh·kw, D]
    projector(x [n, kh·kw, D], w, config)      -> [n, d]
    encode(pixel_values, w_tower, w_projector, config, grid_thws) -> per chunk [n_i, d]
    splice(embeds [B,T,d], ids [B,T], features, placeholder_id)   -> (embeds [B,T',d], ids [B,T'])

Weights are dicts of arrays keyed by the checkpoint names relative to ``vision_tower.`` (tower) and
``mm_projector.`` (projector), e.g. ``"encoder.blocks.0.wqkv.weight"``, ``"proj.0.bias"``.
"""

from __future__ import annotations

import math

import numpy as np

from kimi_ref.config import VisionConfig
from kimi_ref.oracle.media import (preprocess, preprocess_frames, resize_size, sample_frame_indices, timestamp_text,
                                   to_rgb)

__all__ = [
    # from kimi_ref.oracle.media, re-exported: the float64 twin of MoonViT's input
    "to_rgb", "resize_size", "preprocess", "preprocess_frames", "sample_frame_indices", "timestamp_text",
    "cubic_weights", "interpolate_pos_emb", "time_embedding", "rope_2d_angles", "rope_2d", "layer_norm",
    "gelu_tanh", "gelu_erf", "attention", "block", "tower", "sd2_tpool", "projector", "encode", "splice",
]

THETA = 10000.0   # 2D RoPE and time-embedding base (not in vision_config)
LN_EPS = 1e-5     # every tower LayerNorm: nn.LayerNorm's default (projector: projector_ln_eps)
CUBIC_A = -0.75   # PyTorch's bicubic kernel parameter


# ---------------------------------------------------------------------------------------------------------
# Position information
# ---------------------------------------------------------------------------------------------------------


def cubic_weights(t: float) -> np.ndarray:
    """Keys' cubic convolution weights (A = -0.75) for the taps at offsets -1, 0, 1, 2 around ``floor``."""
    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):   # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: PyTorch bicubic along one axis (align_corners=False, edge taps clamped).

    Output i samples the input at ``(i + 0.5)·n_in/n_out - 0.5`` (half-pixel centres).
    """
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(x)
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(x - base)):
            m[i, min(max(tap, 0), n_in - 1)] += weight
    return m


def interpolate_pos_emb(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H0, W0, D] -> [h, w, D]: bicubic is separable, so resize the rows, then the columns."""
    rows = _resize_matrix(table.shape[0], h)
    cols = _resize_matrix(table.shape[1], w)
    return np.einsum("iy,jx,yxd->ijd", rows, cols, np.asarray(table, dtype=np.float64))


def time_embedding(dim: int, t: int) -> np.ndarray:
    """Row s: sin(s·ω_0..ω_{D/2-1}) then cos(s·ω_0..), with ω_i = 10000^(-i/(D/2))."""
    emb = np.zeros((t, dim))
    for s in range(t):
        for i in range(dim // 2):
            angle = s * THETA ** (-i / (dim / 2))
            emb[s, i], emb[s, dim // 2 + i] = math.sin(angle), math.cos(angle)
    return emb


def rope_2d_angles(grid_thws, head_dim: int) -> np.ndarray:
    """[N, head_dim/2]: for the patch at (row, col), pair 2j -> col·f_j and pair 2j+1 -> row·f_j."""
    out = []
    for t, h, w in grid_thws:
        for _frame in range(t):
            for row in range(h):
                for col in range(w):
                    angles = np.empty(head_dim // 2)
                    for j in range(head_dim // 4):
                        f = THETA ** (-4 * j / head_dim)
                        angles[2 * j], angles[2 * j + 1] = col * f, row * f
                    out.append(angles)
    return np.array(out)


def rope_2d(x: np.ndarray, grid_thws, head_dim: int) -> np.ndarray:
    """x [N, heads, hd]: (x_2i + i·x_2i+1) · e^{i·angle_i}, written back as adjacent pairs."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * rope_2d_angles(grid_thws, head_dim))[:, None, :]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


# ---------------------------------------------------------------------------------------------------------
# Tower
# ---------------------------------------------------------------------------------------------------------


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ np.asarray(w[f"{name}.weight"], dtype=np.float64).T + w[f"{name}.bias"]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, grid_thws) -> np.ndarray:
    """q, k, v [N, heads, hd] -> [N, heads, hd]; each patch attends to every patch of its own image/chunk."""
    out = np.zeros_like(q)
    start = 0
    for t, h, w in grid_thws:
        end = start + t * h * w
        scores = np.einsum("thd,shd->hts", q[start:end], k[start:end]) / math.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("hts,shd->thd", probs, v[start:end])
        start = end
    return out


def block(x: np.ndarray, w: dict, config: VisionConfig, grid_thws, prefix: str = "") -> np.ndarray:
    """x + wo(attn(rope(q), rope(k), v)), then x + fc1(gelu_tanh(fc0(norm1(x))))."""
    heads, hd = config.num_attention_heads, config.head_dim
    y = layer_norm(x, w[f"{prefix}norm0.weight"], w[f"{prefix}norm0.bias"], LN_EPS)
    qkv = _linear(y, w, f"{prefix}wqkv").reshape(len(x), 3, heads, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = rope_2d(q, grid_thws, hd), rope_2d(k, grid_thws, hd)
    x = x + _linear(attention(q, k, v, grid_thws).reshape(len(x), heads * hd), w, f"{prefix}wo")
    y = layer_norm(x, w[f"{prefix}norm1.weight"], w[f"{prefix}norm1.bias"], LN_EPS)
    return x + _linear(gelu_tanh(_linear(y, w, f"{prefix}mlp.fc0")), w, f"{prefix}mlp.fc1")


def tower(pixel_values: np.ndarray, w: dict, config: VisionConfig, grid_thws) -> np.ndarray:
    """Patch embedding + positions, the blocks, final LayerNorm -> [N, D]."""
    grid_thws = [tuple(int(v) for v in g) for g in grid_thws]
    conv = np.asarray(w["patch_embed.proj.weight"], dtype=np.float64)          # [D, 3, p, p]
    x = np.einsum("ncij,dcij->nd", pixel_values, conv) + w["patch_embed.proj.bias"]
    table = np.asarray(w["patch_embed.pos_emb.weight"], dtype=np.float64)
    positions = []
    for t, h, wd in grid_thws:
        grid = interpolate_pos_emb(table, h, wd).reshape(h * wd, -1)
        time = time_embedding(config.hidden_size, t) if t > 1 else np.zeros((1, config.hidden_size))
        for s in range(t):
            positions.append(grid + time[s])
    x = x + np.concatenate(positions)
    for b in range(config.num_hidden_layers):
        x = block(x, w, config, grid_thws, prefix=f"encoder.blocks.{b}.")
    return layer_norm(x, w["encoder.final_layernorm.weight"], w["encoder.final_layernorm.bias"], LN_EPS)


def sd2_tpool(x: np.ndarray, grid_thws, merge_kernel_size=(2, 2)) -> list[np.ndarray]:
    """Per chunk: average the t frames, then gather each kh×kw neighbourhood in (i, j) row-major order."""
    kh, kw = merge_kernel_size
    out, start = [], 0
    for t, h, w in grid_thws:
        frames = x[start:start + t * h * w].reshape(t, h, w, -1)
        start += t * h * w
        avg = frames.mean(axis=0)
        groups = [[avg[kh * r + i, kw * c + j] for i in range(kh) for j in range(kw)]
                  for r in range(h // kh) for c in range(w // kw)]
        out.append(np.array(groups))
    return out


def projector(x: np.ndarray, w: dict, config: VisionConfig) -> np.ndarray:
    """[n, kh·kw, D]: LayerNorm per patch, flatten, Linear, exact GELU, Linear -> [n, text_hidden]."""
    y = layer_norm(x, w["pre_norm.weight"], w["pre_norm.bias"], config.projector_ln_eps).reshape(len(x), -1)
    return _linear(gelu_erf(_linear(y, w, "proj.0")), w, "proj.2")


def encode(pixel_values: np.ndarray, w_tower: dict, w_projector: dict, config: VisionConfig, grid_thws) -> list:
    grid_thws = [tuple(int(v) for v in g) for g in grid_thws]
    groups = sd2_tpool(tower(pixel_values, w_tower, config, grid_thws), grid_thws, config.merge_kernel_size)
    return [projector(g, w_projector, config) for g in groups]


def splice(embeds: np.ndarray, ids: np.ndarray, features: list, placeholder_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk each row token by token: a placeholder emits its image's rows, any other token its own row."""
    feats = iter(features)
    out_e, out_i = [], []
    for b in range(ids.shape[0]):
        row_e, row_i = [], []
        for t in range(ids.shape[1]):
            if ids[b, t] == placeholder_id:
                f = next(feats)
                row_e.extend(f)
                row_i.extend([placeholder_id] * len(f))
            else:
                row_e.append(embeds[b, t])
                row_i.append(ids[b, t])
        out_e.append(np.array(row_e))
        out_i.append(np.array(row_i))
    if any(len(r) != len(out_e[0]) for r in out_e):
        raise ValueError("rows expand to different lengths")
    return np.stack(out_e), np.stack(out_i)
