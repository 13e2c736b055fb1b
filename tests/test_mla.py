"""MLA (kimi_ref/mla.py) == the float64 oracle (kimi_ref/oracle/mla.py) in both forms, with and without a cache."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import BF16_OP, assert_close

from kimi_ref import backend, kernels, parallel
from kimi_ref import rope as trope
from kimi_ref.config import KimiConfig, fixture_path, load_config, tiny_config
from kimi_ref.mla import MLA, KVCache
from kimi_ref.norms import RMSNorm
from kimi_ref.oracle import mla as omla
from kimi_ref.oracle import rope as orope
from kimi_ref.parallel import TP
from chapter_solutions import load_solutions

K25 = load_config(fixture_path("kimi_k25"))
F32, BF16 = torch.float32, torch.bfloat16
MODES = ("naive", "absorbed")


def make_config(*, heads: int = 3, nope: int = 8, rope_dim: int = 8, v: int = 12, q_lora: int | None = 24,
                kv_lora: int = 16, hidden: int = 32, original: int = 16, beta_fast: float = 32.0,
                attention_bias: bool = False) -> KimiConfig:
    """K2.5 shrunk in size only: YaRN 64 with β 32/1 (or K2-Instruct-0905's β_fast 1), mscale 1/1, θ 50000."""
    c = tiny_config(K25, hidden_size=hidden, num_attention_heads=heads, q_lora_rank=q_lora or 24,
                    kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v,
                    original_max_position_embeddings=original, max_position_embeddings=original * 64, vision=False)
    rope_cfg = c.rope.__class__(**{**c.rope.__dict__, "beta_fast": beta_fast})
    return c.replace(q_lora_rank=q_lora, attention_bias=attention_bias, rope=rope_cfg)


@st.composite
def configs(draw) -> KimiConfig:
    # odd head counts, v_head_dim != qk_nope_head_dim, q_proj (no q_lora), contexts past the original length
    return make_config(heads=draw(st.sampled_from([1, 2, 3, 5])), nope=draw(st.sampled_from([4, 8])),
                       rope_dim=draw(st.sampled_from([2, 4, 8, 16])), v=draw(st.sampled_from([4, 6, 12])),
                       q_lora=draw(st.sampled_from([None, 24])), kv_lora=draw(st.sampled_from([8, 16])),
                       original=draw(st.sampled_from([4, 16, 4096])), beta_fast=draw(st.sampled_from([32.0, 1.0])),
                       attention_bias=draw(st.sampled_from([False, False, True])))


def make_mla(config: KimiConfig, mode: str, seed: int, dtype: torch.dtype = F32, gain: float = 1.5,
             **kw) -> tuple[MLA, dict]:
    """An MLA with random weights (``gain`` sets how sharp the softmax gets), and the same as float64 numpy."""
    torch.manual_seed(seed)
    module = MLA(config, mode=mode, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p, dtype=F32))
            else:
                p.copy_(torch.randn_like(p, dtype=F32) * p.shape[-1] ** -0.5 * (0.2 if "bias" in name else gain))
    return module, {k: v.double().numpy() for k, v in module.state_dict().items()}


def run(module: MLA, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return module(x, **kw)


@given(config=configs(), mode=st.sampled_from(MODES), form=st.sampled_from(MODES), b=st.integers(1, 2),
       t=st.integers(1, 7), start=st.sampled_from([0, 5, 100_000]), seed=st.integers(0, 2**31 - 1))
def test_matches_oracle(config, mode, form, b, t, start, seed):
    module, w = make_mla(config, mode, seed)
    x = torch.randn(b, t, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(start, start + t)
    expected = omla.mla(x.double().numpy(), w, config, positions.numpy(), form=form)
    assert_close(run(module, x, positions=positions), expected, F32, what=f"MLA {mode} vs oracle {form}")


@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**31 - 1))
def test_bf16_matches_oracle(mode, seed):
    config = make_config(heads=4, nope=16, rope_dim=8, v=16, kv_lora=32, hidden=64)
    module, w = make_mla(config, mode, seed, dtype=BF16, gain=1.0)  # bf16 rounds q and k: keep logits moderate
    x = torch.randn(2, 6, config.hidden_size, generator=torch.Generator().manual_seed(seed)).to(BF16)
    out = run(module, x)
    assert out.dtype == BF16
    expected = omla.mla(x.double().numpy(), w, config, np.arange(6), form="naive")
    assert_close(out, expected, BF16, what=f"bf16 MLA {mode}")


def _attention_f64(q_nope, q_rope, keys_nope, k_rope, values, scale):
    """float64 attention over per-head keys [B,S,h,n] (or one latent [B,S,c] shared by every head) and values."""
    q_nope, q_rope, k_rope = q_nope.double(), q_rope.double(), k_rope.double()
    t, s = q_nope.shape[1], k_rope.shape[1]
    shared = keys_nope.dim() == 3
    scores = (torch.einsum("bthc,bsc->bhts" if shared else "bthn,bshn->bhts", q_nope, keys_nope.double())
              + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)) * scale
    scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(s - t), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bsc->bthc" if shared else "bhts,bshv->bthv", p, values.double())


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=6)
@given(t=st.sampled_from([1, 7]), seed=st.integers(0, 2**31 - 1))
def test_bf16_attention_core_runs_in_fp32(mode, t, seed):
    """Scores, softmax and the weighted sum in fp32: the bf16 result is the float64 attention of the
    module's own bf16 inputs, rounded once (the single-op bf16 row, and nearest rounding almost
    everywhere). Scores or a softmax in bf16 round per term and land past it; against the float64
    oracle with the whole-model row (test_bf16_matches_oracle) they would pass."""
    config = make_config(heads=4, nope=32, rope_dim=16, v=32, kv_lora=64, hidden=64)
    module, _ = make_mla(config, mode, seed, dtype=BF16, gain=2.0)
    g = torch.Generator().manual_seed(seed)
    s, h = 12, config.num_attention_heads
    q_nope = torch.randn(2, t, h, config.qk_nope_head_dim, generator=g).to(BF16)
    q_rope = torch.randn(2, t, h, config.qk_rope_head_dim, generator=g).to(BF16)
    latent = torch.randn(2, s, config.kv_lora_rank, generator=g).to(BF16)
    k_rope = torch.randn(2, s, config.qk_rope_head_dim, generator=g).to(BF16)
    cache = module.new_cache(2, s)
    with torch.no_grad():
        if mode == "absorbed":
            cache.append(latent=latent[:, :s - t], k_rope=k_rope[:, :s - t])
            got = module.attend_absorbed(q_nope, q_rope, latent[:, s - t:], k_rope[:, s - t:], cache)
            w_uk, w_uv = (w.double() for w in module.split_kv_b())
            q_latent = torch.einsum("bthn,hnc->bthc", q_nope.double(), w_uk)  # the absorbed query, exactly
            want = torch.einsum("bthc,hvc->bthv", _attention_f64(q_latent, q_rope, latent, k_rope, latent, module.scale),
                                w_uv)
        else:
            # the per-head keys and values are kv_b_proj's bf16 output: the module's own inputs to attention
            k_nope, value = module.kv_b_proj(latent).unflatten(-1, (h, -1)).split(
                [config.qk_nope_head_dim, config.v_head_dim], dim=-1)
            key = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, h, -1)], dim=-1)
            cache.append(k=key[:, :s - t], v=value[:, :s - t])
            got = module.attend_naive(q_nope, q_rope, latent[:, s - t:], k_rope[:, s - t:], cache)
            want = _attention_f64(q_nope, q_rope, k_nope, k_rope, value, module.scale)
    assert got.dtype == BF16
    assert_close(got, want, BF16_OP, what=f"bf16 attention core ({mode}, {t} queries)")
    not_nearest = float((got != want.to(BF16)).double().mean())
    assert not_nearest < 0.02, f"{not_nearest:.1%} of the outputs are not the bf16 nearest the exact attention"


@given(config=configs(), seed=st.integers(0, 2**31 - 1))
def test_naive_equals_absorbed(config, seed):
    naive, _ = make_mla(config, "naive", seed)
    absorbed, _ = make_mla(config, "absorbed", seed)
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    assert_close(run(naive, x), run(absorbed, x).double(), F32, what="naive vs absorbed")


@given(config=configs(), mode=st.sampled_from(MODES), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_prefill_then_decode_equals_full(config, mode, chunks, seed):
    module, w = make_mla(config, mode, seed)
    total = sum(chunks)
    x = torch.randn(2, total, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    full = run(module, x)
    cache = module.new_cache(batch=2, max_len=total + 1)
    oracle_cache: dict = {}
    outs, at = [], 0
    for n in chunks:
        outs.append(run(module, x[:, at:at + n], cache=cache))
        expected = omla.mla(x[:, at:at + n].double().numpy(), w, config, np.arange(at, at + n), cache=oracle_cache,
                            form=mode)
        assert_close(outs[-1], expected, F32, what=f"chunk at {at}")
        at += n
        assert cache.length == at
    assert_close(torch.cat(outs, dim=1), full.double(), F32, what=f"{mode}: chunks vs one forward")
    if mode == "absorbed":  # the cache holds exactly the oracle's normalized latent and rotated rope key
        assert_close(cache.tensors["latent"][:, :total], oracle_cache["latent"], F32, what="cached latent")
        assert_close(cache.tensors["k_rope"][:, :total], oracle_cache["k_rope"], F32, what="cached k_rope")


@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**31 - 1))
def test_per_sequence_positions(mode, seed):
    config = make_config()
    module, _ = make_mla(config, mode, seed)
    x = torch.randn(2, 4, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])
    both = run(module, x, positions=positions)
    for i in range(2):
        assert_close(both[i:i + 1], run(module, x[i:i + 1], positions=positions[i]).double(), F32, what=f"row {i}")


def test_cache_sizes():
    config = make_config(heads=3, nope=8, rope_dim=4, v=12, kv_lora=16)
    for mode, per_token in (("absorbed", 16 + 4), ("naive", 3 * (8 + 4) + 3 * 12)):
        module = MLA(config, mode=mode, dtype=BF16)
        layer = module.new_cache(batch=2, max_len=10)
        assert layer.values_per_token() == per_token
        assert layer.bytes_per_token() == 2 * per_token
        assert sum(t.numel() for t in layer.tensors.values()) == 2 * 10 * per_token  # allocated, nothing more
    absorbed = MLA(config).new_cache(1, 4)
    assert {k: tuple(v.shape) for k, v in absorbed.tensors.items()} == {"latent": (1, 4, 16), "k_rope": (1, 4, 4)}


def test_real_k25_cache_sizes():
    # the full-size module on the meta device: no memory, real shapes
    layers = {mode: MLA(K25, mode=mode, dtype=BF16, device="meta") for mode in MODES}
    absorbed = KVCache([layers["absorbed"].new_cache(1, 8) for _ in range(K25.num_hidden_layers)])
    naive = KVCache([layers["naive"].new_cache(1, 8) for _ in range(K25.num_hidden_layers)])
    assert absorbed[0].values_per_token() == K25.kv_lora_rank + K25.qk_rope_head_dim == 576
    assert naive[0].values_per_token() == 64 * (192 + 128) == 20480
    assert absorbed.bytes_per_token() == 61 * 576 * 2 == 70272
    assert naive.bytes_per_token() // absorbed.bytes_per_token() == 35


def test_kv_cache_length_rewinds_every_layer():
    config = make_config()
    module, _ = make_mla(config, "absorbed", 0)
    cache = KVCache([module.new_cache(1, 8) for _ in range(2)])
    x = torch.randn(1, 5, config.hidden_size)
    run(module, x[:, :3], cache=cache[0])
    cache.length = 3
    ref = run(module, x[:, 3:], cache=cache[0])
    cache.length = 3  # rewind and redo: the same numbers
    assert torch.equal(run(module, x[:, 3:], cache=cache[0]), ref)
    assert [layer.length for layer in cache.layers] == [5, 3]
    with pytest.raises(ValueError, match=r"cache length must lie in 0..8, found 9"):
        cache.length = 9


@given(heads=st.sampled_from([2, 4, 6]), world=st.sampled_from([2, 3]), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**31 - 1))
def test_tensor_parallel_head_split(heads, world, mode, seed):
    if heads % world:
        with pytest.raises(parallel.TPError, match="num_attention_heads = .* not divisible"):
            MLA(make_config(heads=heads), tp=TP(0, world))
        return
    config = make_config(heads=heads)
    full, _ = make_mla(config, mode, seed)
    x = torch.randn(2, 4, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    expected = run(full, x)
    state = full.state_dict()
    h, n, r, v = heads // world, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    total = torch.zeros_like(expected)
    for rank in range(world):
        part = MLA(config, tp=TP(rank, world), mode=mode)
        assert part.heads == h
        local = dict(state)
        local["q_b_proj.weight"] = state["q_b_proj.weight"][rank * h * (n + r):(rank + 1) * h * (n + r)]
        local["kv_b_proj.weight"] = state["kv_b_proj.weight"][rank * h * (n + v):(rank + 1) * h * (n + v)]
        local["o_proj.weight"] = state["o_proj.weight"][:, rank * h * v:(rank + 1) * h * v]
        part.load_state_dict(local)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(parallel, "all_reduce", lambda t, tp: t)  # each simulated rank returns its partial sum
            total += run(part, x)
    assert_close(total, expected.double(), F32, what=f"{world} ranks summed vs one")


@given(config=configs(), mode=st.sampled_from(MODES), t=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_max_logit_is_the_oracles_largest_scaled_logit(config, mode, t, seed):
    module, w = make_mla(config, mode, seed, track_max_logit=True)
    x = torch.randn(2, t + 1, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    xn = x.double().numpy()

    def oracle_max(start: int, stop: int) -> np.ndarray:
        # logits of queries start..stop-1 against keys 0..stop-1, with the oracle's own pieces
        q_nope, q_rope = omla.query(xn[:, start:stop], w, config)
        latent, k_rope = omla.compress_kv(xn[:, :stop], w, config)
        r = config.qk_rope_head_dim
        cos, sin = orope.cos_sin(np.arange(stop), config.rope, r)
        q_rope = orope.apply_rope(q_rope, cos[start:, None], sin[start:, None])
        k_rope = orope.apply_rope(k_rope, cos, sin)
        w_uk, _ = omla.split_kv_b(w, config)
        scores = omla.scores_naive(q_nope, q_rope, latent, k_rope, w_uk) * orope.softmax_scale(config)
        return (scores + omla.causal_mask(stop - start, stop)).max(axis=(0, 2, 3))

    cache = module.new_cache(2, t + 1)
    run(module, x[:, :t], cache=cache)  # prefill
    assert module.max_logit.dtype == F32 and module.max_logit.shape == (config.num_attention_heads,)
    assert_close(module.max_logit, oracle_max(0, t), F32, what="max_logit after prefill")
    run(module, x[:, t:], cache=cache)  # one decode step sees every cached key
    assert_close(module.max_logit, oracle_max(t, t + 1), F32, what="max_logit after decode")


def _fake_kernels(calls: list):
    """The kernel contract written in torch, recording each call's shapes."""
    def rms_norm(x, weight, eps, residual=None):
        calls.append("rms_norm")
        from kimi_ref.norms import rms_norm as ref
        return ref(x, weight, eps) if residual is None else (ref(x + residual, weight, eps), x + residual)

    def apply_rope(x, cos, sin):
        assert x.dim() == 4 and cos.shape == (x.shape[1], x.shape[3] // 2) and cos.dtype == F32
        calls.append("apply_rope")
        return trope.apply_rope(x, cos[:, None, :], sin[:, None, :])

    def mla_decode(q_latent, q_rope, latent, k_rope, length, scale):
        b, h, c = q_latent.shape
        assert q_latent.dtype == q_rope.dtype == F32 and q_rope.shape[:2] == (b, h)
        assert latent.shape[0] == b and latent.shape[2] == c and isinstance(length, int)
        calls.append(("mla_decode", length))
        scores = (torch.einsum("bhc,bsc->bhs", q_latent, latent[:, :length].float())
                  + torch.einsum("bhr,bsr->bhs", q_rope, k_rope[:, :length].float()))
        return torch.einsum("bhs,bsc->bhc", torch.softmax(scale * scores, -1), latent[:, :length].float())

    return types.SimpleNamespace(rms_norm=rms_norm, apply_rope=apply_rope, mla_decode=mla_decode)


def test_triton_backend_follows_the_kernel_contract(monkeypatch):
    calls: list = []
    fake = _fake_kernels(calls)
    monkeypatch.setitem(backend.SLOTS, "triton", {
        RMSNorm: {"kernel": fake.rms_norm}, MLA: {"rope_kernel": fake.apply_rope, "decode_kernel": fake.mla_decode}})
    config = make_config()
    module, w = make_mla(config, "absorbed", 1)
    x = torch.randn(2, 5, config.hidden_size)
    reference = run(module, x)
    backend.use_backend(module, "triton")
    cache = module.new_cache(2, 5)
    out = torch.cat([run(module, x[:, :3], cache=cache), run(module, x[:, 3:4], cache=cache),
                     run(module, x[:, 4:], cache=cache)], dim=1)
    assert_close(out, reference.double(), F32, what="triton backend (contract in torch) vs torch")
    assert [c for c in calls if isinstance(c, tuple)] == [("mla_decode", 4), ("mla_decode", 5)]
    assert calls.count("apply_rope") == 6 and calls.count("rms_norm") == 6


def test_real_kernels_module():
    """The real kimi_ref.kernels: Triton where it can run (GPU, or TRITON_INTERPRET=1), else its torch fallback."""
    config = make_config(heads=2, nope=8, rope_dim=8, v=8, kv_lora=16)
    module, _ = make_mla(config, "absorbed", 2)
    x = torch.randn(2, 4, config.hidden_size, generator=torch.Generator().manual_seed(2))
    reference = run(module, x)
    backend.use_backend(module, "triton")
    assert module.decode_kernel is kernels.mla_decode and module.rope_kernel is kernels.apply_rope
    cache = module.new_cache(2, 6)
    out = torch.cat([run(module, x[:, :2], cache=cache), run(module, x[:, 2:3], cache=cache),
                     run(module, x[:, 3:], cache=cache)], dim=1)
    # CPU tensors: the interpreter's tl.dot is IEEE fp32 (DOT_IEEE), or the torch fallback runs — never tf32,
    # so the float32 row applies (the tf32 row, 500x looser, would hide a kernel rounding p to bf16).
    assert_close(out, reference.double(), F32, what="kernels MLA vs torch")


def test_errors():
    config = make_config()
    module, _ = make_mla(config, "absorbed", 0)
    d = config.hidden_size
    with pytest.raises(ValueError, match=r"MLA mode must be one of \('absorbed', 'naive'\), found 'flash'"):
        MLA(config, mode="flash")
    with pytest.raises(ValueError, match=rf"input must be \[batch, time, {d}\], found \(2, 3, 5\)"):
        run(module, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=rf"input must be \[batch, time, {d}\], found \(3, {d}\)"):
        run(module, torch.zeros(3, d))
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\) or \(2, 3\) .* found \(4,\)"):
        run(module, torch.zeros(2, 3, d), positions=torch.arange(4))
    with pytest.raises(ValueError, match=r"cos/sin must have shape"):
        run(module, torch.zeros(2, 3, d), cos_sin=(torch.zeros(3, 3), torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="'absorbed' mode was given a 'naive' cache"):
        run(module, torch.zeros(1, 1, d), cache=MLA(config, mode="naive").new_cache(1, 4))
    with pytest.raises(TypeError, match="cache must be this layer's LayerCache"):
        run(module, torch.zeros(1, 1, d), cache=KVCache([module.new_cache(1, 4)]))
    cache = module.new_cache(1, 4)
    run(module, torch.zeros(1, 3, d), cache=cache)
    with pytest.raises(ValueError, match=r"holds 4 tokens: 3 cached \+ 2 new do not fit"):
        run(module, torch.zeros(1, 2, d), cache=cache)
    with pytest.raises(ValueError, match="made for batch 1"):
        run(module, torch.zeros(2, 1, d), cache=module.new_cache(1, 4))
    other = MLA(make_config(kv_lora=8), mode="absorbed")
    with pytest.raises(ValueError, match=r"'latent': new entries have shape \(1, 1, 16\), expected \(1, 1, 8\)"):
        run(module, torch.zeros(1, 1, d), cache=other.new_cache(1, 4))
    with pytest.raises(ValueError, match="batch >= 1 and max_len >= 1"):
        module.new_cache(0, 4)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton'\), found 'cuda'"):
        backend.use_backend(module, "cuda")


# ---- chapter 04 solutions -----------------------------------------------------------------------------


def _solutions():
    return load_solutions("04_mla")


def test_chapter_04_solutions_cache_bytes():
    sol = _solutions()
    for mode in MODES:
        layer = MLA(K25, mode=mode, dtype=BF16, device="meta")
        cache = KVCache([layer.new_cache(1, 1) for _ in range(K25.num_hidden_layers)])
        assert sol.cache_bytes(K25, 1000, mode, 2, batch=3) == 3 * 1000 * cache.bytes_per_token()
    assert sol.cache_bytes(K25, 262_144, "absorbed") == 262_144 * 61 * 576 * 2
    with pytest.raises(ValueError, match="mode must be"):
        sol.cache_bytes(K25, 1, "mha")
    assert sol.attention_flops_per_decode_token(K25, 4096, "absorbed") > sol.attention_flops_per_decode_token(
        K25, 4096, "naive")


@given(config=configs(), seed=st.integers(0, 2**31 - 1))
def test_chapter_04_solutions_absorbed_output_weight(config, seed):
    sol = _solutions()
    module, _ = make_mla(config, "absorbed", seed)
    latent_out = torch.randn(2, 3, module.heads, module.latent_dim, generator=torch.Generator().manual_seed(seed))
    _, w_uv = module.split_kv_b()
    with torch.no_grad():
        expected = torch.nn.functional.linear(torch.einsum("bthc,hvc->bthv", latent_out, w_uv).flatten(-2),
                                              module.o_proj.weight)
        folded = latent_out.flatten(-2) @ sol.absorbed_output_weight(module).T
    assert_close(folded, expected.double(), F32, what="W_uv folded into o_proj")
