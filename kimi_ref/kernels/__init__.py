"""Triton kernels for the hot paths of Kimi K2.x, each with a torch fallback.

    rms_norm(x, weight, eps, residual=None)          -> y  or  (y, h = x + residual)
    apply_rope(x [B,T,H,r], cos [T,r/2], sin [T,r/2]) -> x rotated (interleaved pairs)
    w4a16_matmul(x [M,in], packed, scale)            -> x @ dequantize(packed, scale).T, fp32 [M,out]
    fused_moe(x, topk_weights, topk_ids, gate/up/down packed+scale, expert_offset=0) -> fp32 [N,d]
    mla_decode(q_latent, q_rope, latent, k_rope, length, scale) -> fp32 [B,H,c]
    available()                                      -> can Triton run here?

A call runs the Triton kernel when :func:`available` and the tensors are where Triton can reach them
(CUDA tensors on a GPU; CPU tensors under ``TRITON_INTERPRET=1``, which must be set before this
package is imported). Otherwise it runs the torch fallback, which computes the same thing the
obvious way. :func:`kimi_ref.backend.use_backend` hands these to the torch modules. Each kernel's file
(``rms_norm.py``, ``rope.py``, ``w4a16.py``, ``fused_moe.py``, ``mla_decode.py``) explains its tiles.
``python -m kimi_ref.kernels.compile_check`` compiles them all for an H100 without needing one.
"""

from __future__ import annotations

from kimi_ref.kernels._runtime import available
from kimi_ref.kernels.fused_moe import fused_moe
from kimi_ref.kernels.mla_decode import mla_decode
from kimi_ref.kernels.rms_norm import rms_norm
from kimi_ref.kernels.rope import apply_rope
from kimi_ref.kernels.w4a16 import w4a16_matmul

__all__ = ["rms_norm", "apply_rope", "w4a16_matmul", "fused_moe", "mla_decode", "available"]
