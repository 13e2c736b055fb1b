"""RMSNorm, float64 oracle.

    x: [..., n]    weight: [n]    ->    [..., n]

    rms_norm(x) = weight * x / sqrt(mean(x², over the last axis) + eps)

Where it sits: before attention (``input_layernorm``), before the MLP (``post_attention_layernorm``),
after the last layer (``model.norm``), all with the config's ``rms_norm_eps`` (1e-5 for Kimi); and
inside MLA on the query and KV latents (``q_a_layernorm``, ``kv_a_layernorm``) with eps 1e-6 whatever
the config says (see ``mla.py``). The fast path computes in fp32 and casts back before the weight;
here everything is float64, so there is nothing to cast.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rms_norm"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},) for x of shape {x.shape}")
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(mean_square + eps))
