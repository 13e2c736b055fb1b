"""experts.py == oracle/experts.py: SwiGLU, the MoE in fp32 and bf16, INT4 experts, TP partitioning, the kernel switch."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from hypothesis import assume, given, settings, strategies as st
from tolerances import BF16_OP, assert_close

from kimi_ref import backend, int4, parallel
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.experts import DenseMLP, MoE, SwiGLU
from kimi_ref.int4 import W4A16Linear
from kimi_ref.oracle import experts as oracle
from kimi_ref.oracle import router as oracle_router
from kimi_ref.parallel import TP
from chapter_solutions import load_solutions

K25 = load_config(fixture_path("kimi_k25"))  # INT4 routed experts
THINKING = load_config(fixture_path("kimi_k2_thinking"))


def moe_config(real=K25, *, quantized=True, experts=8, k=2, groups=1, topk_group=1, d=32, width=32, shared=None):
    cfg = tiny_config(real, hidden_size=d, moe_intermediate_size=width, n_routed_experts=experts,
                      num_experts_per_tok=k, n_group=groups, topk_group=topk_group, vision=False)
    if not quantized:
        cfg = cfg.replace(quantization=None)
    if shared is not None:
        cfg = cfg.replace(n_shared_experts=shared)
    return cfg


def randomize(module: torch.nn.Module, seed: int, bias_std: float = 0.1) -> None:
    """Random dense weights (std 1/sqrt(fan_in)) and a random router bias; INT4 experts re-quantized."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            elif isinstance(m, W4A16Linear):
                packed, scale = int4.quantize(torch.randn(m.out_features, m.in_features, generator=g) / m.in_features ** 0.5)
                m.weight_packed.copy_(packed)
                m.weight_scale.copy_(scale)
        if isinstance(module, MoE):
            module.gate.weight.copy_(torch.randn(module.gate.weight.shape, generator=g) * 0.5)
            module.gate.e_score_correction_bias.copy_(torch.randn(module.gate.weight.shape[0], generator=g) * bias_std)


def oracle_weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """float64 weights named as the oracle wants them; INT4 projections dequantized."""
    sd = module.state_dict()
    out = {}
    for key, value in sd.items():
        if key.endswith("weight_packed"):
            base = key[: -len("weight_packed")]
            shape = tuple(sd[base + "weight_shape"].tolist())
            out[base + "weight"] = int4.dequantize(value, sd[base + "weight_scale"], shape, torch.float64).numpy()
        elif not key.endswith(("weight_scale", "weight_shape")):
            out[key] = value.double().numpy()
    return out


def ties_free(cfg, x: np.ndarray, w: dict[str, np.ndarray], gap: float = 1e-4) -> bool:
    choice = oracle_router.router_scores(x, w["gate.weight"]) + w["gate.e_score_correction_bias"]
    return all(np.diff(np.sort(row)).min(initial=1.0) >= gap for row in choice)


# ---- SwiGLU ------------------------------------------------------------------------------------------


@given(st.integers(1, 9), st.sampled_from([8, 16, 40]), st.sampled_from([8, 24, 64]), st.integers(0, 2**31 - 1))
def test_swiglu_matches_oracle(n, d, f, seed):
    mlp = SwiGLU(d, f)
    randomize(mlp, seed)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1))
    w = oracle_weights(mlp)
    want = oracle.swiglu(x.double().numpy(), w["gate_proj.weight"], w["up_proj.weight"], w["down_proj.weight"])
    assert_close(mlp(x), want, torch.float32, what="SwiGLU")


def test_dense_mlp_has_checkpoint_names_and_width():
    mlp = DenseMLP(K25, device="meta")
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "gate_proj.weight": (18432, 7168), "up_proj.weight": (18432, 7168), "down_proj.weight": (7168, 18432)}


# ---- the MoE -----------------------------------------------------------------------------------------


@st.composite
def moe_case(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    per_group = draw(st.sampled_from([2, 4, 6]))
    topk_group = draw(st.integers(1, groups))
    cfg = moe_config(
        draw(st.sampled_from([K25, THINKING])), quantized=draw(st.booleans()), experts=groups * per_group,
        k=draw(st.integers(1, min(4, topk_group * per_group))), groups=groups, topk_group=topk_group,
        d=draw(st.sampled_from([32, 64])), width=draw(st.sampled_from([32, 64])), shared=draw(st.sampled_from([0, 1, 2])))
    n = draw(st.integers(1, 24))
    return cfg, n, draw(st.integers(0, 2**31 - 1))


@given(moe_case())
def test_moe_matches_oracle_fp32(case):
    cfg, n, seed = case
    moe = MoE(cfg, 1)
    randomize(moe, seed)
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 7))
    w = oracle_weights(moe)
    assume(ties_free(cfg, x.double().numpy(), w))
    assert_close(moe(x), oracle.moe(x.double().numpy(), w, cfg), torch.float32, what="MoE fp32")


@given(moe_case())
def test_moe_matches_oracle_bf16(case):
    cfg, n, seed = case
    moe = MoE(cfg, 1, dtype=torch.bfloat16)
    randomize(moe, seed)
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 7)).bfloat16()
    w = oracle_weights(moe)  # the bf16-rounded weights, in float64
    assume(ties_free(cfg, x.double().numpy(), w))
    out = moe(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle.moe(x.double().numpy(), w, cfg), torch.bfloat16, what="MoE bf16")


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([4, 6]), shared=st.sampled_from([0, 1]))
def test_bf16_moe_combines_in_fp32(seed, k, shared):
    """The combine (Σ weight · expert output, plus the shared expert) accumulates in fp32 and rounds to bf16 once.

    The reference is built from the module's own bf16 pieces — each expert's output as it ran, the
    router's fp32 weights — summed in float64: what remains is one bf16 rounding, the single-op row.
    A combine that accumulates in bf16 rounds once per pick and lands past it; against the float64
    oracle with the whole-model bf16 row (test_moe_matches_oracle_bf16) it would pass.
    """
    cfg = moe_config(K25, experts=8, k=k, d=64, width=64, shared=shared)
    moe = MoE(cfg, 1, dtype=torch.bfloat16)
    randomize(moe, seed)
    x = torch.randn(48, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: outputs.__setitem__(name, o.double()))
             for name, m in [*moe.experts.items(), ("shared", moe.shared_experts)] if m is not None]
    with torch.no_grad():
        out = moe(x)
        weights, ids = moe.gate(x)
    for h in hooks:
        h.remove()
    want = torch.zeros(x.shape, dtype=torch.float64)
    for e, y in outputs.items():
        if e == "shared":
            want += y
            continue
        tokens, slot = torch.nonzero(ids == int(e), as_tuple=True)  # row order = the expert's input order
        want[tokens] += weights[tokens, slot].double()[:, None] * y
    assert out.dtype == torch.bfloat16
    assert_close(out, want, BF16_OP, what=f"bf16 MoE combine (k={k}, shared={shared})")
    # Sharper: fp32 sums round to the bf16 nearest the exact sum, but for a rare near-tie.
    not_nearest = float((out != want.to(torch.bfloat16)).double().mean())
    assert not_nearest < 0.01, f"{not_nearest:.1%} of the combined values are not the bf16 nearest the exact sum"


def test_moe_keeps_batch_shape_and_int4_layout():
    cfg = moe_config(K25)
    moe = MoE(cfg, 2)
    randomize(moe, 3)
    x = torch.randn(2, 5, cfg.hidden_size)
    torch.testing.assert_close(moe(x), moe(x.reshape(10, -1)).reshape(2, 5, -1))
    keys = moe.state_dict()
    assert keys["experts.7.down_proj.weight_packed"].dtype == torch.int32
    assert keys["experts.7.down_proj.weight_scale"].shape == (cfg.hidden_size, cfg.moe_intermediate_size // 32)
    assert "shared_experts.gate_proj.weight" in keys and "gate.e_score_correction_bias" in keys
    assert not any(k.startswith("experts.") and k.endswith(".weight") for k in keys)  # routed experts are INT4
    plain = MoE(moe_config(K25, quantized=False), 2)
    assert isinstance(plain.experts["0"].gate_proj, torch.nn.Linear)


def test_fresh_int4_experts_are_not_all_minus_eight():
    moe = MoE(moe_config(K25), 1)
    w = moe.experts["0"].up_proj.dense_weight()
    assert w.std() > 0 and w.abs().max() < 1, "a fresh INT4 expert must hold a sensible random init"


def test_tensor_parallel_ranks_sum_to_the_whole(monkeypatch):
    """Each rank holds whole experts [r·E/N, ...) and a slice of the shared expert; the ranks' partial
    sums (what the one all-reduce adds) equal the single-rank MoE."""
    cfg = moe_config(THINKING, experts=8, k=3, width=32, shared=1)
    full = MoE(cfg, 1)
    randomize(full, 11)
    sd = full.state_dict()
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(parallel, "all_reduce", lambda t, tp: t)  # collect partial sums instead
    world, total = 2, torch.zeros(9, cfg.hidden_size)
    for rank in range(world):
        part = MoE(cfg, 1, tp=TP(rank, world))
        assert sorted(int(e) for e in part.experts) == list(range(rank * 4, rank * 4 + 4))
        local = {}
        for key, target in part.state_dict().items():
            value = sd[key]
            if key.startswith("shared_experts.") and target.shape != value.shape:
                dim = 0 if "down_proj" not in key else 1
                size = target.shape[dim]
                value = value.narrow(dim, rank * size, size)
            local[key] = value
        part.load_state_dict(local)
        total += part(x)
    torch.testing.assert_close(total, full(x), rtol=1e-5, atol=1e-6)


def test_triton_backend_stacks_int4_experts(monkeypatch):
    """The triton backend calls kernels.fused_moe with the stacked INT4 buffers and this rank's offset;
    a float64 stand-in kernel (the contract's formula) gives the torch path's result."""
    calls = []

    def fused_moe(x, topk_weights, topk_ids, gp, gs, up, us, dp, ds, expert_offset=0):
        calls.append((gp.shape, expert_offset))
        out = torch.zeros(x.shape, dtype=torch.float64)
        e_local, inter = gp.shape[0], gp.shape[1]
        for n in range(x.shape[0]):
            for j in range(topk_ids.shape[1]):
                e = int(topk_ids[n, j]) - expert_offset
                if not 0 <= e < e_local:
                    continue
                g = int4.dequantize(gp[e], gs[e], (inter, x.shape[1]), torch.float64)
                u = int4.dequantize(up[e], us[e], (inter, x.shape[1]), torch.float64)
                dn = int4.dequantize(dp[e], ds[e], (x.shape[1], inter), torch.float64)
                h = x[n].double()
                out[n] += topk_weights[n, j].double() * (dn @ (torch.nn.functional.silu(g @ h) * (u @ h)))
        return out.float()

    monkeypatch.setitem(backend.SLOTS, "triton", {MoE: {"kernel": fused_moe}})
    monkeypatch.setattr(parallel, "all_reduce", lambda t, tp: t)
    cfg = moe_config(K25, experts=8, k=2)
    moe = MoE(cfg, 1, tp=TP(1, 2))  # experts 4..7
    randomize(moe, 4)
    x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    want = moe(x)
    backend.use_backend(moe, "triton")
    got = moe(x)
    assert calls == [((4, cfg.moe_intermediate_size, cfg.hidden_size // 8), 4)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # reloading weights re-stacks: the kernel must see the new experts
    randomize(moe, 5)
    moe.load_state_dict({k: v.clone() for k, v in moe.state_dict().items()})
    backend.use_backend(moe, "torch")
    want2 = moe(x)
    backend.use_backend(moe, "triton")
    torch.testing.assert_close(moe(x), want2, rtol=1e-5, atol=1e-6)
    # the weights exist once: each expert's buffers are row views of the stack the kernel reads
    offset, stacked = moe._stacked_int4()
    assert offset == 4 and moe.experts["5"].up_proj.weight_packed.data_ptr() == stacked[2][1].data_ptr()
    # a write into one expert's buffer, without load_state_dict, reaches the kernel
    moe.experts["6"].down_proj.weight_scale.mul_(2)
    backend.use_backend(moe, "torch")
    want3 = moe(x)
    backend.use_backend(moe, "triton")
    torch.testing.assert_close(moe(x), want3, rtol=1e-5, atol=1e-6)
    # new buffer objects (load_state_dict(assign=True), as .to() or .float() would make) are stacked anew
    randomize(moe, 6)
    moe.load_state_dict({k: v.clone() for k, v in moe.state_dict().items()}, assign=True)
    backend.use_backend(moe, "torch")
    want4 = moe(x)
    backend.use_backend(moe, "triton")
    torch.testing.assert_close(moe(x), want4, rtol=1e-5, atol=1e-6)
    # non-quantized experts (or a non-contiguous subset) stay on the torch path
    plain = MoE(moe_config(K25, quantized=False), 1)
    backend.use_backend(plain, "triton")
    plain(x)
    del moe.experts["5"]
    moe(x)
    assert len(calls) == 4


def test_unknown_backend_and_bad_width_are_errors():
    moe = MoE(moe_config(K25), 1)
    with pytest.raises(ValueError, match="hidden_size"):
        moe(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.use_backend(moe, "cuda-magic")
    with pytest.raises(parallel.TPError, match="n_routed_experts"):
        MoE(moe_config(K25, experts=6, k=2), 1, tp=TP(0, 4))


# ---- chapter 06 solutions ----------------------------------------------------------------------------


def _solutions():
    return load_solutions("06_experts")


SOLUTIONS = _solutions()


@given(moe_case())
def test_solution_moe_by_loop(case):
    cfg, n, seed = case
    moe = MoE(cfg, 1)
    randomize(moe, seed)
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 7))
    torch.testing.assert_close(SOLUTIONS.moe_by_loop(moe, x), moe(x), rtol=1e-5, atol=1e-5)


def test_solution_active_parameters_match_the_model_card():
    counts = SOLUTIONS.active_parameters(K25)
    assert 1.0e12 < counts["total"] < 1.05e12  # "1T total"
    assert 32e9 < counts["active"] < 33.5e9  # "32B activated"
    cfg = tiny_config(K25, vocab_size=256, vision=False).replace(quantization=None)
    from kimi_ref.model import KimiForCausalLM

    model = KimiForCausalLM(cfg, device="meta")
    assert counts.keys() == {"total", "active", "routed_experts"}
    assert SOLUTIONS.active_parameters(cfg)["total"] == sum(t.numel() for t in model.state_dict().values())


def test_solution_capacity_drop():
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # expert 0 gets 4 of 8 picks; capacity 2 at factor 1
    assert SOLUTIONS.capacity_drop(ids, 4, 1.0) == pytest.approx(2 / 8)
    assert SOLUTIONS.capacity_drop(ids, 4, 2.0) == 0.0
