"""The tolerance table's own checks: it fails where it must and forgives only subnormal noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerances import BF16_OP, RTOL, assert_close


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


def test_ulp_distance_counts_representable_numbers():
    from tolerances import ulp_distance

    one = torch.tensor([1.0], dtype=torch.bfloat16)
    up = torch.nextafter(one.float(), torch.tensor([2.0]))  # fp32's next number: rounds back to bf16 1.0
    assert ulp_distance(up, one, torch.bfloat16).tolist() == [0]
    assert ulp_distance(torch.tensor([1.0 + 2**-7]), one, torch.bfloat16).tolist() == [1]  # bf16 spacing at 1
    assert ulp_distance(torch.tensor([1.0 + 2**-23]), np.array([1.0]), torch.float32).tolist() == [1]
    # across zero: -smallest subnormal .. +smallest subnormal is two steps; +0 and -0 are the same number
    tiny = float(torch.finfo(torch.float32).tiny) * 2**-23
    assert ulp_distance(torch.tensor([-tiny, -0.0]), np.array([tiny, 0.0]), torch.float32).tolist() == [2, 0]
    assert ulp_distance(torch.tensor([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, np.inf]),
                        torch.float32).tolist()[:2] == [0, 0]
    assert ulp_distance(torch.tensor([1.0]), np.array([np.inf]), torch.float32)[0] == np.iinfo(np.int64).max
    assert ulp_distance(torch.tensor([1.0]), np.array([1.0 + 2**-7]), BF16_OP).tolist() == [1]


def test_single_op_bf16_row_is_one_rounding():
    from tolerances import BF16_OP

    # One bf16 rounding of any number is within the row; an error of a whole bf16 step (2^-7) is not.
    x = np.linspace(1.0, 2.0, 1001)
    once = torch.tensor(x).to(torch.bfloat16)
    assert_close(once, x, BF16_OP)
    assert RTOL[torch.float32] < RTOL[BF16_OP] < RTOL[torch.bfloat16]
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(x * (1 + 2**-7)).to(torch.bfloat16), x, BF16_OP)
