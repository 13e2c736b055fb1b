"""The float64 numpy oracle of the Kimi K2.x text model: slow, obvious, and the judge of every fast path.

    from kimi_ref.oracle import forward
    logits = forward(ckpt_dir, input_ids)        # [B,T] int -> [B,T,V] float64

One file per concept, the same names as the torch model: ``norms`` (RMSNorm), ``rope`` (interleaved
RoPE, YaRN, softmax scale), ``mla`` (naive and absorbed MLA with the latent cache), ``router``
(noaux_tc sigmoid routing), ``experts`` (SwiGLU, dense MLP, MoE), ``model`` (decoder layer, logits),
``int4`` (pack-quantized INT4), ``checkpoint`` (safetensors reader, name mapping, dequantization) and
``forward``. Nothing here imports torch: only numpy, the standard library and ``kimi_ref.config``.
"""

from __future__ import annotations

from kimi_ref.oracle.forward import forward

__all__ = ["forward"]
