"""Rotary position embedding with YaRN, float64 oracle (interleaved pairs, DeepSeek/Kimi convention).

Shapes (r = qk_rope_head_dim, 64 for Kimi):

    inv_freq(rope, r)             -> [r/2]
    cos_sin(positions [...], rope, r) -> cos, sin [..., r/2]
    apply_rope(x [..., r], cos, sin)  -> [..., r]      (cos/sin broadcast against x[..., r/2])

Interleaved rotation: the rope dims are stored as pairs (x0, y0, x1, y1, ...); pair i is the complex
number z_i = x_i + i·y_i and turns by the angle θ_i = pos · inv_freq[i]:

    z_i' = z_i · e^{iθ_i}        (= x_i cos θ_i - y_i sin θ_i  +  i·(y_i cos θ_i + x_i sin θ_i))

and the output stays interleaved. (The torch path writes the two real equations; the oracle multiplies
complex numbers, so the two cannot share a pairing or sign mistake.) (HF's ``apply_rotary_pos_emb_interleave`` returns the evens first,
then the odds: a fixed permutation of the same numbers, applied to q and k alike, so q·k is equal.)

YaRN frequencies (DeepSeek's ``DeepseekV3YarnRotaryEmbedding``), i = 0 .. r/2-1:

    freq_extra[i] = θ^(-2i/r)                       the original RoPE frequencies (extrapolate)
    freq_inter[i] = freq_extra[i] / factor          stretched by the context factor (interpolate)
    mask[i]       = 1 - clip((i - low) / (high - low), 0, 1)
    inv_freq      = freq_inter · (1 - mask) + freq_extra · mask

``(low, high)`` is ``correction_range``: the dims that complete ``beta_fast`` resp. ``beta_slow``
rotations over the original context, floored/ceiled: fast dims keep their frequency, slow dims are
interpolated, the dims between blend linearly. K2.5 (β 32/1, r 64, θ 50000, 4096) gives (8, 20).

Magnitudes: cos and sin are multiplied by ``attention_factor = m(factor, mscale) / m(factor,
mscale_all_dim)`` (1.0 for Kimi), and the softmax scale is ``qk_head_dim^-0.5 · m(factor,
mscale_all_dim)²`` (0.1446796 for K2.5), with ``m(s, k) = 0.1 · k · ln s + 1`` (1 when s <= 1).
"""

from __future__ import annotations

import math

import numpy as np

from kimi_ref.config import KimiConfig, RopeConfig

__all__ = [
    "yarn_get_mscale", "correction_dim", "correction_range", "linear_ramp", "inv_freq", "attention_factor",
    "softmax_scale", "cos_sin", "apply_rope",
]


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """YaRN's magnitude correction ``0.1 · mscale · ln(scale) + 1`` (no correction when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def correction_dim(num_rotations: float, dim: int, theta: float, original_max_position_embeddings: int) -> float:
    """The (fractional) rope dim index whose wavelength fits ``num_rotations`` turns into the original context.

    Pair i has wavelength ``2π θ^(2i/dim)``; solving ``original / wavelength = num_rotations`` for 2i gives this.
    """
    return dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def correction_range(rope: RopeConfig, dim: int) -> tuple[int, int]:
    """DeepSeek's ``find_correction_range``: (floor(dim for beta_fast), ceil(dim for beta_slow)), clipped to [0, dim-1]."""
    _require_yarn(rope)
    low = math.floor(correction_dim(rope.beta_fast, dim, rope.theta, rope.original_max_position_embeddings))
    high = math.ceil(correction_dim(rope.beta_slow, dim, rope.theta, rope.original_max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, n: int) -> np.ndarray:
    """``clip((i - low) / (high - low), 0, 1)`` for i = 0..n-1; a zero-width ramp is widened by 0.001 as in DeepSeek."""
    if low == high:
        high = high + 0.001
    return np.clip((np.arange(n, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    """Per-pair angular frequencies [dim/2]: plain RoPE, or YaRN's blend of original and interpolated."""
    if dim % 2:
        raise ValueError(f"rope dim must be even, found {dim}")
    freq_extra = rope.theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope.type == "default":
        return freq_extra
    _require_yarn(rope)
    freq_inter = freq_extra / rope.factor
    low, high = correction_range(rope, dim)
    mask = 1.0 - linear_ramp(low, high, dim // 2)  # 1: keep the original frequency, 0: interpolate
    return freq_inter * (1.0 - mask) + freq_extra * mask


def attention_factor(rope: RopeConfig) -> float:
    """The factor on cos and sin: ``m(factor, mscale) / m(factor, mscale_all_dim)`` (1.0 for plain RoPE and for Kimi).

    This is DeepSeek's formula, used unconditionally. (HF falls back to ``m(factor, 1)`` when mscale or
    mscale_all_dim is 0; the two agree for every config that sets both, as Kimi's does.)
    """
    if rope.type == "default":
        return 1.0
    _require_yarn(rope)
    return yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim)


def softmax_scale(config: KimiConfig) -> float:
    """Attention logit scale ``qk_head_dim^-0.5 · m(factor, mscale_all_dim)²``.

    qk_head_dim = nope + rope (192 for Kimi), also in the absorbed form where the dot product runs
    over kv_lora_rank + rope (576) numbers: absorption does not change the logits, so not their scale.
    """
    scale = config.qk_head_dim ** -0.5
    rope = config.rope
    if rope.type == "yarn" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def cos_sin(positions: np.ndarray, rope: RopeConfig, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``positions[..., None] · inv_freq``, times ``attention_factor``: two arrays [..., dim/2].

    Computed as the unit complex number e^{iθ} (its real and imaginary parts), the form ``apply_rope`` uses.
    """
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq(rope, dim)
    turn = np.exp(1j * angles) * attention_factor(rope)
    return turn.real, turn.imag


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of the last axis by the angles of ``cos``/``sin``.

    The oracle's own formulation, unlike the torch path's two real equations: pair i is the complex
    number z_i = x[2i] + i·x[2i+1], the rotation is one complex product z_i · (cos θ_i + i sin θ_i), and
    the result's real and imaginary parts go back to positions 2i and 2i+1 — so a pairing mistake (halves
    instead of neighbours) or a sign slip in one path cannot hide in the other.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope: the last axis must hold pairs, found {x.shape[-1]} dims")
    if np.shape(cos)[-1] != x.shape[-1] // 2 or np.shape(sin) != np.shape(cos):
        raise ValueError(
            f"apply_rope: cos/sin {np.shape(cos)}/{np.shape(sin)} do not give {x.shape[-1] // 2} angles for x {x.shape}"
        )
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))  # [..., r/2, 2]: neighbours, not halves
    z = pairs[..., 0] + 1j * pairs[..., 1]
    turned = z * (np.asarray(cos) + 1j * np.asarray(sin))
    out = np.empty(turned.shape + (2,))
    out[..., 0], out[..., 1] = turned.real, turned.imag
    return out.reshape(turned.shape[:-1] + (x.shape[-1],))


def _require_yarn(rope: RopeConfig) -> None:
    if rope.type != "yarn":
        raise ValueError(f"RoPE type {rope.type!r}: expected 'yarn' here")
    keys = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings")
    missing = [k for k in keys if getattr(rope, k) is None]
    if missing:
        raise ValueError(f"YaRN RoPE config lacks {missing}")
