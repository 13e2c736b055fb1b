"""Shared test setup: hypothesis profiles, the reference directory, thread limits."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `from tolerances import ...`

# CI: bounded and derandomized, so a run is reproducible and its time is predictable.
settings.register_profile(
    "ci", max_examples=20, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Local development: more examples, random seeds.
settings.register_profile(
    "dev", max_examples=50, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("KIMI_REF_CI") else "dev"))

# Triton kernels run in the interpreter when there is no GPU. The variable must be set before anything
# imports triton (the interpreter cannot be switched on later in the same process), hence here.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        os.environ["TRITON_INTERPRET"] = "1"

# Two cores and several test workers: keep each worker single-threaded unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


def reference_dir() -> Path | None:
    """``../shared/reference`` beside the checkout (or $KIMI_REF_REFERENCE), or None if absent."""
    path = Path(os.environ.get("KIMI_REF_REFERENCE", REPO.parent / "shared" / "reference"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def reference() -> Path:
    """The reference data (real chat templates, FACTS). CI requires it; elsewhere tests skip without it."""
    path = reference_dir()
    if path is None:
        msg = ("../shared/reference (the genuine chat templates and FACTS.md) is not beside this checkout; "
               "set KIMI_REF_REFERENCE to its path")
        if os.environ.get("KIMI_REF_REQUIRE_REFERENCE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
