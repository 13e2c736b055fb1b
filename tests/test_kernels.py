"""The Triton kernels (run by Triton's CPU interpreter) equal the float64 oracle and the torch fallback.

Each kernel is checked on generated shapes and values, with the ragged cases forced in: M not a
multiple of the block and M = 1 (W4A16), experts with no tokens and every token on one expert, plus
pairs owned by another rank (fused MoE), cache lengths 1 and not a multiple of the block, garbage
beyond ``length`` (MLA decode), and NaN positions everywhere. Tolerances come from tests/tolerances.py.

The interpreter is chosen when ``@triton.jit`` runs, so TRITON_INTERPRET=1 is set here before
anything imports triton (and the kernels package is re-imported if another test module got there first).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` (kernels are jitted at import)

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tolerances import assert_close  # noqa: E402
from chapter_solutions import load_solutions

REPO = Path(__file__).resolve().parents[1]
# NaN inputs are on purpose: numpy (the interpreter, the oracle) warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _fresh_kernels():
    """kimi_ref.kernels jitted in interpreter mode (re-imported if another test module got there first).

    Triton's own library (tl.sum, tl.maximum, ...) is jitted when triton is imported; if that happened
    before TRITON_INTERPRET=1, nothing here can repair it, so say so instead of failing obscurely.
    """
    if "triton" in sys.modules:
        import triton.language as tl

        if not type(tl.sum).__name__.startswith("Interpret"):
            raise RuntimeError(
                "tests/test_kernels.py: triton was imported before TRITON_INTERPRET=1 was set, so its kernels "
                "cannot run on the CPU; run with TRITON_INTERPRET=1 in the environment (tests/conftest.py should "
                "set it when there is no GPU)")
    mod = sys.modules.get("kimi_ref.kernels.w4a16")
    if mod is not None and not type(mod._w4a16_kernel).__name__.startswith("Interpret"):
        for name in [n for n in sys.modules if n == "kimi_ref.kernels" or n.startswith("kimi_ref.kernels.")]:
            del sys.modules[name]
    return importlib.import_module("kimi_ref.kernels")


kernels = _fresh_kernels()
K_W4 = importlib.import_module("kimi_ref.kernels.w4a16")  # submodules: the package's names are the functions
K_RMS = importlib.import_module("kimi_ref.kernels.rms_norm")
K_ROPE = importlib.import_module("kimi_ref.kernels.rope")
K_MLA = importlib.import_module("kimi_ref.kernels.mla_decode")
K_MOE = importlib.import_module("kimi_ref.kernels.fused_moe")

from kimi_ref import backend, int4  # noqa: E402
from kimi_ref.oracle import experts as o_experts  # noqa: E402
from kimi_ref.oracle import int4 as o_int4  # noqa: E402
from kimi_ref.oracle import mla as o_mla  # noqa: E402
from kimi_ref.oracle import norms as o_norms  # noqa: E402
from kimi_ref.oracle import rope as o_rope  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
f64 = lambda t: t.detach().to(torch.float64).numpy()  # noqa: E731
seeds = st.integers(0, 2**31 - 1)


def _packed(gen: torch.Generator, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random INT4 weight: every nibble value 0..15 possible, bf16 scales of both signs."""
    q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = (torch.randn(out_f, in_f // 32, generator=gen) * 0.1).to(BF16)
    return int4.pack(q), scale


def _o_dense(packed: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """The oracle's float64 dequantization of one packed Linear."""
    shape = (packed.shape[0], packed.shape[1] * 8)
    return o_int4.dequantize(packed.numpy(), scale.float().numpy(), shape)


def test_available_in_interpreter():
    assert kernels.available()
    assert sorted(kernels.__all__) == sorted(["rms_norm", "apply_rope", "w4a16_matmul", "fused_moe", "mla_decode", "available"])
    assert type(K_W4._w4a16_kernel).__name__.startswith("Interpret")


# ---- W4A16 ------------------------------------------------------------------------------------------


@settings(max_examples=25)
@example(seed=1, m=1, n=33, k_groups=5, split_k=3, bf16=False, nan=False)  # decode, split-K with a ragged last slice
@example(seed=2, m=17, n=65, k_groups=3, split_k=None, bf16=True, nan=True)  # M and N one past a block
@given(seed=seeds, m=st.sampled_from([1, 2, 3, 5, 16, 17, 33]), n=st.integers(1, 70),
       k_groups=st.integers(1, 5), split_k=st.sampled_from([None, 1, 2, 3]), bf16=st.booleans(), nan=st.booleans())
def test_w4a16_matches_oracle_and_torch(seed, m, n, k_groups, split_k, bf16, nan):
    gen = torch.Generator().manual_seed(seed)
    k = 32 * k_groups  # not always a multiple of the interpreter's BLOCK_K either way
    packed, scale = _packed(gen, n, k)
    x = torch.randn(m, k, generator=gen).to(BF16 if bf16 else F32)
    if nan:
        x[torch.randint(0, m, (1,), generator=gen).item(), 0] = float("nan")
    y = K_W4.w4a16_matmul_triton(x, packed, scale, split_k=split_k)
    assert y.dtype == F32 and y.shape == (m, n)
    expected = f64(x) @ _o_dense(packed, scale).T  # x's values (bf16 ones are exact in fp32), float64
    assert_close(y, expected, F32, what=f"w4a16 triton M={m} N={n} K={k} split_k={split_k}")
    assert_close(K_W4.w4a16_matmul_torch(x, packed, scale), expected, F32, what="w4a16 torch fallback")
    assert_close(y, K_W4.w4a16_matmul_torch(x, packed, scale).double(), F32, what="w4a16 triton vs torch")


def test_w4a16_public_call_uses_kernel_and_checks_inputs():
    gen = torch.Generator().manual_seed(0)
    packed, scale = _packed(gen, 8, 64)
    x = torch.randn(1, 64, generator=gen)
    assert_close(kernels.w4a16_matmul(x, packed, scale), f64(x) @ _o_dense(packed, scale).T, F32, what="M=1")
    with pytest.raises(int4.Int4Error, match="weight_packed width"):
        kernels.w4a16_matmul(torch.randn(1, 96), packed, scale)
    with pytest.raises(ValueError, match=r"x must be a 2-D float tensor"):
        kernels.w4a16_matmul(torch.randn(2, 1, 64), packed, scale)
    with pytest.raises(ValueError, match="split_k must be"):
        K_W4.w4a16_matmul_triton(x, packed, scale, split_k=0)


def test_w4a16_decodes_every_nibble_and_the_sign_bit():
    """One row holding q = -8..7 twice (words with the top bit set are negative int32s)."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(1, 32)
    packed = int4.pack(q)
    assert (packed < 0).any()
    scale = torch.tensor([[0.5]], dtype=BF16)
    eye = torch.eye(32)
    y = K_W4.w4a16_matmul_triton(eye, packed, scale)  # row i of the identity picks column i of W
    assert torch.equal(y[:, 0], q[0].float() * 0.5)


# ---- RMSNorm ----------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(seed=seeds, rows=st.integers(1, 6), d=st.sampled_from([1, 7, 32, 48, 100]), residual=st.booleans(),
       nan=st.booleans(), eps=st.sampled_from([1e-5, 1e-6]))
def test_rms_norm_fp32_matches_oracle(seed, rows, d, residual, nan, eps):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, d, generator=gen) * 3
    r = torch.randn(rows, 1, d, generator=gen) if residual else None
    w = torch.randn(d, generator=gen)
    if nan:
        x[0, 0, d // 2] = float("nan")
    out = K_RMS.rms_norm_triton(x, w, eps, r)
    h = f64(x) + (f64(r) if residual else 0.0)
    expected = o_norms.rms_norm(h, f64(w), eps)
    if residual:
        assert_close(out[1], h, F32, what="rms_norm residual sum")
        out = out[0]
    assert out.dtype == F32 and out.shape == x.shape
    assert_close(out, expected, F32, what="rms_norm triton vs oracle")
    fallback = K_RMS.rms_norm_torch(x, w, eps, r)
    assert_close((fallback[0] if residual else fallback), expected, F32, what="rms_norm torch fallback vs oracle")


@settings(max_examples=6)
@given(seed=seeds, rows=st.integers(1, 5), d=st.sampled_from([8, 40, 64]), residual=st.booleans())
def test_rms_norm_bf16_is_bitwise_the_torch_path(seed, rows, d, residual):
    """In bf16 the kernel rounds where torch rounds (h, then the normalized value, then × weight)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=gen) * 4).to(BF16)
    r = (torch.randn(rows, d, generator=gen) * 4).to(BF16) if residual else None
    w = torch.randn(d, generator=gen).to(BF16)
    got, want = K_RMS.rms_norm_triton(x, w, 1e-5, r), K_RMS.rms_norm_torch(x, w, 1e-5, r)
    from kimi_ref import norms  # the model's own RMSNorm: the fallback must be it
    ref = norms.rms_norm(x if r is None else x + r, w, 1e-5)
    if residual:
        assert torch.equal(got[1], want[1]) and got[0].dtype == BF16
        got, want = got[0], want[0]
    assert torch.equal(got, want) and torch.equal(want, ref.to(BF16))
    h = f64(x) + (f64(r) if residual else 0.0)
    assert_close(got, o_norms.rms_norm(h, f64(w), 1e-5), BF16, what="rms_norm bf16 vs oracle")


def test_rms_norm_errors():
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(4,\)"):
        kernels.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="residual has shape"):
        kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5, residual=torch.ones(4))
    with pytest.raises(ValueError, match="x must be fp32, bf16 or fp16, found torch.int64"):
        kernels.rms_norm(torch.ones(2, 4, dtype=torch.int64), torch.ones(4), 1e-5)


# ---- RoPE -------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(seed=seeds, b=st.integers(1, 2), t=st.integers(1, 5), h=st.sampled_from([1, 3, 4]),
       r=st.sampled_from([2, 6, 16, 64]), bf16=st.booleans(), nan=st.booleans())
def test_apply_rope_matches_oracle(seed, b, t, h, r, bf16, nan):
    from kimi_ref.config import fixture_path, load_config

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, r, generator=gen).to(BF16 if bf16 else F32)
    if nan:
        x[0, 0, 0, 0] = float("nan")  # poisons exactly its own pair
    positions = torch.randint(0, 300_000, (t,), generator=gen).numpy()
    cos64, sin64 = o_rope.cos_sin(positions, load_config(fixture_path("kimi_k25")).rope, r)  # Kimi's YaRN, float64
    cos, sin = torch.from_numpy(cos64).float(), torch.from_numpy(sin64).float()
    got = K_ROPE.apply_rope_triton(x, cos, sin)
    assert got.dtype == x.dtype and got.shape == x.shape
    expected = o_rope.apply_rope(f64(x), f64(cos)[None, :, None, :], f64(sin)[None, :, None, :])
    assert_close(got, expected, BF16 if bf16 else F32, what="apply_rope triton vs oracle")
    fallback = K_ROPE.apply_rope_torch(x, cos, sin)
    assert torch.equal(got.float().nan_to_num(7.0), fallback.float().nan_to_num(7.0))  # same rounding, bit for bit
    from kimi_ref import rope  # the model's own apply_rope agrees with the fallback
    assert torch.equal(fallback.float().nan_to_num(7.0), rope.apply_rope(x, cos[None, :, None, :], sin[None, :, None, :]).float().nan_to_num(7.0))


def test_apply_rope_errors():
    with pytest.raises(ValueError, match=r"cos/sin must be \[T, r/2\]"):
        kernels.apply_rope(torch.ones(1, 3, 2, 8), torch.ones(3, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="r even"):
        kernels.apply_rope(torch.ones(1, 3, 2, 7), torch.ones(3, 3), torch.ones(3, 3))


# ---- MLA decode -------------------------------------------------------------------------------------


def _mla_oracle(q_latent, q_rope, latent, k_rope, length, scale):
    """Absorbed-form decode from the oracle's own pieces: scores_absorbed with W_uk = identity."""
    c = q_latent.shape[-1]
    lat, kr = f64(latent)[:, :length], f64(k_rope)[:, :length]
    eye = np.eye(c)[None]  # q_nope = q_latent with W_uk = I gives q_latent·latent
    scores = o_mla.scores_absorbed(f64(q_latent)[:, None], f64(q_rope)[:, None], lat, kr,
                                   np.broadcast_to(eye, (q_latent.shape[1], c, c)))  # [B,H,1,S]
    p = o_mla.softmax(scores * scale)
    return np.einsum("bhts,bsc->bhc", p, lat)


@settings(max_examples=25)
@example(seed=1, b=1, h=5, c=16, r=8, extra=0, length=1, splits=None, bf16_cache=False)  # one cached token
@example(seed=2, b=2, h=20, c=32, r=16, extra=3, length=17, splits=2, bf16_cache=True)  # one past a block
@given(seed=seeds, b=st.integers(1, 2), h=st.sampled_from([1, 5, 16, 20]), c=st.sampled_from([16, 32, 48]),
       r=st.sampled_from([16, 8]), extra=st.integers(0, 20), length=st.integers(1, 70),
       splits=st.sampled_from([None, 1, 2, 3, 7]), bf16_cache=st.booleans())
def test_mla_decode_matches_oracle(seed, b, h, c, r, extra, length, splits, bf16_cache):
    gen = torch.Generator().manual_seed(seed)
    s = length + extra
    q_latent, q_rope = torch.randn(b, h, c, generator=gen), torch.randn(b, h, r, generator=gen)
    latent = torch.randn(b, s, c, generator=gen).to(BF16 if bf16_cache else F32)
    k_rope = torch.randn(b, s, r, generator=gen).to(BF16 if bf16_cache else F32)
    latent[:, length:] = float("nan")  # beyond length is garbage: it must never be read
    k_rope[:, length:] = float("nan")
    scale = 0.2
    got = K_MLA.mla_decode_triton(q_latent, q_rope, latent, k_rope, length, scale, num_splits=splits)
    assert got.dtype == F32 and got.shape == (b, h, c)
    expected = _mla_oracle(q_latent, q_rope, latent, k_rope, length, scale)
    assert_close(got, expected, F32, what=f"mla_decode triton length={length} S={s} splits={splits}")
    assert_close(K_MLA.mla_decode_torch(q_latent, q_rope, latent, k_rope, length, scale), expected, F32,
                 what="mla_decode torch fallback")


def test_mla_decode_length_one_long_cache_and_nan_head():
    gen = torch.Generator().manual_seed(1)
    b, h, c, r, s = 1, 17, 32, 16, 200  # 17 heads: two head blocks, the second almost empty
    q_latent, q_rope = torch.randn(b, h, c, generator=gen), torch.randn(b, h, r, generator=gen)
    latent, k_rope = torch.randn(b, s, c, generator=gen), torch.randn(b, s, r, generator=gen)
    one = K_MLA.mla_decode_triton(q_latent, q_rope, latent, k_rope, 1, 0.3)
    assert torch.equal(one, latent[:, :1].expand(b, h, c))  # one key: softmax is exactly 1
    q_latent[0, 3, 0] = float("nan")
    got = kernels.mla_decode(q_latent, q_rope, latent, k_rope, 197, 0.3)  # 197: not a multiple of any block
    assert_close(got, _mla_oracle(q_latent, q_rope, latent, k_rope, 197, 0.3), F32, what="mla long cache, NaN head")
    assert torch.isnan(got[0, 3]).all() and not torch.isnan(got[0, 4]).any()


def test_mla_decode_errors():
    q, qr, lat, kr = torch.ones(1, 2, 16), torch.ones(1, 2, 8), torch.ones(1, 5, 16), torch.ones(1, 5, 8)
    with pytest.raises(ValueError, match=r"length must be in 1..5"):
        kernels.mla_decode(q, qr, lat, kr, 6, 1.0)
    with pytest.raises(ValueError, match=r"length must be in 1..5"):
        kernels.mla_decode(q, qr, lat, kr, 0, 1.0)
    with pytest.raises(ValueError, match="shapes do not agree"):
        kernels.mla_decode(q, qr, torch.ones(1, 5, 12), kr, 3, 1.0)
    with pytest.raises(ValueError, match="num_splits must be"):
        K_MLA.mla_decode_triton(q, qr, lat, kr, 3, 1.0, num_splits=0)


# ---- fused MoE --------------------------------------------------------------------------------------


def _moe_weights(gen, e, d, i):
    gate = [_packed(gen, i, d) for _ in range(e)]
    up = [_packed(gen, i, d) for _ in range(e)]
    down = [_packed(gen, d, i) for _ in range(e)]
    stack = lambda ws, j: torch.stack([w[j] for w in ws])  # noqa: E731
    return (stack(gate, 0), stack(gate, 1), stack(up, 0), stack(up, 1), stack(down, 0), stack(down, 1))


def _moe_oracle(x, topk_weights, topk_ids, w, expert_offset):
    """Σ over this rank's picks of weight · oracle swiglu with the oracle-dequantized expert."""
    gp, gs, up, us, dp, ds = w
    out = np.zeros((x.shape[0], x.shape[1]))
    xs, ws, ids = f64(x), f64(topk_weights), topk_ids.numpy()
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j]) - expert_offset
            if 0 <= e < gp.shape[0]:
                y = o_experts.swiglu(xs[n:n + 1], _o_dense(gp[e], gs[e]), _o_dense(up[e], us[e]), _o_dense(dp[e], ds[e]))
                out[n] += ws[n, j] * y[0]
    return out


def _picks(gen, n, k, total, mode):
    if mode == "one":  # every token's first pick is expert 0: one expert gets all N rows
        rest = torch.stack([torch.randperm(total - 1, generator=gen)[: k - 1] + 1 for _ in range(n)])
        return torch.cat([torch.zeros(n, 1, dtype=torch.int64), rest], dim=1)
    return torch.stack([torch.randperm(total, generator=gen)[:k] for _ in range(n)])  # distinct per token


@settings(max_examples=20)
@example(seed=1, n=18, k=2, e=3, foreign=2, offset=1, mode="one", d=32, i=64, nan=False, bf16=False)  # 18 rows on one expert
@example(seed=2, n=1, k=3, e=6, foreign=0, offset=0, mode="random", d=64, i=32, nan=True, bf16=True)  # one token
@given(seed=seeds, n=st.sampled_from([1, 3, 18]), k=st.integers(1, 3), e=st.integers(1, 6),
       foreign=st.integers(0, 3), offset=st.integers(0, 2), mode=st.sampled_from(["random", "one"]),
       d=st.sampled_from([32, 64]), i=st.sampled_from([32, 64]), nan=st.booleans(), bf16=st.booleans())
def test_fused_moe_matches_oracle(seed, n, k, e, foreign, offset, mode, d, i, nan, bf16):
    gen = torch.Generator().manual_seed(seed)
    total = max(e + foreign, k + 1)  # global experts; ours are [offset, offset + e)
    w = _moe_weights(gen, e, d, i)
    x = torch.randn(n, d, generator=gen).to(BF16 if bf16 else F32)
    ids = _picks(gen, n, k, total, mode) + offset  # "one": local expert 0 gets every token
    tw = torch.rand(n, k, generator=gen)
    if nan:
        x[n - 1, 0] = float("nan")
    got = K_MOE.fused_moe_triton(x, tw, ids, *w, expert_offset=offset)
    assert got.dtype == F32 and got.shape == (n, d)
    expected = _moe_oracle(x, tw, ids, w, offset)
    assert_close(got, expected, F32, what=f"fused_moe triton N={n} k={k} E={e} offset={offset} mode={mode}")
    assert_close(K_MOE.fused_moe_torch(x, tw, ids, *w, expert_offset=offset), expected, F32, what="fused_moe torch fallback")


# ---- the GPU tile shapes, in the interpreter ------------------------------------------------------------
#
# The wrappers pick BLOCK_K = 32 in the interpreter: one INT4 group per tile, so a wrong scale index
# *across* the groups of a tile cannot show. Here the jit kernels are launched with the block sizes of a
# GPU launch (compile_check.CONFIGS, plus BLOCK_K 128/256: up to 8 groups a tile), IEEE dots (the tile
# logic is under test, not the tensor-core precision), ragged M and N, and compared with the oracle.

from kimi_ref.kernels.compile_check import CONFIGS  # noqa: E402
from kimi_ref.kernels._runtime import DOT_IEEE  # noqa: E402

W4_TILES = sorted({(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["USE_DOT"])
                   for _, mod, _, _, c, _ in CONFIGS if mod == "w4a16"} | {(16, 64, 128, True), (2, 32, 128, False)})
MOE_TILES = sorted({(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for _, mod, _, _, c, _ in CONFIGS if mod == "fused_moe"}
                   | {(16, 32, 128)})


def _launch_w4a16(x, packed, scale, block_m, block_n, block_k, use_dot, split_k=1):
    """``_w4a16_kernel`` launched as w4a16_matmul_triton does, with the given tile."""
    m, k = x.shape
    n = packed.shape[0]
    k_per_split = -(-(-(-k // block_k)) // split_k) * block_k
    split_k = -(-k // k_per_split)
    out = torch.empty(split_k, m, n, dtype=F32)
    grid = (-(-m // block_m), -(-n // block_n), split_k)
    K_W4._w4a16_kernel[grid](x, packed, scale, out, m, n, k, k_per_split, x.stride(0), packed.stride(0),
                             scale.stride(0), out.stride(0), out.stride(1), BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k, GROUP=int4.GROUP_SIZE, USE_DOT=use_dot, DOT_MODE=DOT_IEEE)
    return out.sum(0)


@pytest.mark.parametrize("tile", W4_TILES, ids=[f"M{t[0]}N{t[1]}K{t[2]}{'dot' if t[3] else 'fma'}" for t in W4_TILES])
def test_w4a16_at_gpu_tile_shapes(tile):
    block_m, block_n, block_k, use_dot = tile
    gen = torch.Generator().manual_seed(block_m * 1000 + block_k)
    m = max(1, block_m + block_m // 2 - 1) if block_m > 1 else 1  # a ragged last row block
    n, k = block_n + 5, 2 * block_k + 96  # ragged N; K: whole tiles and a partial one, 3+ groups in each
    packed, scale = _packed(gen, n, k)
    for dtype, split_k in ((F32, 1), (BF16, 2)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = _launch_w4a16(x, packed, scale, block_m, block_n, block_k, use_dot, split_k)
        assert_close(y, f64(x) @ _o_dense(packed, scale).T, F32, what=f"w4a16 tile {tile} {dtype} split {split_k}")


def _launch_fused_moe(x, tw, ids, w, offset, block_m, block_n, block_k):
    """fused_moe_triton with the given tile for both kernels (one-row blocks multiply in FMAs)."""
    tile = {"BLOCK_N": block_n, "BLOCK_K": block_k}
    return K_MOE.fused_moe_triton(x, tw, ids, *w, expert_offset=offset, block_m=block_m, up_config=tile,
                                  down_config=tile)


@pytest.mark.parametrize("tile", MOE_TILES, ids=[f"M{t[0]}N{t[1]}K{t[2]}" for t in MOE_TILES])
def test_fused_moe_at_gpu_tile_shapes(tile):
    block_m, block_n, block_k = tile
    gen = torch.Generator().manual_seed(block_m + block_k)
    e, k, offset = 3, 2, 1
    d, i = 2 * block_k + 64, block_k + 32  # both reductions: whole tiles plus a partial one, several groups each
    w = _moe_weights(gen, e, d, i)
    n = block_m + 3  # one expert's run spans two row blocks
    ids = _picks(gen, n, k, e + 2, "one") + offset
    tw = torch.rand(n, k, generator=gen)
    x = torch.randn(n, d, generator=gen)
    got = _launch_fused_moe(x, tw, ids, w, offset, block_m, block_n, block_k)
    assert_close(got, _moe_oracle(x, tw, ids, w, offset), F32, what=f"fused_moe tile {tile}")


def test_fused_moe_zero_token_experts_cost_nothing():
    """Experts nobody picked get no block in the schedule; foreign picks contribute nothing."""
    ids = torch.tensor([[5, 1], [5, 9], [2, 5]])  # offset 2, E = 4: local 0 once, 3 thrice; 1, 9 foreign
    order, expert, start, end = K_MOE.block_schedule(ids, expert_offset=2, num_experts=4, block_m=2)
    used = expert[expert >= 0].tolist()
    assert used == [0, 3, 3]  # expert 0: 1 row (one block); expert 3: 3 rows (two blocks); 1 and 2: none
    assert (end - start)[expert >= 0].clamp(max=2).tolist() == [1, 2, 1]
    gen = torch.Generator().manual_seed(3)
    w = _moe_weights(gen, 4, 32, 32)
    x, tw = torch.randn(3, 32, generator=gen), torch.rand(3, 2, generator=gen)
    w_poisoned = list(w)
    w_poisoned[1] = w[1].clone()
    w_poisoned[1][1] = float("nan")  # expert 1's gate scales: never read, so they cannot poison the output
    got = kernels.fused_moe(x, tw, ids, *w_poisoned, expert_offset=2)
    assert_close(got, _moe_oracle(x, tw, ids, w, 2), F32, what="fused_moe with a poisoned idle expert")
    none = kernels.fused_moe(x, tw, ids + 100, *w, expert_offset=2)  # no pick is ours
    assert torch.equal(none, torch.zeros(3, 32))


def test_fused_moe_errors():
    gen = torch.Generator().manual_seed(0)
    w = _moe_weights(gen, 2, 32, 32)
    with pytest.raises(ValueError, match="topk_weights/topk_ids must both be"):
        kernels.fused_moe(torch.ones(3, 32), torch.ones(3, 2), torch.zeros(2, 2, dtype=torch.int64), *w)
    with pytest.raises(int4.Int4Error, match="w_down"):
        kernels.fused_moe(torch.ones(3, 32), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64),
                          *w[:4], w[4][:, :, :2], w[5])
    with pytest.raises(ValueError, match="topk_ids must be int64"):
        kernels.fused_moe(torch.ones(3, 32), torch.ones(3, 2), torch.zeros(3, 2), *w)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[N, d\]"):
        kernels.fused_moe(torch.ones(32), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64), *w)


# ---- without triton ---------------------------------------------------------------------------------


def test_import_without_triton_falls_back_to_torch():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch\nfrom kimi_ref import kernels, int4\n"
        "assert not kernels.available()\n"
        "p, s = int4.quantize(torch.randn(4, 32))\nx = torch.randn(2, 32)\n"
        "assert torch.allclose(kernels.w4a16_matmul(x, p, s), x @ int4.dequantize(p, s, (4, 32)).T)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# ---- the tiny model: backend="triton" == backend="torch" --------------------------------------------


def test_tiny_model_triton_backend_equals_torch(monkeypatch):
    """Prefill and one decode step of the tiny model, every kernel on its real call site."""
    from kimi_ref.config import fixture_path, load_config, tiny_config
    from kimi_ref.model import KimiForCausalLM

    config = tiny_config(load_config(fixture_path("kimi_k25")), vision=False)
    torch.manual_seed(0)
    model = KimiForCausalLM(config)
    with torch.no_grad():  # random weights everywhere, INT4 experts included (the default -8s would hide bugs)
        for module in model.modules():
            if isinstance(module, int4.W4A16Linear):
                module.weight_packed.copy_(torch.randint(-2**31, 2**31 - 1, module.weight_packed.shape, dtype=torch.int32))
                module.weight_scale.copy_((torch.rand(module.weight_scale.shape) * 0.02).to(BF16))
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    calls: dict[str, int] = {}
    triton = {cls: dict(slots) for cls, slots in backend.SLOTS["triton"].items()}  # what use_backend hands out
    for slots in triton.values():
        for slot, original in slots.items():
            if original.__name__ in ("rms_norm", "apply_rope", "fused_moe", "mla_decode"):
                def counted(*args, _name=original.__name__, _original=original, **kwargs):
                    calls[_name] = calls.get(_name, 0) + 1
                    return _original(*args, **kwargs)

                slots[slot] = counted
    monkeypatch.setitem(backend.SLOTS, "triton", triton)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))

    def run(backend: str):
        model.set_backend(backend)
        cache = model.new_cache(2, 8)
        return model(ids, cache), model(ids[:, :1], cache)

    ref_prefill, ref_decode = run("torch")
    assert not calls
    got_prefill, got_decode = run("triton")
    assert set(calls) == {"rms_norm", "apply_rope", "fused_moe", "mla_decode"}, calls
    assert_close(got_prefill, ref_prefill.double(), F32, what="tiny model prefill, triton vs torch")
    assert_close(got_decode, ref_decode.double(), F32, what="tiny model decode step, triton vs torch")


# ---- compiled for a GPU (no GPU needed) ------------------------------------------------------------


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile each kernel's GPU launch config to a cubin."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-m", "kimi_ref.kernels.compile_check", "--arch", "90"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("ok    ") == len(importlib.import_module("kimi_ref.kernels.compile_check").CONFIGS)


# ---- the benchmark script and the chapter's exercises -----------------------------------------------


def test_bench_kernels_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "benchmarks" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.md"
    assert bench.main(["--smoke", "--iters", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "FAILED" not in table, table
    for title in ("### W4A16 GEMM", "### Fused MoE", "### MLA decode", "copy bandwidth"):
        assert title in table
    assert table.count("| 64×128 |") == 2 and "| 1 | 100 |" in table


def _solutions():
    return load_solutions("12_kernels")


def test_chapter_12_solutions():
    sol = _solutions()
    gen = torch.Generator().manual_seed(0)
    packed, scale = _packed(gen, 6, 64)
    tile = sol.unpack_tile(packed.numpy(), scale.float().numpy())
    assert np.array_equal(tile, _o_dense(packed, scale))
    assert np.array_equal(tile, int4.dequantize(packed, scale, (6, 64)).double().numpy())
    # H100 spec: 989 TFLOP/s, 3.35 TB/s -> memory-bound below M ≈ 83 with INT4, ≈ 295 with bf16 weights
    assert round(sol.ridge_batch(989e12, 3.35e12)) == 83
    assert round(sol.ridge_batch(989e12, 3.35e12, bytes_per_weight=2.0)) == 295
    scores = np.random.default_rng(0).normal(size=50) * 30  # large logits: the max shift matters
    values = np.random.default_rng(1).normal(size=(50, 4))
    chunks = [slice(0, 7), slice(7, 31), slice(31, 50)]
    partials = np.stack([o_mla.softmax(scores[ch]) @ values[ch] for ch in chunks])
    lse = np.array([np.log(np.sum(np.exp(scores[ch] - scores[ch].max()))) + scores[ch].max() for ch in chunks])
    assert np.allclose(sol.combine_splits(partials, lse), o_mla.softmax(scores) @ values, rtol=1e-12, atol=1e-12)


@settings(max_examples=8)
@given(seed=seeds, n=st.integers(1, 6), offset=st.sampled_from([0, 3]))
def test_fused_moe_one_row_blocks(seed, n, offset):
    """block_m = 1 (decode: one row a block, fp32 FMAs instead of tl.dot) equals the oracle, foreign picks dropped."""
    gen = torch.Generator().manual_seed(seed)
    e_all, local, k, d, i = 8, 5, 3, 64, 32
    weights = [_packed(gen, i, d) for _ in range(local)], [_packed(gen, i, d) for _ in range(local)], \
        [_packed(gen, d, i) for _ in range(local)]
    stacked = [torch.stack([w[part] for w in group]) for group in weights for part in (0, 1)]
    ids = torch.stack([torch.randperm(e_all, generator=gen)[:k] for _ in range(n)])
    tw = torch.rand(n, k, generator=gen)
    x = torch.randn(n, d, generator=gen).to(BF16)
    got = K_MOE.fused_moe_triton(x, tw, ids, *stacked, expert_offset=offset, block_m=1)
    expected = np.zeros((n, d))
    for t, j in zip(*np.nonzero(((ids >= offset) & (ids < offset + local)).numpy())):
        e = int(ids[t, j]) - offset
        dense = [_o_dense(*group[e]) for group in weights]
        expected[t] += float(tw[t, j]) * o_experts.swiglu(f64(x[t:t + 1]), *dense)[0]
    assert_close(got, expected, F32, what=f"fused_moe block_m=1 n={n} offset={offset}")
    with pytest.raises(ValueError, match="block_m must be 1"):
        K_MOE.fused_moe_triton(x, tw, ids, *stacked, expert_offset=offset, block_m=8)


def test_launch_overrides_name_their_keys():
    """A tuning sweep's ``config`` may override a wrapper's launch; a key the kernel lacks is refused by name."""
    gen = torch.Generator().manual_seed(0)
    packed, scale = _packed(gen, 8, 64)
    x = torch.randn(1, 64, generator=gen)
    assert_close(K_W4.w4a16_matmul_triton(x, packed, scale, config={"BLOCK_N": 16, "BLOCK_K": 64}),
                 f64(x) @ _o_dense(packed, scale).T, F32, what="w4a16 with a launch override")
    with pytest.raises(ValueError, match=r"w4a16_matmul: unknown launch key 'BLOCK_H'"):
        K_W4.w4a16_matmul_triton(x, packed, scale, config={"BLOCK_H": 16})
    w = _moe_weights(gen, 2, 32, 32)
    ids = torch.zeros(1, 2, dtype=torch.int64)
    ids[0, 1] = 1
    with pytest.raises(ValueError, match=r"fused_moe \(down\): unknown launch key 'BLOCK_S'"):
        K_MOE.fused_moe_triton(torch.ones(1, 32), torch.ones(1, 2), ids, *w, down_config={"BLOCK_S": 16})
    q, lat = torch.randn(1, 16, 16, generator=gen), torch.randn(1, 20, 16, generator=gen)
    with pytest.raises(ValueError, match=r"mla_decode: unknown launch key 'BLOCK_N'"):
        K_MLA.mla_decode_triton(q, q, lat, lat, 20, 0.1, config={"BLOCK_N": 32})
