"""The one table of numerical tolerances: what "equal" means for each precision on a path.

A result computed in ``dtype`` is compared with the float64 oracle (or a peer) by its relative
L-infinity error: ``max|actual - expected| / max|expected|``. Scaling by the tensor's largest
magnitude, not elementwise, keeps values near zero from dominating, and lets one number per
dtype hold across ops. NaN and inf must sit at the same positions (FlashMLA's habit).

Why these numbers: float32 has a unit roundoff of 6e-8; a few hundred accumulations and a
handful of layers stay well under 1e-5. bfloat16 keeps 8 significant bits (unit roundoff
u = 2⁻⁸ ≈ 3.9e-3); one rounding per op compounds to about 1e-2 through a small model, hence 2e-2
for a whole bf16 path. tf32 (Triton's ``tl.dot`` on a GPU with fp32 inputs) keeps 10 bits of mantissa.

``"bf16 op"`` is the row for ONE bf16 op judged against a float64 reference built from that op's
own bf16 inputs: its fp32 insides may add float32's error, and its result is rounded to bf16 once,
``RTOL[float32] + 2⁻⁸``. An op that accumulates in bf16 rounds once per term and lands past it; the
whole-model row (2e-2) could never tell the two apart.

:func:`assert_close` judges by it: every equivalence test (through ``tests/tolerances.py``) and the
device check (``benchmarks/device_check.py``); the trace diff tool (``python -m weights_tools.diff``)
marks the first activation past its row. ``ulp_distance`` counts
representable numbers of a dtype between two tensors (0: the same bits).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RTOL", "BF16_OP", "rel_error", "smallest_normal", "ulp_distance", "row_dtype", "PRECISION_ORDER",
           "assert_close"]

BF16_OP = "bf16 op"

# dtype -> relative L-inf error allowed against the float64 oracle
RTOL: dict[object, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 5e-3,
    torch.float16: 5e-3,
    BF16_OP: 1e-5 + 2.0**-8,
    torch.bfloat16: 2e-2,
}

# From the most to the least precise: a comparison is judged by the row of its less precise side.
PRECISION_ORDER = (torch.float64, torch.float32, "tf32", torch.float16, torch.bfloat16)


def row_dtype(row) -> torch.dtype:
    """The torch dtype whose numbers a row of the table describes (``"tf32"`` is stored as float32)."""
    return {"tf32": torch.float32, BF16_OP: torch.bfloat16}.get(row, row)


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def smallest_normal(dtype) -> float:
    """Below this magnitude ``dtype`` holds only subnormals, whose relative precision fades to nothing."""
    dtype = row_dtype(dtype)
    return float(torch.finfo(dtype).tiny) if isinstance(dtype, torch.dtype) else float(np.finfo(np.float64).tiny)


def rel_error(actual, expected, floor: float = float(np.finfo(np.float64).tiny)) -> float:
    """``max|actual - expected| / max|expected|``, the scale never taken below ``floor``."""
    a, e = _as_f64(actual), _as_f64(expected)
    finite = np.isfinite(e)
    scale = float(np.max(np.abs(e[finite]))) if finite.any() else 0.0
    err = float(np.max(np.abs(a[finite] - e[finite]))) if finite.any() else 0.0
    return err / max(scale, floor)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def ulp_distance(actual, expected, dtype) -> np.ndarray:
    """How many ``dtype`` numbers lie between ``actual`` and ``expected`` (both rounded to ``dtype``), elementwise.

    The bit patterns of IEEE floats, read as sign-magnitude integers, are in the order of the numbers
    they encode; turning them into two's complement makes the distance a subtraction. NaN or inf on
    either side gives 0 where both agree and the largest int64 where they do not.
    """
    dtype = row_dtype(dtype)
    if dtype not in _INT_OF:
        raise ValueError(f"ulp_distance: no ulps for {dtype}; expected one of {sorted(map(str, _INT_OF))}")
    a, e = (torch.as_tensor(_as_f64(v)).to(dtype) for v in (actual, expected))
    if a.shape != e.shape:
        raise ValueError(f"ulp_distance: shapes {tuple(a.shape)} and {tuple(e.shape)} differ")
    bits = _INT_OF[dtype]
    sign = torch.iinfo(bits).min

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(bits).to(torch.int64)
        return torch.where(i < 0, sign - i, i)  # -0.0 and +0.0 both map to 0

    dist = (ordered(a) - ordered(e)).abs()
    finite = torch.isfinite(a) & torch.isfinite(e)
    same_special = ~finite & ((a == e) | (torch.isnan(a) & torch.isnan(e)))
    dist = torch.where(finite, dist, torch.where(same_special, 0, torch.iinfo(torch.int64).max))
    return dist.numpy()


def assert_close(actual, expected, dtype=None, *, what: str = "result") -> None:
    """Raise AssertionError unless ``actual`` (computed in ``dtype``, default: its own dtype) matches ``expected``
    by the table: same shape, NaN/inf at the same places, relative L-inf error within the row."""
    if dtype is None:
        dtype = actual.dtype if isinstance(actual, torch.Tensor) else torch.float64
    rtol = RTOL[dtype]
    a, e = _as_f64(actual), _as_f64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        mismatch = test(a) != test(e)
        if mismatch.any():
            raise AssertionError(f"{what}: {name} positions differ, first at {np.argwhere(mismatch)[0].tolist()}")
    # A result whose every value is subnormal in `dtype` (hypothesis finds such inputs) is judged against
    # the smallest normal number instead: relative error means nothing where the dtype has no mantissa left.
    err = rel_error(a, e, floor=smallest_normal(dtype))
    if err > rtol:
        finite = np.isfinite(e)
        diff = np.where(finite, np.abs(a - e), 0.0)
        where = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(
            f"{what}: relative L-inf error {err:.3e} > {rtol:.1e} allowed for {dtype}; "
            f"worst at {list(map(int, where))}: {a[where]!r} vs {e[where]!r}"
        )
