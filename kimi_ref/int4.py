"""Native INT4 experts: compressed-tensors "pack-quantized", symmetric, group 32, bf16 scales.

Kimi K2.x ships every routed expert's three Linears (gate_proj, up_proj, down_proj) in 4 bits. One
Linear with ``y = x @ W.T`` (``W`` [out, in], the usual nn.Linear orientation) is stored as

    weight_packed  int32 [out, in/8]    eight 4-bit values per word
    weight_scale   bf16  [out, in/32]   one scale per group of 32 input columns
    weight_shape   int32 [2]            (out, in), the dense shape

and means

    W[o, i] = q[o, i] · scale[o, i // 32]          q ∈ {-8, …, 7}

**Packing (excess-8, lowest column in the lowest nibble).** The nibble stored is ``u = q + 8`` (offset
binary, *not* two's complement), and column ``i`` of a row goes to word ``i // 8``, bits
``4·(i % 8) … 4·(i % 8) + 3``:

    word[o, j] = Σ_k (q[o, 8j + k] + 8) << 4k        k = 0..7

Words are signed int32, so a word whose top nibble is ≥ 8 is negative; unpacking shifts
arithmetically and masks with ``& 0xF``, which gives the same nibble either way.

**Quantizing (what compressed-tensors' minmax observer + symmetric int4 does).**

    scale[o, g] = bf16( max_{i in g} |W[o, i]| / 7.5 )       7.5 = (q_max - q_min) / 2 = 15 / 2
    q[o, i]     = clamp( round_half_even( W[o, i] / scale ), -8, 7 )

The divisor is 7.5, not 7: the largest positive weight lands on 7.5, rounds (half to even) to 8 and is
clipped to 7, while the most negative lands exactly on -8. A group whose weights are all zero gets
the scale ``finfo(bf16).eps`` (compressed-tensors avoids a zero scale). The division ``W / scale`` is
done in ``W``'s own dtype, as compressed-tensors does, so a bf16 weight rounds its quotient to bf16
before rounding to an integer.

Per expert (7168 × 2048 × 3 weights) that is 24.77 MB instead of 88.08 MB in bf16.

The numpy twin is ``kimi_ref/oracle/int4.py``; the Triton kernel is ``kimi_ref.kernels.w4a16_matmul``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Int4Error",
    "NUM_BITS",
    "PACK_FACTOR",
    "GROUP_SIZE",
    "pack",
    "unpack",
    "quantize",
    "quantize_groups",
    "dequantize",
    "weight_shape",
    "read_weight_shape",
    "check_packed",
    "packed_bytes",
    "W4A16Linear",
]

NUM_BITS = 4
PACK_FACTOR = 32 // NUM_BITS  # 8 values per int32 word
GROUP_SIZE = 32  # Kimi's group size; every function still takes it as an argument
Q_MIN, Q_MAX = -(1 << (NUM_BITS - 1)), (1 << (NUM_BITS - 1)) - 1  # -8, 7
# The word whose eight nibbles all hold 8, i.e. q = 0 (0x88888888 as a signed int32).
ZERO_WORD = int.from_bytes(bytes([0x88] * 4), "little", signed=True)
OFFSET = 1 << (NUM_BITS - 1)  # excess-8: the stored nibble is q + 8

_SHIFTS = torch.arange(PACK_FACTOR, dtype=torch.int32) * NUM_BITS  # 0, 4, ..., 28


class Int4Error(ValueError):
    """Packed INT4 tensors whose shapes, dtypes or values do not fit together."""


def _shape2(shape: Sequence[int] | torch.Tensor, what: str) -> tuple[int, int]:
    values = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
        raise Int4Error(f"{what}: a dense shape must be two positive integers (out, in), found {values!r}")
    return values[0], values[1]


def _check_in_features(in_features: int, group_size: int, what: str) -> None:
    if group_size <= 0 or group_size % PACK_FACTOR:
        raise Int4Error(f"{what}: group_size must be a positive multiple of {PACK_FACTOR}, found {group_size}")
    if in_features % PACK_FACTOR:
        raise Int4Error(f"{what}: in_features {in_features} is not divisible by {PACK_FACTOR} (values per int32 word)")
    if in_features % group_size:
        raise Int4Error(f"{what}: in_features {in_features} is not divisible by the group size {group_size}")


# ---- packing ------------------------------------------------------------------------------------------


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 ``q`` [out, in] with values in [-8, 7] → int32 [out, in/8] (excess-8, lowest column lowest nibble)."""
    if q.dtype != torch.int8:
        raise Int4Error(f"pack: q must be int8, found {q.dtype}")
    if q.dim() != 2:
        raise Int4Error(f"pack: q must be 2-D [out, in], found shape {tuple(q.shape)}")
    out_features, in_features = q.shape
    if in_features % PACK_FACTOR:
        raise Int4Error(f"pack: in_features {in_features} is not divisible by {PACK_FACTOR} (values per int32 word)")
    if q.numel() and (int(q.min()) < Q_MIN or int(q.max()) > Q_MAX):
        raise Int4Error(f"pack: values must lie in [{Q_MIN}, {Q_MAX}], found [{int(q.min())}, {int(q.max())}]")
    nibbles = (q.to(torch.int64) + OFFSET).view(out_features, in_features // PACK_FACTOR, PACK_FACTOR)
    # Build the word in int64 (bit 31 can be set: 15 << 28 overflows int32), then reinterpret the low
    # 32 bits as a signed int32, which is how the checkpoint stores it.
    words = (nibbles << _SHIFTS.to(q.device, torch.int64)).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(packed: torch.Tensor, shape: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """int32 ``packed`` [out, in/8] → int8 [out, in] with values in [-8, 7]."""
    out_features, in_features = _shape2(shape, "unpack")
    if packed.dtype != torch.int32:
        raise Int4Error(f"unpack: packed must be int32, found {packed.dtype}")
    if in_features % PACK_FACTOR:
        raise Int4Error(f"unpack: in_features {in_features} is not divisible by {PACK_FACTOR} (values per int32 word)")
    want = (out_features, in_features // PACK_FACTOR)
    if tuple(packed.shape) != want:
        raise Int4Error(
            f"unpack: packed has shape {tuple(packed.shape)}, expected {want} for a dense shape "
            f"({out_features}, {in_features}) (in/{PACK_FACTOR} words per row)"
        )
    # Arithmetic shift of a negative word drags sign bits in from the top; & 0xF keeps only our nibble.
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles - OFFSET).to(torch.int8).reshape(out_features, in_features)


# ---- quantizing ---------------------------------------------------------------------------------------


def quantize_groups(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``w`` [out, in] → (q int8 [out, in] in [-8, 7], scale bf16 [out, in/group_size]), unpacked.

    Exactly compressed-tensors' minmax observer, ``calculate_qparams`` (symmetric, ``scale_dtype``
    bf16) and ``quantize`` for a weight of ``w``'s dtype.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise Int4Error(f"quantize: w must be a 2-D float tensor [out, in], found {w.dtype} {tuple(w.shape)}")
    out_features, in_features = w.shape
    _check_in_features(in_features, group_size, "quantize")
    groups = w.reshape(out_features, in_features // group_size, group_size)
    # The observer's min/max include 0, so max(|min|, |max|) is simply max |w| over the group.
    max_abs = groups.abs().amax(dim=-1)
    half_range = torch.tensor((Q_MAX - Q_MIN) / 2, dtype=w.dtype)  # 7.5, exact in every float dtype
    scale = (max_abs / half_range).to(torch.bfloat16)
    # A zero scale would divide by zero; compressed-tensors uses the scale dtype's eps instead.
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(torch.bfloat16).eps, dtype=torch.bfloat16), scale)
    # The quotient is formed in w's dtype (a bf16 weight rounds it to bf16 first), then rounded half to even.
    quotient = groups / scale.to(w.dtype).unsqueeze(-1)
    q = torch.round(quotient.clamp(Q_MIN, Q_MAX)).to(torch.int8)
    return q.view(out_features, in_features), scale


def quantize(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``w`` [out, in] → (packed int32 [out, in/8], scale bf16 [out, in/group_size])."""
    q, scale = quantize_groups(w, group_size)
    return pack(q), scale


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: Sequence[int] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
    group_size: int = GROUP_SIZE,
) -> torch.Tensor:
    """``W[o, i] = q[o, i] · scale[o, i // group_size]`` as ``dtype`` [out, in].

    The product of a 4-bit integer and a bf16 scale is exact in float32; a bf16/fp16 result is that
    exact product rounded once (the same bits compressed-tensors' bf16 ``dequantize`` gives).
    """
    out_features, in_features = _shape2(shape, "dequantize")
    check_packed(packed, scale, (out_features, in_features), group_size=group_size, what="dequantize")
    q = unpack(packed, (out_features, in_features)).to(torch.float32)
    groups = q.view(out_features, in_features // group_size, group_size) * scale.to(torch.float32).unsqueeze(-1)
    return groups.view(out_features, in_features).to(dtype)


# ---- weight_shape and checks --------------------------------------------------------------------------


def weight_shape(shape: Sequence[int]) -> torch.Tensor:
    """The ``weight_shape`` tensor a checkpoint stores for a dense ``shape`` (int32 [2], as in Kimi's files)."""
    return torch.tensor(_shape2(shape, "weight_shape"), dtype=torch.int32)


def read_weight_shape(t: torch.Tensor, what: str = "weight_shape") -> tuple[int, int]:
    """(out, in) from a stored ``weight_shape`` tensor; int32 (Kimi) or int64 (some other writers)."""
    if t.dtype not in (torch.int32, torch.int64):
        raise Int4Error(f"{what}: must be int32 or int64, found {t.dtype}")
    if tuple(t.shape) != (2,):
        raise Int4Error(f"{what}: must have shape (2,), found {tuple(t.shape)}")
    return _shape2([int(v) for v in t.tolist()], what)


def check_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: Sequence[int] | torch.Tensor,
    group_size: int = GROUP_SIZE,
    what: str = "INT4 weight",
) -> None:
    """Raise :class:`Int4Error` unless packed/scale fit the dense ``shape`` (out, in) and group size."""
    out_features, in_features = _shape2(shape, what)
    _check_in_features(in_features, group_size, what)
    problems = []
    if packed.dtype != torch.int32:
        problems.append(f"weight_packed must be int32, found {packed.dtype}")
    if packed.dim() != 2 or packed.shape[0] != out_features:
        problems.append(f"weight_packed has shape {tuple(packed.shape)}, expected ({out_features}, {in_features // PACK_FACTOR})")
    elif packed.shape[1] != in_features // PACK_FACTOR:
        problems.append(
            f"weight_packed width {packed.shape[1]} != in_features/{PACK_FACTOR} = {in_features}/{PACK_FACTOR} "
            f"= {in_features // PACK_FACTOR}"
        )
    if scale.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        problems.append(f"weight_scale must be a float tensor (bf16 in Kimi's files), found {scale.dtype}")
    if scale.dim() != 2 or scale.shape[0] != out_features:
        problems.append(f"weight_scale has shape {tuple(scale.shape)}, expected ({out_features}, {in_features // group_size})")
    elif scale.shape[1] != in_features // group_size:
        problems.append(
            f"weight_scale width {scale.shape[1]} != in_features/{group_size} = {in_features}/{group_size} "
            f"= {in_features // group_size}"
        )
    if problems:
        raise Int4Error(f"{what}: " + "; ".join(problems))


def packed_bytes(out_features: int, in_features: int, group_size: int = GROUP_SIZE, shape_bytes: int = 8) -> int:
    """Bytes one packed Linear occupies: in/8 int32 words + in/group bf16 scales per row + weight_shape."""
    return out_features * (in_features // PACK_FACTOR) * 4 + out_features * (in_features // group_size) * 2 + shape_bytes


# ---- the module ---------------------------------------------------------------------------------------


class W4A16Linear(nn.Module):
    """A Linear with 4-bit weights and 16/32-bit activations: ``y = x @ dequantize(W).T (+ bias)``.

    x [..., in] → y [..., out], computed in ``x.dtype``. The weights stay packed (0.53 bytes each
    instead of 2); each call dequantizes them to ``x.dtype`` for the duration of the matmul only, so a
    model built of these never holds all experts dense.

    Buffers (the checkpoint's names): ``weight_packed`` int32 [out, in/8], ``weight_scale`` bf16
    [out, in/group_size], ``weight_shape`` int32 [2] = (out, in). ``bias`` [out] float32 if asked for
    (Kimi's quantized Linears have none).

    ``kernel``: None (dequantize, then ``F.linear``; the reference) or the W4A16 GEMM that
    :mod:`kimi_ref.backend` hands it (``kernels.w4a16_matmul``, dequantizing inside the GEMM).
    """

    def __init__(
        self, in_features: int, out_features: int, group_size: int = GROUP_SIZE, bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _shape2((out_features, in_features), "W4A16Linear")
        _check_in_features(in_features, group_size, "W4A16Linear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel, self.backend = None, "torch"
        # Every nibble 8 (excess-8 for q = 0): a fresh module is an all-zero weight, not an all -8 one.
        self.register_buffer("weight_packed", torch.full((out_features, in_features // PACK_FACTOR), ZERO_WORD,
                                                         dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, dtype=torch.bfloat16, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    # ---- building from dense weights (tests, make_tiny, chapters) ----
    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE, bias: torch.Tensor | None = None) -> "W4A16Linear":
        """Quantize a dense ``weight`` [out, in] (and keep ``bias`` [out] as float32 if given)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, bias=bias is not None, device=weight.device)
        packed, scale = quantize(weight.detach(), group_size)
        layer.weight_packed.copy_(packed)
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE) -> "W4A16Linear":
        """Quantize an ``nn.Linear`` (its weight's dtype decides the rounding, as in compressed-tensors)."""
        return cls.from_dense(linear.weight, group_size, linear.bias)

    # ---- use ----
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [out, in] (a temporary: the module keeps only the packed form)."""
        return dequantize(self.weight_packed, self.weight_scale, (self.out_features, self.in_features), dtype, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise Int4Error(f"W4A16Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel is not None:
            y = self.kernel(x.reshape(-1, self.in_features), self.weight_packed, self.weight_scale)  # fp32 [M, out]
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if bias is None else y + bias
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint's weight_shape must describe this module (int64 from some writers is fine:
        # copy_ casts it into our int32 buffer). Shapes of packed/scale are checked by nn.Module.
        key = prefix + "weight_shape"
        if key in state_dict and state_dict[key].device.type != "meta":
            found = read_weight_shape(state_dict[key], key)
            if found != (self.out_features, self.in_features):
                raise Int4Error(f"{key}: holds {list(found)}, but this module is [{self.out_features}, {self.in_features}]")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
