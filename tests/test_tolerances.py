"""The tolerance table's own checks: it fails where it must and forgives only subnormal noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerances import RTOL, assert_close


def test_catches_an_error_just_over_the_row():
    expected = np.array([1.0, -2.0, 0.5])
    ok = torch.tensor(expected * (1 + 0.5 * RTOL[torch.float32]), dtype=torch.float32)
    assert_close(ok, expected)
    bad = torch.tensor([1.0, -2.0 * (1 + 4 * RTOL[torch.float32]), 0.5], dtype=torch.float32)
    with pytest.raises(AssertionError, match=r"relative L-inf error .* worst at \[1\]"):
        assert_close(bad, expected)


def test_nan_and_inf_positions_must_agree():
    with pytest.raises(AssertionError, match="NaN positions differ"):
        assert_close(torch.tensor([np.nan, 1.0]), np.array([1.0, np.nan]))
    assert_close(torch.tensor([np.inf, 1.0]), np.array([np.inf, 1.0]))


def test_subnormal_results_are_judged_against_the_smallest_normal():
    # 4.5e-41 is below bfloat16's smallest normal (1.2e-38): a product that small rounds to 0 or to the
    # nearest subnormal, and the relative error of 1 says nothing about the kernel.
    assert_close(torch.tensor([0.0], dtype=torch.bfloat16), np.array([4.52e-41]))
    with pytest.raises(AssertionError):  # a normal-sized value is still judged relatively
        assert_close(torch.tensor([0.0], dtype=torch.bfloat16), np.array([1e-30]))
