"""Interleaved YaRN RoPE (kimi_ref/rope.py) == the float64 oracle (kimi_ref/oracle/rope.py), and the K2 numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import RTOL, assert_close, rel_error

import numpy as np
import transformers
from hf_twins import hf_config, make_config, t

from kimi_ref import rope
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.oracle import rope as orope
from chapter_solutions import load_solutions

K25 = load_config(fixture_path("kimi_k25"))
K2_THINKING = load_config(fixture_path("kimi_k2_thinking"))
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


@st.composite
def rope_configs(draw):
    """K2.5's YaRN with every knob generated (dims, betas, factor, both mscales, theta, original length)."""
    return dataclasses.replace(
        K25.rope, theta=draw(st.sampled_from([10000.0, 50000.0])), factor=draw(st.sampled_from([1.0, 4.0, 64.0])),
        beta_fast=draw(st.sampled_from([32.0, 1.0, 8.0])), beta_slow=draw(st.sampled_from([1.0, 0.5])),
        mscale=draw(st.sampled_from([1.0, 0.707, 0.0])), mscale_all_dim=draw(st.sampled_from([1.0, 0.0, 0.5])),
        original_max_position_embeddings=draw(st.sampled_from([8, 16, 4096])),
        type=draw(st.sampled_from(["yarn", "yarn", "default"])),
    )


@given(cfg=rope_configs(), dim=st.sampled_from([2, 4, 8, 16, 64, 128]))
def test_inv_freq_and_factors_match_oracle(cfg, dim):
    assert_close(rope.inv_freq(cfg, dim), orope.inv_freq(cfg, dim), F64, what="inv_freq")
    assert rope.attention_factor(cfg) == pytest.approx(orope.attention_factor(cfg), rel=1e-15)
    if cfg.type == "yarn":
        assert rope.correction_range(cfg, dim) == orope.correction_range(cfg, dim)
    config = K25.replace(rope=cfg)
    assert rope.softmax_scale(config) == pytest.approx(orope.softmax_scale(config), rel=1e-15)


@given(cfg=rope_configs(), dim=st.sampled_from([4, 8, 64]), shape=st.sampled_from([(1,), (7,), (2, 5)]),
       max_pos=st.sampled_from([16, 4096, 262144, 1 << 20]), seed=st.integers(0, 2**31 - 1))
def test_cos_sin_match_oracle(cfg, dim, shape, max_pos, seed):
    positions = torch.randint(0, max_pos, shape, generator=torch.Generator().manual_seed(seed))
    cos, sin = rope.cos_sin(positions, cfg, dim)
    ocos, osin = orope.cos_sin(positions.numpy(), cfg, dim)
    assert cos.dtype == sin.dtype == F32 and cos.shape == (*shape, dim // 2)
    assert_close(cos, ocos, F32, what="cos")
    assert_close(sin, osin, F32, what="sin")
    table = rope.RotaryEmbedding(cfg, dim)
    assert all(torch.equal(a, b) for a, b in zip(table(positions), (cos, sin)))


@given(dtype=st.sampled_from([F32, BF16]), dim=st.sampled_from([2, 8, 64]), heads=st.integers(1, 5),
       t=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_apply_rope_matches_oracle(dtype, dim, heads, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, heads, dim, generator=g).to(dtype)
    positions = torch.randint(0, 300_000, (t,), generator=g)
    cos, sin = rope.cos_sin(positions, K25.rope, dim)
    y = rope.apply_rope(x, cos[:, None, :], sin[:, None, :])
    assert y.dtype == dtype and y.shape == x.shape
    ocos, osin = orope.cos_sin(positions.numpy(), K25.rope, dim)
    expected = orope.apply_rope(x.double().numpy(), ocos[:, None, :], osin[:, None, :])
    assert_close(y, expected, dtype, what=f"apply_rope {dtype}")


@given(dim=st.sampled_from([16, 64]), start=st.sampled_from([0, 4096, 250_000]), seed=st.integers(0, 2**31 - 1))
def test_bf16_rotation_runs_in_fp32(dim, start, seed):
    """apply_rope rotates in fp32 and rounds to bf16 once: the result is the bf16 nearest the exact
    rotation of the bf16 input by the fp32 cos/sin, but for near-ties (then one ulp off).

    The oracle comparison (test_apply_rope_matches_oracle, whole-model bf16 row) cannot see a rotation
    done in bf16; here, without Triton, the torch module stands on its own."""
    from tolerances import ulp_distance

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 4, dim, generator=g).to(BF16)
    cos, sin = rope.cos_sin(torch.arange(start, start + 32), K25.rope, dim)
    got = rope.apply_rope(x, cos[:, None, :], sin[:, None, :])
    assert got.dtype == BF16
    pairs = x.double().unflatten(-1, (-1, 2))
    c, s_ = cos.double()[:, None, :], sin.double()[:, None, :]
    exact = torch.stack((pairs[..., 0] * c - pairs[..., 1] * s_, pairs[..., 1] * c + pairs[..., 0] * s_), -1).flatten(-2)
    ulps = ulp_distance(got, exact, BF16)
    # Where x·cos - y·sin nearly cancels, fp32's own rounding of the products (~2^-24 of |x| + |y|) is many
    # bf16 steps of the small result: there the bound is fp32's, elsewhere one bf16 step.
    mag = pairs.abs().sum(-1, keepdim=True).expand_as(pairs).flatten(-2).numpy()
    cancelled = np.abs(exact.numpy()) < mag / 64
    assert ulps[~cancelled].max() <= 1, f"a rotated value is {ulps[~cancelled].max()} bf16 steps from the exact rotation"
    err = np.abs(got.double().numpy() - exact.numpy())
    bound = 2.0 ** -8 * np.abs(exact.numpy()) + 2.0 ** -21 * mag  # half a bf16 step, plus fp32's rounding
    assert (err[cancelled] <= bound[cancelled]).all(), "a cancelling rotation is off by more than fp32 rounding"
    assert (ulps > 0).mean() < 0.01, f"{(ulps > 0).mean():.1%} of the rotated values are not the bf16 nearest"


def test_pairs_are_adjacent_not_halves():
    # one pair (x0, y0) = (1, 0) turned by 90°: the rotation lands in position 1, not position dim/2
    cfg = dataclasses.replace(K25.rope, type="default")
    x = torch.zeros(4)
    x[0] = 1.0
    freqs = rope.inv_freq(cfg, 4)
    position = torch.tensor(math.pi / 2 / freqs[0].item(), dtype=torch.float64)
    cos, sin = rope.cos_sin(position, cfg, 4)
    y = rope.apply_rope(x, cos, sin)
    assert y[1].item() == pytest.approx(1.0, abs=1e-6) and abs(y[0].item()) < 1e-6 and abs(y[2].item()) < 1e-6


def test_k25_numbers():
    assert rope.softmax_scale(K25) == pytest.approx(0.1446796, abs=5e-8)
    assert rope.yarn_get_mscale(64.0, 1.0) == pytest.approx(1.41589, abs=5e-6)
    assert rope.attention_factor(K25.rope) == 1.0
    assert rope.correction_range(K25.rope, K25.qk_rope_head_dim) == (8, 20)
    f = rope.inv_freq(K25.rope, 64)
    extra = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.equal(f[:8], extra[:8])  # fast pairs keep the original frequency
    assert torch.allclose(f[20:], extra[20:] / 64.0, rtol=1e-15)  # slow pairs are interpolated by the factor


def test_mscale_scales_cos_and_sin():
    cfg = dataclasses.replace(K25.rope, mscale=0.707, mscale_all_dim=1.0)
    factor = rope.yarn_get_mscale(64.0, 0.707) / rope.yarn_get_mscale(64.0, 1.0)
    assert factor < 1 and rope.attention_factor(cfg) == pytest.approx(factor, rel=1e-15)
    cos, sin = rope.cos_sin(torch.arange(5), cfg, 8)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, factor**2), rtol=1e-6)
    assert rope.yarn_get_mscale(1.0, 1.0) == 1.0  # no stretch, no correction


def test_k2_thinking_beta_fast_is_read():
    assert (K25.rope.beta_fast, K2_THINKING.rope.beta_fast) == (32.0, 1.0)
    assert rope.correction_range(K2_THINKING.rope, 64) == (19, 20)
    a, b = rope.inv_freq(K25.rope, 64), rope.inv_freq(K2_THINKING.rope, 64)
    assert not torch.equal(a, b) and torch.equal(a[:8], b[:8])
    # the tiny configs keep it too
    assert tiny_config(K2_THINKING).rope.beta_fast == 1.0


def test_angles_are_float64_at_262144():
    positions = torch.arange(262_144 - 64, 262_144 + 1)
    ocos, osin = orope.cos_sin(positions.numpy(), K25.rope, 64)
    cos, sin = rope.cos_sin(positions, K25.rope, 64)
    assert_close(cos, ocos, F32, what="cos at 262144")
    assert_close(sin, osin, F32, what="sin at 262144")
    # The rule matters: fp32 angles there are off by ~1e-2 rad, far outside the fp32 tolerance.
    f32_angles = positions.float()[:, None] * rope.inv_freq(K25.rope, 64).float()
    assert rel_error(f32_angles.cos(), ocos) > 100 * RTOL[F32]


def test_errors():
    with pytest.raises(ValueError, match="positive even number, found 7"):
        rope.inv_freq(K25.rope, 7)
    with pytest.raises(ValueError, match="do not give one angle per pair"):
        rope.apply_rope(torch.zeros(2, 8), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not give one angle per pair"):
        rope.apply_rope(torch.zeros(2, 7), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"lacks \['beta_fast'\]"):
        rope.inv_freq(dataclasses.replace(K25.rope, beta_fast=None), 8)
    with pytest.raises(ValueError, match="expected 'yarn'"):
        rope.correction_range(dataclasses.replace(K25.rope, type="default"), 8)


# ---- chapter 03 solutions -----------------------------------------------------------------------------


def _solutions():
    return load_solutions("03_norms_rope")


@pytest.mark.parametrize("cfg", [K25.rope, K2_THINKING.rope], ids=["k25", "k2_thinking"])
def test_chapter_03_solutions_yarn_ramp(cfg):
    sol = _solutions()
    low, high = rope.correction_range(cfg, 64)
    turns = sol.turns_in_original_context(cfg, 64)
    assert (turns[:low] >= cfg.beta_fast).all() and (turns[high:] <= cfg.beta_slow).all()
    assert torch.allclose(sol.wavelengths(cfg, 64), 2 * math.pi / rope.inv_freq(cfg, 64))
    assert sol.wavelengths(cfg, 64)[-1] > cfg.original_max_position_embeddings * cfg.factor / 2


@given(seed=st.integers(0, 2**31 - 1), pos=st.integers(0, 300_000), dist=st.integers(0, 5000))
def test_chapter_03_solutions_halves_keep_dot_products(seed, pos, dist):
    sol = _solutions()
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    cq, sq = rope.cos_sin(torch.tensor(pos + dist), K25.rope, 64)
    ck, sk = rope.cos_sin(torch.tensor(pos), K25.rope, 64)
    rq, rk = rope.apply_rope(q, cq, sq), rope.apply_rope(k, ck, sk)
    # a dot product may cancel to near 0: its fp32 error scales with |q||k|, not with the result
    error = abs(float(sol.to_halves(rq) @ sol.to_halves(rk)) - float(rq.double() @ rk.double()))
    assert error <= RTOL[F32] * float(rq.norm() * rk.norm()), f"q.k halves off by {error:.3g}"
    assert not torch.equal(sol.to_halves(rq), rq)


# ---- the oracle's YaRN numbers, and the oracle against HF DeepseekV3 (hf_twins) ----


def test_softmax_scale_of_the_real_k25_config():
    assert orope.softmax_scale(K25) == pytest.approx(0.1446796, abs=5e-8)
    assert orope.yarn_get_mscale(64.0, 1.0) == pytest.approx(1.41589, abs=5e-6)
    assert orope.attention_factor(K25.rope) == 1.0  # mscale == mscale_all_dim: cos/sin unscaled
    # without YaRN the scale is the plain 1/sqrt(192)
    plain = K25.replace(rope=dataclasses.replace(K25.rope, type="default"))
    assert orope.softmax_scale(plain) == pytest.approx(192 ** -0.5, rel=1e-15)


def test_yarn_correction_range_of_the_real_configs():
    assert orope.correction_range(K25.rope, K25.qk_rope_head_dim) == (8, 20)  # beta 32/1
    assert K2_THINKING.rope.beta_fast == 1.0
    assert orope.correction_range(K2_THINKING.rope, 64) == (19, 20)  # beta 1/1
    assert orope.correction_range(dataclasses.replace(K25.rope, beta_fast=1.0), 64) == (19, 20)
    f = orope.inv_freq(K25.rope, 64)
    base = 50000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_array_equal(f[:8], base[:8])  # below the ramp: original frequencies
    np.testing.assert_allclose(f[20:], base[20:] / 64, rtol=1e-15)  # above it: interpolated by the factor
    assert np.all((f[8:20] <= base[8:20]) & (f[8:20] >= base[8:20] / 64))


@given(dim=st.sampled_from([4, 8, 16, 64]), original=st.sampled_from([8, 16, 4096]),
       beta_fast=st.sampled_from([32.0, 1.0, 4.0]), factor=st.sampled_from([1.0, 4.0, 64.0]),
       mscale=st.sampled_from([(1.0, 1.0), (0.707, 1.0), (1.0, 0.5)]), seed=st.integers(0, 2**16))
def test_rope_matches_hf(dim, original, beta_fast, factor, mscale, seed):
    c = make_config(rope_dim=dim, original=original)
    c = c.replace(rope=dataclasses.replace(c.rope, beta_fast=beta_fast, factor=factor, mscale=mscale[0],
                                           mscale_all_dim=mscale[1]))
    hf = transformers.DeepseekV3ForCausalLM(hf_config(c)).double().eval()
    # YaRN frequencies and magnitude (HF computes them in fp32)
    rot = hf.model.rotary_emb
    assert_close(orope.inv_freq(c.rope, dim), rot.inv_freq, F32, what="inv_freq")
    assert rot.attention_scaling == pytest.approx(orope.attention_factor(c.rope), rel=1e-12)
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(orope.softmax_scale(c), rel=1e-12)
    # cos/sin: HF lays them out as cat(freqs, freqs); positions stay small so its fp32 angles are exact enough
    positions = np.arange(40)
    cos, sin = orope.cos_sin(positions, c.rope, dim)
    hf_cos, hf_sin = rot(torch.zeros(1, dtype=torch.float64), t(positions)[None])
    assert_close(np.concatenate([cos, cos], -1)[None], hf_cos, F32, what="cos")
    assert_close(np.concatenate([sin, sin], -1)[None], hf_sin, F32, what="sin")
    # the rotation itself, fed the same float64 angles: equal up to HF's de-interleaving permutation
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 3, 40, dim)), rng.standard_normal((2, 1, 40, dim))
    hf_q, hf_k = transformers.models.deepseek_v3.modeling_deepseek_v3.apply_rotary_pos_emb_interleave(
        t(q), t(k), t(np.concatenate([cos, cos], -1))[None], t(np.concatenate([sin, sin], -1))[None])
    perm = np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
    assert_close(orope.apply_rope(q, cos, sin)[..., perm], hf_q, F64, what="rope(q)")
    assert_close(orope.apply_rope(k, cos, sin)[..., perm], hf_k, F64, what="rope(k)")


def test_rope_rotates_interleaved_pairs():
    x = np.zeros(8)
    x[2] = 1.0  # the x of pair 1
    cfg = dataclasses.replace(K25.rope, type="default")
    cos, sin = orope.cos_sin(np.array(3), cfg, 8)
    y = orope.apply_rope(x, cos, sin)
    angle = 3 * 50000.0 ** (-2 / 8)
    np.testing.assert_allclose(y, [0, 0, math.cos(angle), math.sin(angle), 0, 0, 0, 0], atol=1e-15)
