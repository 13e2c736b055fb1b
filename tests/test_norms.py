"""RMSNorm (kimi_ref/norms.py) == the float64 oracle (kimi_ref/oracle/norms.py), and its eps rules."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_close

import transformers
from hf_twins import F32, F64, t

from kimi_ref import backend, norms
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.mla import LATENT_NORM_EPS, MLA
from kimi_ref.oracle import norms as onorms
from chapter_solutions import load_solutions

K25 = load_config(fixture_path("kimi_k25"))
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(seed: int, shape: tuple[int, ...], magnitude: float, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(dtype)
    return x, w


@given(dtype=st.sampled_from(DTYPES), lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       n=st.sampled_from([1, 2, 7, 64, 513, 2048]), magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
       eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_matches_oracle(dtype, lead, n, magnitude, eps, seed):
    x, w = _inputs(seed, (*lead, n), magnitude, dtype)
    expected = onorms.rms_norm(x.double().numpy(), w.double().numpy(), eps)
    module = norms.RMSNorm(n, eps, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        y = module(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected, dtype, what=f"RMSNorm {dtype}")
    assert_close(norms.rms_norm(x, w, eps), expected, dtype, what="rms_norm")


@given(dtype=st.sampled_from(DTYPES), n=st.sampled_from([8, 96]), seed=st.integers(0, 2**31 - 1))
def test_fused_residual_form(dtype, n, seed):
    x, w = _inputs(seed, (3, 5, n), 1.0, dtype)
    residual, _ = _inputs(seed + 1, (3, 5, n), 2.0, dtype)
    module = norms.RMSNorm(n, 1e-5, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        y, h = module(x, residual)
    assert torch.equal(h, x + residual)  # the residual stream itself, in the model dtype
    expected = onorms.rms_norm(h.double().numpy(), w.double().numpy(), 1e-5)
    assert_close(y, expected, dtype, what="RMSNorm(x, residual)")


@example(lead=(3,), n=7168, magnitude=1e-2, seed=27195)  # a near-tie in x / rms, then a second rounding: 2 ulps
@given(lead=st.sampled_from([(3,), (2, 5)]), n=st.sampled_from([64, 1536, 7168]),
       magnitude=st.sampled_from([1e-2, 1.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_bf16_statistics_run_in_fp32(lead, n, magnitude, seed):
    """The module's statistics are fp32: its bf16 output is exactly bf16(weight · bf16(x / rms)) with the
    exact rms of the bf16 input, but for near-ties: x / rms one ulp off, and the product's rounding can
    carry that to two ulps of the output — rarely (the share of outputs off is what catches bf16 statistics).

    Statistics in bf16 (the mean of squares or the rsqrt rounded to 8 bits) pass the oracle comparison
    at the whole-model bf16 row; only the Triton kernel's bit-exact test would see them. This test
    needs no Triton."""
    from tolerances import ulp_distance

    x, w = _inputs(seed, (*lead, n), magnitude, torch.bfloat16)
    module = norms.RMSNorm(n, 1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(w)
        y = module(x)
    x64 = x.double()
    normed = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    expected = (w.double() * normed.double()).to(torch.bfloat16)  # a bf16 × bf16 product is exact in float64
    ulps = ulp_distance(y, expected, torch.bfloat16)
    assert ulps.max() <= 2, f"an output is {ulps.max()} bf16 steps from bf16(w · bf16(x / rms))"
    assert (ulps > 0).mean() < 0.01, f"{(ulps > 0).mean():.1%} of the outputs differ from bf16(w · bf16(x / rms))"


def test_bf16_in_bf16_out_with_one_outlier_channel():
    # 4096 channels of 1.0 and one of 64 (an activation outlier): statistics in fp32, result in bf16.
    x = torch.ones(1, 4097, dtype=torch.bfloat16)
    x[0, 0] = 64.0
    w = torch.ones(4097, dtype=torch.bfloat16)
    y = norms.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert_close(y, onorms.rms_norm(x.double().numpy(), w.double().numpy(), 1e-5), torch.bfloat16, what="bf16")


def test_latent_norms_use_1e6_and_layer_norms_the_config_eps():
    assert K25.rms_norm_eps == 1e-5
    mla = MLA(tiny_config(K25, vision=False))
    assert mla.q_a_layernorm.eps == mla.kv_a_layernorm.eps == LATENT_NORM_EPS == 1e-6
    # ... and it is not a no-op difference: at rms ~ 1e-3 the two eps give different numbers.
    x, w = _inputs(0, (4, 32), 1e-3, torch.float32)
    with torch.no_grad():
        mla.kv_a_layernorm.weight.copy_(w)
        y = mla.kv_a_layernorm(x)
    assert_close(y, onorms.rms_norm(x.double().numpy(), w.double().numpy(), 1e-6), torch.float32, what="1e-6")
    with pytest.raises(AssertionError):
        assert_close(y, onorms.rms_norm(x.double().numpy(), w.double().numpy(), 1e-5), torch.float32, what="1e-5")


@pytest.mark.parametrize("latent", ["q_a_layernorm", "kv_a_layernorm"])
@given(seed=st.integers(0, 2**31 - 1))
def test_each_latent_norm_uses_1e6_in_the_mla_forward(latent, seed):
    """The eps quirk, per module and by behaviour: with latents of rms ~1e-3 (where 1e-6 and 1e-5 differ
    by a factor ~2 in the normalisation), MLA.query / MLA.compress_kv equal the oracle's, whose latent
    norms use 1e-6. A module built with the config's 1e-5 is off by ~50% — not the ~1.07x of the
    tolerance by which the whole-model comparison would notice it."""
    from kimi_ref.oracle import mla as omla

    config = tiny_config(K25, hidden_size=32, q_lora_rank=24, kv_lora_rank=16, vision=False)
    mla = MLA(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("layernorm.weight")
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        # the projection into this latent made tiny: its rms ~1e-3, so eps decides the normalisation
        proj = mla.q_a_proj if latent == "q_a_layernorm" else mla.kv_a_proj_with_mqa
        proj.weight.mul_(1e-3)
    w = {k: v.double().numpy() for k, v in mla.state_dict().items()}
    x = torch.randn(2, 5, config.hidden_size, generator=g)
    with torch.no_grad():
        if latent == "q_a_layernorm":
            got, want = torch.cat(mla.query(x), -1), np.concatenate(omla.query(x.double().numpy(), w, config), -1)
        else:
            got, want = mla.compress_kv(x)[0], omla.compress_kv(x.double().numpy(), w, config)[0]
    assert_close(got, want, torch.float32, what=f"{latent} inside MLA vs the oracle (eps 1e-6)")


def test_triton_backend_calls_the_kernel_contract(monkeypatch):
    calls = []

    def rms_norm(x, weight, eps, residual=None):
        calls.append((tuple(x.shape), eps, residual is not None))
        if residual is None:
            return norms.rms_norm(x, weight, eps)
        h = x + residual
        return norms.rms_norm(h, weight, eps), h

    monkeypatch.setitem(backend.SLOTS, "triton", {norms.RMSNorm: {"kernel": rms_norm}})
    module = backend.use_backend(norms.RMSNorm(16, 1e-6), "triton")
    x = torch.randn(2, 16)
    assert torch.equal(module(x), norms.rms_norm(x, module.weight, 1e-6))
    module(x, x)
    assert calls == [((2, 16), 1e-6, False), ((2, 16), 1e-6, True)]


def test_errors():
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(4,\)"):
        norms.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match=r"RMSNorm\(8\): input has 4 channels"):
        norms.RMSNorm(8, 1e-6)(torch.ones(2, 4))
    with pytest.raises(ValueError, match="residual has shape"):
        norms.RMSNorm(4, 1e-6)(torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="must be positive"):
        norms.RMSNorm(0, 1e-6)
    with pytest.raises(ValueError, match="must be positive"):
        norms.RMSNorm(4, 0.0)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton'\), found 'cuda'"):
        backend.use_backend(norms.RMSNorm(4, 1e-6), "cuda")


def test_oracle_and_torch_are_not_trivially_equal():
    # guard against a test that cannot fail: a wrong eps or a missing weight is caught
    x, w = _inputs(3, (2, 16), 1e-3, torch.float32)
    expected = onorms.rms_norm(x.double().numpy(), w.double().numpy(), 1e-6)
    with pytest.raises(AssertionError):
        assert_close(norms.rms_norm(x, torch.ones(16), 1e-6), expected, torch.float32)
    assert np.isfinite(expected).all()


def test_chapter_03_solution_rms_norm_by_hand():
    sol = load_solutions("03_norms_rope")
    for dtype in DTYPES:
        x, w = _inputs(5, (3, 300), 2.0, dtype)
        expected = onorms.rms_norm(x.double().numpy(), w.double().numpy(), 1e-6)
        assert_close(sol.rms_norm_by_hand(x, w, 1e-6), expected, dtype, what="by hand")


# ---- the oracle against torch and HF DeepseekV3 ----

@given(shape=st.sampled_from([(5, 8), (2, 3, 32), (1, 7)]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 2**16))
def test_rms_norm_matches_torch_and_hf(shape, scale, eps, seed):
    rng = np.random.default_rng(seed)
    x, w = scale * rng.standard_normal(shape), 1 + 0.3 * rng.standard_normal(shape[-1])
    ours = onorms.rms_norm(x, w, eps)
    assert_close(ours, torch.nn.functional.rms_norm(t(x), (shape[-1],), t(w), eps), F64, what="rms_norm vs torch")
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(shape[-1], eps).double()
    with torch.no_grad():
        hf.weight.copy_(t(w))
        assert_close(ours, hf(t(x)), F32, what="rms_norm vs HF (fp32 inside)")
