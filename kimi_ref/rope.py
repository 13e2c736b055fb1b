"""Rotary position embedding (RoPE) with YaRN context extension, in Kimi's interleaved layout.

Shapes (r = qk_rope_head_dim, 64 for Kimi; only these r dims of each query/key head rotate):

    inv_freq(rope, r)                 -> [r/2]          float64 angular frequency of each pair
    cos_sin(positions [...], rope, r) -> cos, sin [..., r/2]   float32
    apply_rope(x [..., r], cos, sin)  -> [..., r]       (cos/sin broadcast against x[..., r/2])

**Interleaved pairs (the quirk).** The r rope dims of a head are stored as (x0, y0, x1, y1, …):
pair i is the two *adjacent* numbers (x[2i], x[2i+1]), and it turns by the angle θ_i = pos · inv_freq[i]:

    x_i' = x_i cos θ_i - y_i sin θ_i
    y_i' = y_i cos θ_i + x_i sin θ_i

The output stays interleaved (DeepSeek's complex-multiply form). NeoX-style RoPE (Llama, HF's
``rotate_half``) pairs x[i] with x[i + r/2] instead; reading Kimi's weights that way gives a model
that still talks but is quietly broken. HF's ``apply_rotary_pos_emb_interleave`` returns the evens,
then the odds: a fixed permutation of our numbers, applied to q and k alike, so q·k is unchanged.

**YaRN frequencies** (pair i = 0 … r/2-1; every number comes from ``config.rope``):

    freq_extra[i] = θ^(-2i/r)                        original RoPE: extrapolate past the trained length
    freq_inter[i] = freq_extra[i] / factor           stretched by the context factor: interpolate
    mask[i]       = 1 - clip((i - low) / (high - low), 0, 1)
    inv_freq      = freq_inter · (1 - mask) + freq_extra · mask

``(low, high)`` are the pairs that complete ``beta_fast`` resp. ``beta_slow`` turns over the original
context (``original_max_position_embeddings``), floored/ceiled: fast pairs keep their frequency, slow
pairs are interpolated, the ones between blend. K2.5 (β 32/1, r 64, θ 50000, 4096) gives (8, 20).

**Magnitudes.** cos and sin are multiplied by ``attention_factor = m(factor, mscale) / m(factor,
mscale_all_dim)`` (1.0 for Kimi) and the attention logits by ``softmax_scale = qk_head_dim^-0.5 ·
m(factor, mscale_all_dim)²`` (0.1446796 for K2.5), with ``m(s, k) = 0.1 · k · ln s + 1`` (1 if s <= 1).

**Precision.** Angles ``pos · inv_freq`` are formed in float64, then cos/sin are rounded to fp32: an
fp32 angle at position 262144 is off by ~1e-2 rad. The rotation itself runs in fp32 and is cast back.

Float64 twin: ``kimi_ref/oracle/rope.py``.
"""

from __future__ import annotations

import math

import torch

from kimi_ref.config import KimiConfig, RopeConfig

__all__ = [
    "yarn_get_mscale", "correction_range", "inv_freq", "attention_factor", "softmax_scale", "cos_sin", "apply_rope",
    "RotaryEmbedding",
]


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN's magnitude correction ``0.1 · mscale · ln(scale) + 1`` (none when the context is not stretched)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _pair_for_rotations(turns: float, dim: int, theta: float, original_length: int) -> float:
    # Pair i has wavelength 2π·θ^(2i/dim); solve original_length / wavelength = turns for i.
    return dim * math.log(original_length / (turns * 2 * math.pi)) / (2 * math.log(theta))


def correction_range(rope: RopeConfig, dim: int) -> tuple[int, int]:
    """(low, high): the first pair that is interpolated at all, the first that is fully interpolated."""
    _require_yarn(rope)
    original = rope.original_max_position_embeddings
    low = math.floor(_pair_for_rotations(rope.beta_fast, dim, rope.theta, original))
    high = math.ceil(_pair_for_rotations(rope.beta_slow, dim, rope.theta, original))
    return max(low, 0), min(high, dim - 1)


def inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Angular frequency of each rotary pair, float64 [dim/2]: plain RoPE, or YaRN's blend."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope dim must be a positive even number, found {dim}")
    freq_extra = rope.theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope.type == "default":
        return freq_extra
    _require_yarn(rope)
    low, high = correction_range(rope, dim)
    width = (high - low) or 0.001  # DeepSeek widens a zero-width ramp instead of dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / width).clamp(0.0, 1.0)
    keep_original = 1.0 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    return freq_extra / rope.factor * (1.0 - keep_original) + freq_extra * keep_original


def attention_factor(rope: RopeConfig) -> float:
    """The factor on cos and sin: ``m(factor, mscale) / m(factor, mscale_all_dim)`` (DeepSeek's formula; 1.0 for Kimi)."""
    if rope.type == "default":
        return 1.0
    _require_yarn(rope)
    return yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim)


def softmax_scale(config: KimiConfig) -> float:
    """The attention logit scale ``qk_head_dim^-0.5 · m(factor, mscale_all_dim)²`` (0.1446796 for K2.5).

    It is 1/√192 (nope 128 + rope 64) times mscale², also in the absorbed form, whose dot products run
    over kv_lora_rank + rope = 576 numbers: absorption rewrites the logits, it does not change them.
    """
    scale = config.qk_head_dim ** -0.5
    rope = config.rope
    if rope.type == "yarn" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def cos_sin(positions: torch.Tensor, rope: RopeConfig, dim: int,
            frequencies: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., dim/2] (fp32) of the angles ``positions[..., None] · inv_freq`` (float64)."""
    if frequencies is None:
        frequencies = inv_freq(rope, dim)
    # float64 angles; MPS has no float64, so such devices compute them on the CPU
    work = positions.device if positions.device.type != "mps" else torch.device("cpu")
    angles = positions.to(work, torch.float64)[..., None] * frequencies.to(work)
    factor = attention_factor(rope)
    cos, sin = angles.cos() * factor, angles.sin() * factor
    return cos.to(positions.device, torch.float32), sin.to(positions.device, torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each adjacent pair (x[2i], x[2i+1]) of the last axis by its angle; fp32 inside, x's dtype out."""
    if x.shape[-1] % 2 or cos.shape[-1] != x.shape[-1] // 2 or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} do not give one angle per "
                         f"pair of x {tuple(x.shape)}")
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., r/2, 2]: (x_i, y_i) side by side
    x_i, y_i = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((x_i * cos - y_i * sin, y_i * cos + x_i * sin), dim=-1)
    return turned.flatten(-2).to(x.dtype)  # interleaved again: (x0', y0', x1', y1', ...)


class RotaryEmbedding:
    """The rotary table of one model: ``rotary(positions) -> (cos, sin)``, frequencies computed once.

    A plain object, not an ``nn.Module``: it holds no weights and nothing to load, and it builds the
    same way on the meta device as anywhere else.
    """

    def __init__(self, rope: RopeConfig, dim: int):
        self.rope, self.dim = rope, dim
        self.inv_freq = inv_freq(rope, dim)  # float64, CPU; moved to the positions' device per call

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(positions, self.rope, self.dim, self.inv_freq)


def _require_yarn(rope: RopeConfig) -> None:
    if rope.type != "yarn":
        raise ValueError(f"RoPE type {rope.type!r}: expected 'yarn' here")
    missing = [k for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                           "original_max_position_embeddings") if getattr(rope, k) is None]
    if missing:
        raise ValueError(f"YaRN RoPE config lacks {missing}")
