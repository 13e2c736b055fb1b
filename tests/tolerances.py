"""``assert_close``: every equivalence test's judge, by the one tolerance table (``kimi_ref/tolerances.py``).

The table, the relative L-inf error, the ulp distance and ``assert_close`` itself live in the package
(the trace diff tool and the device check use them too); they are re-exported here so tests write
``from tolerances import RTOL, assert_close``.
"""

from __future__ import annotations

from kimi_ref.tolerances import (BF16_OP, RTOL, _as_f64, assert_close, rel_error, row_dtype,  # noqa: F401
                                 smallest_normal, ulp_distance)
