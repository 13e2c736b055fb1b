"""W4A16 GEMM: activations in 16/32 bits times INT4 weights dequantized *inside* the kernel.

    x       [M, in]          activations (bf16, fp16 or fp32)
    packed  int32 [out, in/8]  eight excess-8 nibbles per word, column 8j+i in bits 4i..4i+3
    scale   bf16  [out, in/32] one scale per group of 32 input columns
    ->  y   float32 [M, out]   y[m, o] = Σ_i x[m, i] · (nibble(o, i) - 8) · scale[o, i // 32]

This is every routed expert's gate/up/down projection in Kimi K2.x (2048×7168 and 7168×2048). In
decode M is tiny, so the kernel is a pure weight stream: its speed is the bytes of ``packed`` and
``scale`` (0.5 + 2/32 bytes per weight) over memory bandwidth. Dequantizing in registers means the
dense weight never touches memory, which is the whole point (torch's path writes and re-reads it).

Tiles. One program owns a [BLOCK_M, BLOCK_N] tile of y and walks its share of the input dimension
in BLOCK_K steps. Per step it loads the words [BLOCK_N, BLOCK_K/8] (contiguous along k, so loads
coalesce), expands each word to 8 nibbles, multiplies by the group scales and
    * M ≥ 2: feeds the [BLOCK_K, BLOCK_N] tile to ``tl.dot`` (tensor cores on a GPU; rows padded to 16);
    * M = 1 (decode): broadcasts and sums in fp32 FMAs (a GEMV: no tensor-core layout to shuffle into).
Split-K: with few output tiles (M = 1 gives out/BLOCK_N of them) the GPU would idle, so the input
dimension is cut into ``split_k`` slices whose partial sums land in [split_k, M, out] and are summed.

The layout facts come from ``kimi_ref/int4.py``; the float64 twin is ``kimi_ref/oracle/int4.py``.
"""

from __future__ import annotations

import torch

from kimi_ref import int4
from kimi_ref.kernels._runtime import (DOT_IEEE, dot_acc, dot_mode, interpreting, jit, launch_config, tl, triton,
                                       use_triton)

__all__ = ["w4a16_matmul", "w4a16_matmul_torch", "w4a16_matmul_triton", "dequant_tile", "check_w4a16", "uses_dot"]


@jit
def dequant_tile(packed_ptr, scale_ptr, offs_n, k0, N, K, stride_pn, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """W[n, k0:k0+BLOCK_K] for the rows ``offs_n``: a [BLOCK_N, BLOCK_K] fp32 tile (0 outside the matrix)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    offs_w = k0 // 8 + tl.arange(0, WORDS)
    words = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] < K // 8), other=0)
    shifts = tl.arange(0, 8) * 4
    # Arithmetic shift drags the sign bit in from the top of a negative word; & 0xF keeps one nibble.
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, WORDS, 8]
    q = (nibbles - 8).to(tl.float32)  # excess-8: nibble 8 means 0
    offs_g = k0 // GROUP + tl.arange(0, GROUPS)
    s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                mask=(offs_n[:, None] < N) & (offs_g[None, :] < K // GROUP), other=0.0).to(tl.float32)
    w = tl.reshape(q, (BLOCK_N, GROUPS, GROUP)) * s[:, :, None]  # word j nibble i is column 8j + i
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@jit
def _w4a16_kernel(x_ptr, packed_ptr, scale_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                  stride_xm, stride_pn, stride_sn, stride_os, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_MODE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # load, then fp32 at once: bf16 arithmetic is wrong in the interpreter
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w = dequant_tile(packed_ptr, scale_ptr, offs_n, k0, N, K, stride_pn, stride_sn, BLOCK_N, BLOCK_K, GROUP)
        if USE_DOT:
            acc = dot_acc(x, tl.trans(w), acc, DOT_MODE)
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def check_w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, what: str = "w4a16_matmul") -> tuple[int, int, int]:
    """(M, out, in) after checking that x [M, in], packed int32 [out, in/8] and scale [out, in/32] fit."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{what}: x must be a 2-D float tensor [M, in], found {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if packed.dim() != 2:
        raise ValueError(f"{what}: packed must be int32 [out, in/8], found shape {tuple(packed.shape)}")
    n = packed.shape[0]
    int4.check_packed(packed, scale, (n, k), group_size=int4.GROUP_SIZE, what=what)
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"{what}: x, packed and scale must be on one device, found {x.device}, {packed.device}, {scale.device}")
    return m, n, k


def w4a16_matmul_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fallback and reference: dequantize the whole weight to fp32, then one matmul."""
    m, n, k = check_w4a16(x, packed, scale)
    return x.float() @ int4.dequantize(packed, scale, (n, k), torch.float32).T


def uses_dot(m: int) -> bool:
    """Whether M rows go through ``tl.dot`` (bf16 inputs on a GPU) or fp32 FMAs (a single row: decode)."""
    return m >= 2


def _blocks(m: int, n: int, k: int, device: torch.device) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, use_dot) for this problem; one config in the interpreter.

    On an H200 (benchmarks/results/h200.md, launch sweeps): one row reads fastest as 8 output rows × 512
    inputs a step (though every launch of one 8 MB expert matrix takes 15-25 µs: latency, not bytes);
    2-15 rows padded to a 16-row dot beat an FMA tile of 8 rows 6× (0.019 vs 0.125 ms).
    """
    use_dot = uses_dot(m)
    if interpreting():
        return (16 if use_dot else 1), 32, 32, use_dot
    if use_dot:
        return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64, True
    return 1, 8, 512, False


def _choose_split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU: about 4 per streaming multiprocessor."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_blocks, -(-4 * sms // tiles)))


def w4a16_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, *, split_k: int | None = None,
                        config: dict | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or the interpreter on CPU tensors); ``split_k`` slices of the input dim.

    ``config`` overrides the launch the wrapper would choose (keys BLOCK_N, BLOCK_K, num_warps, num_stages):
    for tuning sweeps (``benchmarks/device_check.py``) and tests of GPU tile shapes.
    """
    m, n, k = check_w4a16(x, packed, scale)
    if m == 0:
        return torch.zeros(0, n, dtype=torch.float32, device=x.device)
    x, packed, scale = x.contiguous(), packed.contiguous(), scale.contiguous()
    block_m, block_n, block_k, use_dot = _blocks(m, n, k, x.device)
    launch = launch_config(config, "w4a16_matmul", BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_m >= 32 else 4)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    k_blocks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = _choose_split_k(tiles, k_blocks, x.device) if split_k is None else int(split_k)
    if split_k < 1:
        raise ValueError(f"w4a16_matmul: split_k must be ≥ 1, found {split_k}")
    k_per_split = triton.cdiv(k_blocks, min(split_k, k_blocks)) * block_k  # whole BLOCK_Ks per slice
    split_k = triton.cdiv(k, k_per_split)  # no empty slices
    out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _w4a16_kernel[grid](
        x, packed, scale, out, m, n, k, k_per_split,
        x.stride(0), packed.stride(0), scale.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=int4.GROUP_SIZE,
        USE_DOT=use_dot, DOT_MODE=dot_mode(x.dtype) if use_dot else DOT_IEEE,
        **launch,  # num_warps 8 from 32 rows: a 64-row tile on 4 warps needs 223 registers a thread
    )
    return out[0] if split_k == 1 else out.sum(0)


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, *, split_k: int | None = None) -> torch.Tensor:
    """``x @ dequantize(packed, scale).T`` in fp32: the Triton kernel where it can run, else torch."""
    if use_triton(x, packed, scale):
        return w4a16_matmul_triton(x, packed, scale, split_k=split_k)
    return w4a16_matmul_torch(x, packed, scale)
