"""RMSNorm: rescale each vector to unit root-mean-square, then by a learned per-channel weight.

    x: [..., n]    weight: [n]    ->    [..., n]   (in x's dtype)

    rms_norm(x) = weight · cast_back( x / sqrt(mean(x², last axis) + eps) )      computed in fp32

Where it sits in Kimi K2.x (n = hidden_size 7168 unless noted):

* ``input_layernorm`` before attention, ``post_attention_layernorm`` before the MLP/MoE, and
  ``model.norm`` after the last layer, all with ``config.rms_norm_eps`` (1e-5);
* inside MLA on the query latent (``q_a_layernorm``, n = q_lora_rank 1536) and on the KV latent
  (``kv_a_layernorm``, n = kv_lora_rank 512) with eps **1e-6** whatever the config says
  (see :data:`kimi_ref.mla.LATENT_NORM_EPS`).

The order of operations is DeepSeek's and HF's: normalise in fp32, cast back to the input dtype,
*then* multiply by the weight. In bf16 that rounds twice (after the cast and after the multiply);
multiplying before the cast would give slightly different numbers than the checkpoint was trained with.

Float64 twin: ``kimi_ref/oracle/norms.py``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["rms_norm", "RMSNorm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x²) + eps))``: the statistics in fp32, the result in x's dtype."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) for x {tuple(x.shape)}")
    x32 = x.float()  # fp32 island: a bf16 mean of squares over 7168 channels would lose the small ones
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned weight (initialised to ones) and a fixed ``eps``.

    ``forward(x)`` returns the normalised x; ``forward(x, residual)`` first adds the residual stream
    (``h = x + residual`` in x's dtype) and returns ``(rms_norm(h), h)``: the decoder layer adds the
    attention output to the residual stream and normalises it in one step, which one Triton kernel does
    in a single read of both. ``kernel`` is None (the reference below) or the function
    :mod:`kimi_ref.backend` hands it.
    """

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if dim <= 0 or eps <= 0:
            raise ValueError(f"RMSNorm: dim and eps must be positive, found dim={dim}, eps={eps}")
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.kernel, self.backend = None, "torch"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm({self.dim}): input has {x.shape[-1]} channels in its last axis, shape {tuple(x.shape)}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"RMSNorm({self.dim}): residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)}")
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual=residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        h = x + residual.to(x.dtype)
        return rms_norm(h, self.weight, self.eps), h

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
