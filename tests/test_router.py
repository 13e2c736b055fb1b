"""router.py == oracle/router.py on generated shapes, scores, biases and group settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st
from tolerances import assert_close

from hypothesis import example
from hf_twins import F32, KIMI_TINY, configs, hf_model, t
from hf_twins import make_config as twin_config

from kimi_ref.config import ConfigError, fixture_path, load_config, tiny_config
from kimi_ref.oracle import router as oracle
from kimi_ref.router import Router, route
from chapter_solutions import load_solutions

REAL = load_config(fixture_path("kimi_k25"))


def make_config(experts: int, k: int, groups: int = 1, topk_group: int = 1, d: int = 16, norm: bool = True):
    cfg = tiny_config(REAL, hidden_size=d, n_routed_experts=experts, num_experts_per_tok=k, n_group=groups,
                      topk_group=topk_group, vision=False)
    return cfg if norm else cfg.replace(norm_topk_prob=False)


@st.composite
def routing_case(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    per_group = draw(st.integers(2, 8))
    experts = groups * per_group
    topk_group = draw(st.integers(1, groups))
    k = draw(st.integers(1, topk_group * per_group))
    cfg = make_config(experts, k, groups, topk_group, d=draw(st.sampled_from([8, 16, 24])), norm=draw(st.booleans()))
    n = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, cfg.hidden_size)).astype(np.float32)
    w = (rng.standard_normal((experts, cfg.hidden_size)) * draw(st.sampled_from([0.1, 0.5, 2.0]))).astype(np.float32)
    bias = (rng.standard_normal(experts) * draw(st.sampled_from([0.0, 0.05, 1.0]))).astype(np.float32)
    return cfg, x, w, bias


def ties_free(cfg, x, w, bias, gap: float = 1e-4) -> bool:
    """No two choice scores (nor two group scores) closer than ``gap``: fp32 and float64 pick alike."""
    choice = oracle.router_scores(x, w) + bias
    for row in choice:
        if np.diff(np.sort(row)).min(initial=1.0) < gap:
            return False
        groups = np.sort(row.reshape(cfg.n_group, -1), axis=-1)[:, -2:].sum(-1)
        if np.diff(np.sort(groups)).min(initial=1.0) < gap:
            return False
    return True


@given(routing_case())
def test_route_matches_oracle(case):
    cfg, x, w, bias = case
    assume(ties_free(cfg, x, w, bias))
    want_w, want_ids = oracle.route(x, w, bias, cfg)
    got_w, got_ids = route(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), cfg)
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int64
    np.testing.assert_array_equal(got_ids.numpy(), want_ids)  # same experts, same order (best first)
    assert_close(got_w, want_w, torch.float32, what="routing weights")


@given(routing_case())
def test_router_is_an_fp32_island_in_bf16(case):
    """A bf16 model still routes in fp32: equal to the oracle on the same bf16-rounded inputs."""
    cfg, x, w, bias = case
    xb, wb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    assume(ties_free(cfg, xb.double().numpy(), wb.double().numpy(), bias))
    router = Router(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(wb)
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    assert router.e_score_correction_bias.dtype == torch.float32
    got_w, got_ids = router(xb)
    want_w, want_ids = oracle.route(xb.double().numpy(), wb.double().numpy(), bias, cfg)
    np.testing.assert_array_equal(got_ids.numpy(), want_ids)
    assert_close(got_w, want_w, torch.float32, what="bf16-input routing weights")


def test_bias_steers_selection_not_weights():
    cfg = make_config(8, 2)
    torch.manual_seed(0)
    x, w = torch.randn(5, cfg.hidden_size), torch.randn(8, cfg.hidden_size)
    bias = torch.zeros(8)
    bias[6] = 10.0  # expert 6 wins every token, whatever its affinity
    weights, ids = route(x, w, bias, cfg)
    assert (ids[:, 0] == 6).all()
    scores = torch.sigmoid(x @ w.T)
    expected = scores.gather(1, ids)
    expected = expected / expected.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, expected)  # weights from the unbiased scores
    assert torch.allclose(weights.sum(-1), torch.full((5,), cfg.routed_scaling_factor))


def test_masked_groups_lose_even_to_negative_scores():
    """With negative biases every allowed choice is < 0; masked experts must still never be picked (-inf, not 0)."""
    cfg = make_config(8, 3, groups=2, topk_group=1)
    torch.manual_seed(1)
    x, w = torch.randn(16, cfg.hidden_size), torch.randn(8, cfg.hidden_size)
    bias = torch.full((8,), -5.0)
    bias[:4] -= 1.0  # group 0 is always the worse one, so its experts must never be picked
    weights, ids = route(x, w, bias, cfg)
    assert (ids >= 4).all(), f"masked group 0 was picked: {ids.tolist()}"
    want_w, want_ids = oracle.route(x.numpy(), w.numpy(), bias.numpy(), cfg)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    assert_close(weights, want_w, torch.float32, what="negative-bias grouped routing")


def test_ids_ordered_by_choice_and_scale_applied_without_norm():
    cfg = make_config(16, 4, norm=False)
    torch.manual_seed(2)
    x, w, bias = torch.randn(6, cfg.hidden_size), torch.randn(16, cfg.hidden_size), torch.randn(16) * 0.1
    weights, ids = route(x, w, bias, cfg)
    choice = (torch.sigmoid(x @ w.T) + bias).gather(1, ids)
    assert (choice[:, :-1] >= choice[:, 1:]).all()
    torch.testing.assert_close(weights, torch.sigmoid(x @ w.T).gather(1, ids) * cfg.routed_scaling_factor)


def test_kimi_config_routes_384_top8():
    router = Router(REAL, device="meta")
    assert router.weight.shape == (384, 7168) and router.e_score_correction_bias.dtype == torch.float32
    assert set(router.state_dict()) == {"weight", "e_score_correction_bias"}


@pytest.mark.parametrize("shape", [((4, 16), (8, 16), (8,)), ((4, 16), (8, 15), (8,)), ((4, 16), (8, 16), (7,)),
                                   ((16,), (8, 16), (8,))])
def test_bad_shapes_are_named(shape):
    cfg = make_config(8, 2)
    xs, ws, bs = shape
    if (xs, ws, bs) == ((4, 16), (8, 16), (8,)):
        route(torch.zeros(xs), torch.zeros(ws), torch.zeros(bs), cfg)  # the good case works
        return
    with pytest.raises(ValueError, match="router"):
        route(torch.zeros(xs), torch.zeros(ws), torch.zeros(bs), cfg)


def test_config_rejects_impossible_groups():
    with pytest.raises(ConfigError, match="topk_group"):
        make_config(8, 2, groups=2, topk_group=3)


# ---- chapter 05 solutions ----------------------------------------------------------------------------


def _solutions():
    return load_solutions("05_router")


SOLUTIONS = _solutions()


@given(routing_case())
def test_solution_route_by_hand(case):
    cfg, x, w, bias = case
    assume(ties_free(cfg, x, w, bias))
    want_w, want_ids = oracle.route(x[:1], w, bias, cfg)
    got_w, got_ids = SOLUTIONS.route_by_hand(x[0].tolist(), w.tolist(), bias.tolist(), cfg)
    assert got_ids == want_ids[0].tolist()
    assert_close(np.array(got_w), want_w[0], torch.float64, what="route_by_hand")


def test_solution_balance_bias_proportional_balances():
    cfg = make_config(16, 2, d=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    w = torch.randn(16, 16, generator=g) * 0.05
    w[:2] += 0.5 * x.mean(0) / x.mean(0).norm()  # two popular experts
    x += 0.5 * x.mean(0)
    bias, loads = SOLUTIONS.balance_bias_proportional(x, w, cfg, steps=80, rate=0.02)
    assert loads[0].max() / loads[0].mean() > 2 * (loads[-1].max() / loads[-1].mean())
    assert bias[:2].max() < bias[2:].min(), "the popular experts must end with the lowest biases"


def test_solution_selection_margin_explains_bf16_flips():
    cfg = make_config(64, 4, d=256)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(400, 256, generator=g), torch.randn(64, 256, generator=g) * 0.02
    bias = torch.zeros(64)
    margin = SOLUTIONS.selection_margin(x, w, bias, cfg)
    _, ids32 = route(x, w, bias, cfg)
    ids16 = torch.topk(torch.sigmoid((x.bfloat16() @ w.bfloat16().T).float()), 4).indices
    flipped = (ids32.sort(-1).values != ids16.sort(-1).values).any(-1)
    assert flipped.any() and (margin >= 0).all()
    assert margin[flipped].max() < margin[~flipped].median()


# ---- the oracle against HF DeepseekV3 (hf_twins) ----

@given(c=configs(), seed=st.integers(0, 2**16), tokens=st.integers(1, 12))
@example(c=KIMI_TINY, seed=0, tokens=9)
def test_router_matches_hf(c, seed, tokens):
    m = hf_model(c, seed)
    gate = m.model.layers[1].mlp.gate
    x = np.random.default_rng(seed).standard_normal((tokens, c.hidden_size))
    w, b = gate.weight.detach().numpy(), gate.e_score_correction_bias.detach().numpy()
    weights, indices = oracle.route(x, w, b, c)
    with torch.no_grad():
        _, hf_weights, hf_indices = gate(t(x))
    hf_indices = hf_indices.numpy()
    np.testing.assert_array_equal(np.sort(indices, 1), np.sort(hf_indices, 1))  # the same experts ...
    ours_by_expert = np.take_along_axis(weights, np.argsort(indices, 1), 1)
    hf_by_expert = np.take_along_axis(hf_weights.numpy(), np.argsort(hf_indices, 1), 1)
    assert_close(ours_by_expert, hf_by_expert, F32, what="routing weights")  # ... with the same weights
    choice = oracle.router_scores(x, w) + b
    assert np.all(np.diff(np.take_along_axis(choice, indices, 1), axis=1) <= 0), "not ordered best first"
    np.testing.assert_allclose(weights.sum(1), c.routed_scaling_factor, rtol=1e-12)  # norm_topk_prob, then × 2.827


def test_group_limited_routing_masks_with_minus_infinity():
    c = twin_config(experts_n=8, k=2, n_group=4, topk_group=1)
    # Strongly negative biases: every choice score is < 0. Group 2 (experts 4, 5) has the best top-2 sum.
    bias = np.full(8, -5.0)
    bias[4:6] = -4.0
    weight = np.zeros((8, c.hidden_size))  # zero logits: every score is sigmoid(0) = 0.5
    weights, indices = oracle.route(np.ones((1, c.hidden_size)), weight, bias, c)
    # A 0.0 mask would hand the choice to masked experts (0 > -3.5); -inf keeps it inside group 2.
    assert sorted(indices[0].tolist()) == [4, 5]
    np.testing.assert_allclose(weights[0], [c.routed_scaling_factor / 2] * 2, rtol=1e-15)
    assert oracle.group_mask(bias + 0.5, c).tolist() == [False] * 4 + [True, True] + [False] * 2
