"""``assert_close``: every equivalence test's judge, by the one tolerance table (``kimi_ref/tolerances.py``).

The table, the relative L-inf error and the ulp distance live in the package (the trace diff tool uses
them too); they are re-exported here so tests write ``from tolerances import RTOL, assert_close``.
"""

from __future__ import annotations

import numpy as np
import torch

from kimi_ref.tolerances import (BF16_OP, RTOL, _as_f64, rel_error, row_dtype, smallest_normal,  # noqa: F401
                                 ulp_distance)


def assert_close(actual, expected, dtype=None, *, what: str = "result") -> None:
    """Assert ``actual`` (computed in ``dtype``, default: its own dtype) matches ``expected``."""
    if dtype is None:
        dtype = actual.dtype if isinstance(actual, torch.Tensor) else torch.float64
    rtol = RTOL[dtype]
    a, e = _as_f64(actual), _as_f64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        mismatch = test(a) != test(e)
        assert not mismatch.any(), f"{what}: {name} positions differ, first at {np.argwhere(mismatch)[0].tolist()}"
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
