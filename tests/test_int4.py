"""INT4 pack-quantized weights: bit-exact against compressed-tensors, the numpy twin, W4A16Linear.

* pack / unpack: bit-exact against ``compressed_tensors...pack_to_int32`` / ``unpack_from_int32`` on
  generated shapes and values (every int32 bit pattern for unpack), and against the numpy twin.
* quantize: scales and packed words bit-exact against compressed-tensors' own path (minmax group
  statistics → ``calculate_qparams`` with bf16 scales → ``quantize`` to int8 → ``pack_to_int32``), for
  float32 and bfloat16 weights, including all-zero groups and exact ties; dequantize bit-exact against
  its bf16 ``dequantize`` and exact in float32.
* W4A16Linear == the oracle (dequantize in float64, then matmul), at the tolerance of x's dtype.
* Every bad shape, dtype or weight_shape is a clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tolerances import assert_close

from kimi_ref import int4
from kimi_ref.oracle import int4 as oracle_int4
from chapter_solutions import load_solutions

REPO = Path(__file__).resolve().parents[1]

shapes = st.tuples(st.integers(1, 12), st.integers(1, 6).map(lambda n: 32 * n))  # (out, in), in % 32 == 0
packable_shapes = st.tuples(st.integers(1, 12), st.integers(1, 24).map(lambda n: 8 * n))


def q_values(shape):
    return hnp.arrays(np.int8, shape, elements=st.integers(-8, 7))


# ---- packing ------------------------------------------------------------------------------------------


@given(st.data(), packable_shapes)
def test_pack_unpack_bit_exact_against_compressed_tensors(data, shape):
    q = torch.from_numpy(data.draw(q_values(shape)))
    packed = int4.pack(q)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (shape[0], shape[1] // 8)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(int4.unpack(packed, shape), q)
    assert np.array_equal(oracle_int4.pack(q.numpy()), packed.numpy())
    assert np.array_equal(oracle_int4.unpack(packed.numpy(), shape), q.numpy())


@given(st.data(), packable_shapes)
def test_unpack_every_bit_pattern_like_compressed_tensors(data, shape):
    # Any int32 word is 8 valid nibbles: negative words (top nibble >= 8) included.
    words = data.draw(hnp.arrays(np.int32, (shape[0], shape[1] // 8), elements=st.integers(-(2**31), 2**31 - 1)))
    packed = torch.from_numpy(words)
    ours = int4.unpack(packed, shape)
    assert torch.equal(ours, unpack_from_int32(packed, 4, torch.Size(shape)))
    assert np.array_equal(oracle_int4.unpack(words, shape), ours.numpy())
    assert torch.equal(int4.pack(ours), packed)


def test_excess8_layout_bit_by_bit():
    # Column i goes to nibble i % 8 of word i // 8, stored as q + 8 (offset binary, not two's complement).
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [7, 7, 7, 7, 7, 7, 7, 7], [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.int8)
    words = int4.pack(q).flatten().tolist()
    assert words[0] == 0x76543210
    assert words[1] == -1  # 0xFFFFFFFF read as a signed int32
    assert words[2] == 0x98888888 - 2**32  # top nibble 9 = 1 + 8: the word is negative
    assert oracle_int4.pack(q.numpy()).flatten().tolist() == words


# ---- quantizing ---------------------------------------------------------------------------------------


def ct_reference(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, QuantizationArgs]:
    """compressed-tensors' own path: minmax over each group, calculate_qparams, quantize, pack."""
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size,
                            scale_dtype=torch.bfloat16)
    groups = w.reshape(w.shape[0], -1, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    q = ct_quantize(w, scale, zero_point, args, dtype=torch.int8)
    return pack_to_int32(q, 4), scale, args


def weights(shape, dtype):
    """Generated weights: varied magnitudes per row, all-zero groups, exact zeros, exact ties."""
    def build(values, row_scale, zero_rows):
        w = torch.from_numpy(values).to(torch.float32) * torch.tensor(row_scale, dtype=torch.float32)[:, None]
        for r in zero_rows:
            w[r % shape[0], :32] = 0.0
        return w.to(dtype)

    return st.builds(
        build,
        hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32)),
        st.lists(st.sampled_from([1e-3, 0.02, 0.5, 3.0]), min_size=shape[0], max_size=shape[0]),
        st.lists(st.integers(0, 100), max_size=2),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.data(), shape=shapes)
def test_quantize_bit_exact_against_compressed_tensors(dtype, data, shape):
    w = data.draw(weights(shape, dtype))
    packed, scale = int4.quantize(w)
    ref_packed, ref_scale, args = ct_reference(w)
    assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (shape[0], shape[1] // 32)
    assert torch.equal(scale.to(ref_scale.dtype), ref_scale)
    assert torch.equal(packed, ref_packed)
    # dequantize: bit-exact with compressed-tensors' bf16 dequantize, exact in float32
    q = int4.unpack(packed, shape)
    ref_w = ct_dequantize(q, ref_scale.to(torch.bfloat16), torch.zeros_like(ref_scale), args)
    assert torch.equal(int4.dequantize(packed, scale, shape, torch.bfloat16), ref_w)
    exact = q.double() * scale.double().repeat_interleave(32, dim=1)
    assert torch.equal(int4.dequantize(packed, scale, shape, torch.float32).double(), exact)
    # the numpy twin computes the same bits
    o_packed, o_scale = oracle_int4.quantize(w.float().numpy(), bf16_input=dtype == torch.bfloat16)
    assert np.array_equal(o_packed, packed.numpy()) and np.array_equal(o_scale, scale.float().numpy())
    assert np.array_equal(oracle_int4.dequantize(o_packed, o_scale, shape), exact.numpy())


def test_scale_is_max_over_7_5_and_ties_round_to_even():
    # max |w| = 7.5 gives scale exactly 1.0: +7.5 rounds to 8 and clips to 7, -7.5 rounds to -8;
    # halves round to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2); an all-zero group gets bf16's eps as its scale.
    row = [7.5, -7.5, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49] + [0.0] * 24
    w = torch.tensor([row, [0.0] * 32])
    q, scale = int4.quantize_groups(w)
    assert scale.tolist() == [[1.0], [torch.finfo(torch.bfloat16).eps]]
    assert q[0, :8].tolist() == [7, -8, 0, 2, 2, 0, -2, 3]
    assert torch.equal(int4.pack(q), ct_reference(w)[0])


def test_quantization_error_is_at_most_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, scale = int4.quantize(w)
    err = (int4.dequantize(packed, scale, w.shape) - w).abs()
    step = scale.float().repeat_interleave(32, dim=1)
    # half a step, plus the largest value's clip (7.5 -> 7) and the bf16 rounding of the scale
    assert bool((err <= step * (0.5 + 7.5 * 2**-8)).all())


# ---- W4A16Linear --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.data(), shape=shapes, batch=st.tuples(st.integers(1, 3), st.integers(1, 5)))
def test_w4a16_linear_matches_oracle(dtype, data, shape, batch):
    out_f, in_f = shape
    w = data.draw(weights(shape, torch.float32))
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, (*batch, in_f), elements=st.floats(-2, 2, width=32))))
    layer = int4.W4A16Linear.from_dense(w)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and tuple(y.shape) == (*batch, out_f)
    packed, scale = layer.weight_packed.numpy(), layer.weight_scale.float().numpy()
    w64 = oracle_int4.dequantize(packed, scale, shape)
    x64 = x.to(dtype).double().numpy()
    assert_close(y, x64 @ w64.T, dtype, what="W4A16Linear vs float64 dequantize-then-matmul")


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(seed=st.integers(0, 2**31 - 1), out_f=st.integers(1, 9), groups=st.integers(1, 3))
def test_w4a16_linear_other_group_sizes_match_oracle(group_size, dtype, seed, out_f, groups):
    """``from_dense(w, group_size=64/128)``: the oracle's own quantization of w (bit-exact packed words
    and scales), and outputs equal to x · dequantize(...)ᵀ in float64 with one scale per 64/128 columns."""
    in_f = group_size * groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    layer = int4.W4A16Linear.from_dense(w, group_size=group_size)
    packed, scale = oracle_int4.quantize(w.numpy(), group_size)
    np.testing.assert_array_equal(layer.weight_packed.numpy(), packed)
    np.testing.assert_array_equal(layer.weight_scale.float().numpy(), scale)
    assert layer.weight_scale.shape == (out_f, groups)
    x = (torch.randn(3, in_f, generator=g) * 2).to(dtype)
    y = layer(x)
    w64 = oracle_int4.dequantize(packed, scale, (out_f, in_f))
    assert_close(y, x.double().numpy() @ w64.T, dtype, what=f"W4A16Linear group {group_size} vs oracle")
    assert_close(layer.dense_weight(), w64, torch.float32, what=f"dense_weight, group {group_size}")


def test_w4a16_linear_buffers_state_dict_and_bias():
    linear = torch.nn.Linear(64, 16, bias=True)
    layer = int4.W4A16Linear.from_linear(linear)
    sd = layer.state_dict()
    assert list(sd) == ["bias", "weight_packed", "weight_scale", "weight_shape"]
    assert (sd["weight_packed"].dtype, tuple(sd["weight_packed"].shape)) == (torch.int32, (16, 8))
    assert (sd["weight_scale"].dtype, tuple(sd["weight_scale"].shape)) == (torch.bfloat16, (16, 2))
    assert sd["weight_shape"].dtype == torch.int32 and sd["weight_shape"].tolist() == [16, 64]
    x = torch.randn(3, 64)
    expected = x.double() @ layer.dense_weight().double().T + linear.bias.double()
    assert_close(layer(x), expected, torch.float32, what="W4A16Linear with bias")
    # a fresh module loads the same state (int64 weight_shape from other writers accepted)
    other = int4.W4A16Linear(64, 16, bias=True)
    sd["weight_shape"] = sd["weight_shape"].long()
    other.load_state_dict(sd)
    assert torch.equal(other(x), layer(x)) and other.weight_shape.dtype == torch.int32
    meta = int4.W4A16Linear(7168, 2048, device="meta")
    assert meta.weight_packed.shape == (2048, 896) and meta.weight_scale.shape == (2048, 224)


def test_w4a16_linear_bad_shapes_are_clear_errors():
    with pytest.raises(int4.Int4Error, match="in_features 12 is not divisible by 8"):
        int4.W4A16Linear(12, 4)
    with pytest.raises(int4.Int4Error, match="in_features 40 is not divisible by the group size 32"):
        int4.W4A16Linear(40, 4)
    layer = int4.W4A16Linear(64, 4)
    with pytest.raises(int4.Int4Error, match="input has 32 features, expected 64"):
        layer(torch.randn(2, 32))
    sd = layer.state_dict()
    with pytest.raises(int4.Int4Error, match=r"weight_shape: holds \[4, 96\], but this module is \[4, 64\]"):
        layer.load_state_dict({**sd, "weight_shape": torch.tensor([4, 96], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="weight_scale"):  # nn.Module's own shape check names the buffer
        layer.load_state_dict({**sd, "weight_scale": torch.ones(4, 3, dtype=torch.bfloat16)})


def test_dequantize_and_pack_bad_inputs_are_clear_errors():
    packed, scale = int4.quantize(torch.randn(4, 64))
    with pytest.raises(int4.Int4Error, match=r"weight_scale width 3 != in_features/32 = 64/32 = 2"):
        int4.dequantize(packed, torch.ones(4, 3, dtype=torch.bfloat16), (4, 64))
    with pytest.raises(int4.Int4Error, match=r"weight_packed width 7 != in_features/8 = 64/8 = 8"):
        int4.dequantize(packed[:, :7], scale, (4, 64))
    with pytest.raises(int4.Int4Error, match="weight_packed must be int32"):
        int4.dequantize(packed.long(), scale, (4, 64))
    with pytest.raises(int4.Int4Error, match=r"packed has shape \(4, 8\), expected \(4, 12\)"):
        int4.unpack(packed, (4, 96))
    with pytest.raises(int4.Int4Error, match=r"values must lie in \[-8, 7\], found \[-9, 0\]"):
        int4.pack(torch.tensor([[-9, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int8))
    with pytest.raises(int4.Int4Error, match="pack: q must be int8"):
        int4.pack(torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(int4.Int4Error, match="in_features 48 is not divisible by the group size 32"):
        int4.quantize(torch.randn(2, 48))
    with pytest.raises(int4.Int4Error, match="must have shape"):
        int4.read_weight_shape(torch.tensor([1, 2, 3]))
    with pytest.raises(int4.Int4Error, match="must be int32 or int64"):
        int4.read_weight_shape(torch.tensor([1.0, 2.0]))


def test_packed_bytes_per_kimi_expert():
    # sources §7: 44,040,192 weights per expert × (0.5 B + 2/32 B) = 24.77 MB, vs 88.08 MB in bf16.
    d, w = 7168, 2048
    expert = 2 * int4.packed_bytes(w, d) + int4.packed_bytes(d, w)
    assert round(expert / 1e6, 2) == 24.77
    assert round(3 * d * w * 2 / 1e6, 2) == 88.08


# ---- chapter 07 solutions -----------------------------------------------------------------------------


def _solutions():
    return load_solutions("07_int4")


def test_chapter_07_solutions():
    sol = _solutions()
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(-8, 8, size=8).tolist()
        assert sol.pack_word(values) == int4.pack(torch.tensor([values], dtype=torch.int8)).item()
        assert sol.unpack_word(sol.pack_word(values)) == values
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    w[:, ::97] *= 8  # a few outlier columns, as real weights have
    errors = sol.error_by_group_size(w, [8, 32, 128, 1024])
    assert list(errors) == [8, 32, 128, 1024]
    assert all(a < b for a, b in zip(list(errors.values()), list(errors.values())[1:])), errors
    assert sol.expert_bytes(7168, 2048, 32) == 2 * int4.packed_bytes(2048, 7168) + int4.packed_bytes(7168, 2048)
    assert sol.expert_bytes(7168, 2048, 32) < sol.expert_bytes(7168, 2048, 8)
