"""SwiGLU experts, the shared expert, the dense MLP and the mixture of experts, float64 oracle.

    swiglu(x [N,d]; gate [f,d], up [f,d], down [d,f]) = down · (silu(gate · x) ⊙ up · x)      -> [N,d]
    silu(z) = z · sigmoid(z)

    dense_mlp: layers < first_k_dense_replace, one SwiGLU of width intermediate_size (18432 for Kimi)

    moe(x [N,d]) = Σ_{j<k} weights[:, j] · expert_{indices[:, j]}(x)  +  shared_experts(x)

with (weights, indices) from ``router.route`` (already × routed_scaling_factor) and every expert a
SwiGLU of width moe_intermediate_size (2048 for Kimi); the shared expert has width
moe_intermediate_size · n_shared_experts and is added unscaled.

Weights (names relative to ``mlp.``): dense ``gate_proj/up_proj/down_proj.weight``; MoE
``gate.weight`` [E,d], ``gate.e_score_correction_bias`` [E], ``experts.{e}.{gate,up,down}_proj.weight``,
``shared_experts.{gate,up,down}_proj.weight``. INT4 experts arrive here already dequantized.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kimi_ref.config import KimiConfig
from kimi_ref.oracle.router import route, router_scores

__all__ = ["silu", "swiglu", "dense_mlp", "moe"]


def silu(z: np.ndarray) -> np.ndarray:
    """``z · sigmoid(z)``, the sigmoid written overflow-free."""
    return z * np.exp(-np.logaddexp(0.0, -z))


def swiglu(x: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray) -> np.ndarray:
    """``down(silu(gate(x)) * up(x))``: one expert, or the shared expert, or the dense MLP."""
    x = np.asarray(x, dtype=np.float64)
    return (silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def _swiglu_named(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return swiglu(x, w[f"{prefix}gate_proj.weight"], w[f"{prefix}up_proj.weight"], w[f"{prefix}down_proj.weight"])


def dense_mlp(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The dense SwiGLU MLP of the first ``first_k_dense_replace`` layers."""
    return _swiglu_named(x, w, "")


def moe(x: np.ndarray, w: dict[str, np.ndarray], config: KimiConfig,
        record: Callable[[str, np.ndarray], None] | None = None) -> np.ndarray:
    """Routed experts (weighted by the router) plus the shared expert, [N,d] -> [N,d].

    ``record(name, array)``, if given, receives ``router_scores`` [N,E] and ``router_experts`` [N,k]."""
    x = np.asarray(x, dtype=np.float64)
    weights, indices = route(x, w["gate.weight"], w["gate.e_score_correction_bias"], config)
    if record is not None:
        record("router_scores", router_scores(x, w["gate.weight"]))
        record("router_experts", indices)
    out = np.zeros_like(x)
    for expert in range(config.n_routed_experts):
        tokens, slot = np.nonzero(indices == expert)  # which tokens chose this expert, and in which top-k slot
        if len(tokens) == 0:
            continue
        y = _swiglu_named(x[tokens], w, f"experts.{expert}.")
        # a token picks an expert at most once, so no two rows of `tokens` repeat and += is safe
        out[tokens] += weights[tokens, slot][:, None] * y
    if config.n_shared_experts > 0:
        out = out + _swiglu_named(x, w, "shared_experts.")
    return out
