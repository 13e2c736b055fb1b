"""The backend, chosen in one place: which function runs each hot path, the reference or a Triton kernel.

    use_backend(model, "torch")    every slot None: each module runs its own reference code
    use_backend(model, "triton")   each module below is handed its kernel (kimi_ref/kernels/):

    module        slot            kernel                     replaces
    RMSNorm       kernel          kernels.rms_norm           norms.rms_norm (and the residual add before it)
    W4A16Linear   kernel          kernels.w4a16_matmul       int4.dequantize, then F.linear
    MoE           kernel          kernels.fused_moe          MoE.routed_torch (the loop over experts)
    MLA           rope_kernel     kernels.apply_rope         rope.apply_rope on q_rope and k_rope
    MLA           decode_kernel   kernels.mla_decode         absorbed attention of one new token

The modules never look at a backend's name: they hold a slot that is None (their reference code runs)
or a function with the reference's meaning, and a ``backend`` label for their repr. A kernel runs on
the GPU where Triton can reach the tensors and otherwise falls back to torch code that calls the same
reference functions (``kimi_ref/kernels/__init__.py``), so "triton" is safe on any machine.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from kimi_ref import kernels
from kimi_ref.experts import MoE
from kimi_ref.int4 import W4A16Linear
from kimi_ref.mla import MLA
from kimi_ref.norms import RMSNorm

__all__ = ["BACKENDS", "SLOTS", "use_backend"]

BACKENDS = ("torch", "triton")

#: backend -> module class -> {slot: function}; a slot a backend does not name is None (the reference).
SLOTS: dict[str, dict[type, dict[str, Callable]]] = {
    "torch": {},
    "triton": {
        RMSNorm: {"kernel": kernels.rms_norm},
        W4A16Linear: {"kernel": kernels.w4a16_matmul},
        MoE: {"kernel": kernels.fused_moe},
        MLA: {"rope_kernel": kernels.apply_rope, "decode_kernel": kernels.mla_decode},
    },
}
_SLOT_NAMES = {RMSNorm: ("kernel",), W4A16Linear: ("kernel",), MoE: ("kernel",), MLA: ("rope_kernel", "decode_kernel")}


def use_backend(module: nn.Module, name: str) -> nn.Module:
    """Hand every RMSNorm, W4A16Linear, MoE and MLA inside ``module`` (itself included) the functions of
    backend ``name``; returns ``module``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, found {name!r}")
    for m in module.modules():
        for cls, slots in _SLOT_NAMES.items():
            if isinstance(m, cls):
                chosen = SLOTS[name].get(cls, {})
                for slot in slots:
                    setattr(m, slot, chosen.get(slot))
                m.backend = name
    return module
