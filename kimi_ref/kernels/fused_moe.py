"""Fused MoE over INT4 experts: sort tokens by expert, grouped W4A16 GEMMs, weighted combine.

    x            [N, d]        tokens (N tokens, d = hidden_size = 7168 in Kimi)
    topk_weights [N, k] fp32   router weights (already × routed_scaling_factor); k = 8 in Kimi
    topk_ids     [N, k] int64  GLOBAL expert ids; this rank owns [expert_offset, expert_offset + E)
    w_gate/up    packed int32 [E, I, d/8], scale bf16 [E, I, d/32]     I = moe_intermediate_size = 2048
    w_down       packed int32 [E, d, I/8], scale bf16 [E, d, I/32]

    out[n] = Σ_{j: topk_ids[n,j] is ours} topk_weights[n,j] · down_e( silu(gate_e x_n) ⊙ up_e x_n ),  e = topk_ids[n,j]

(shared experts and the all-reduce across ranks stay with ``kimi_ref/experts.py``). Steps:

1. **Sort.** The N·k (token, slot) pairs are ordered by local expert (pairs for other ranks' experts go
   last and are dropped). Each expert's run is cut into blocks of BLOCK_M rows, and a block schedule
   (expert, first row, end row) is built on the device with no host sync. The grid is sized for the
   worst case, Σ⌈count_e/BLOCK_M⌉ ≤ ⌈N·k/BLOCK_M⌉ + min(E, N·k), and spare programs exit at once, so an
   expert with no tokens has no block and costs nothing — its weights are never read.
2. **gate/up.** Each program gathers its block's token rows and multiplies them by expert e's gate and
   up weights, dequantized tile by tile in registers (``w4a16.dequant_tile``; ``tl.dot`` for blocks of ≥ 16
   rows, fp32 FMAs for blocks of one row), then writes
   silu(g)·u [rows, I] — the SwiGLU activation is fused, g and u never leave the chip.
3. **down.** The same schedule multiplies those rows by expert e's down weight and scales each row by
   its router weight, writing it to the pair's own slot [N·k, d].
4. **combine.** out = Σ over the k slots of each token (a fixed order: deterministic, no atomics).

The float64 twin is ``kimi_ref/oracle/experts.py`` (swiglu/moe); the torch module ``kimi_ref/experts.py``.
"""

from __future__ import annotations

import torch

from kimi_ref import int4
from kimi_ref.kernels._runtime import dot_acc, dot_mode, interpreting, jit, launch_config, tl, triton, use_triton
from kimi_ref.kernels.w4a16 import dequant_tile

__all__ = ["fused_moe", "fused_moe_torch", "fused_moe_triton", "block_schedule", "block_rows"]


@jit
def _gate_up_kernel(x_ptr, order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                    gp_ptr, gs_ptr, up_ptr, us_ptr, h_ptr,
                    D, I, TOPK, stride_x, stride_pe, stride_pn, stride_se, stride_sn, stride_h,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                    DOT_MODE: tl.constexpr, USE_DOT: tl.constexpr):
    blk = tl.program_id(0)
    expert = tl.load(blk_expert_ptr + blk).to(tl.int64)
    if expert >= 0:  # spare blocks (no expert) do nothing
        start = tl.load(blk_start_ptr + blk)
        end = tl.load(blk_end_ptr + blk)
        rows = start + tl.arange(0, BLOCK_M)  # positions in the expert-sorted pair list
        rmask = rows < end
        pair = tl.load(order_ptr + rows, mask=rmask, other=0)
        token = (pair // TOPK).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token[:, None] * stride_x + offs_k[None, :],
                        mask=rmask[:, None] & (offs_k[None, :] < D), other=0.0).to(tl.float32)
            wg = dequant_tile(gp_ptr + expert * stride_pe, gs_ptr + expert * stride_se, offs_n, k0, I, D,
                              stride_pn, stride_sn, BLOCK_N, BLOCK_K, GROUP)
            wu = dequant_tile(up_ptr + expert * stride_pe, us_ptr + expert * stride_se, offs_n, k0, I, D,
                              stride_pn, stride_sn, BLOCK_N, BLOCK_K, GROUP)
            if USE_DOT:
                acc_g = dot_acc(x, tl.trans(wg), acc_g, DOT_MODE)
                acc_u = dot_acc(x, tl.trans(wu), acc_u, DOT_MODE)
            else:  # one row a block (decode): a GEMV in fp32 FMAs, no tensor-core layout to shuffle into
                acc_g += tl.sum(x[:, None, :] * wg[None, :, :], axis=2)
                acc_u += tl.sum(x[:, None, :] * wu[None, :, :], axis=2)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(g) · u, in fp32
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_n[None, :], h,
                 mask=rmask[:, None] & (offs_n[None, :] < I))


@jit
def _down_kernel(h_ptr, order_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr, w_ptr,
                 dp_ptr, ds_ptr, y_ptr,
                 D, I, stride_h, stride_pe, stride_pn, stride_se, stride_sn, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 DOT_MODE: tl.constexpr, USE_DOT: tl.constexpr):
    blk = tl.program_id(0)
    expert = tl.load(blk_expert_ptr + blk).to(tl.int64)
    if expert >= 0:
        start = tl.load(blk_start_ptr + blk)
        end = tl.load(blk_end_ptr + blk)
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < end
        pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_k[None, :],
                        mask=rmask[:, None] & (offs_k[None, :] < I), other=0.0)
            w = dequant_tile(dp_ptr + expert * stride_pe, ds_ptr + expert * stride_se, offs_n, k0, D, I,
                             stride_pn, stride_sn, BLOCK_N, BLOCK_K, GROUP)
            if USE_DOT:
                acc = dot_acc(a, tl.trans(w), acc, DOT_MODE)
            else:
                acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
        weight = tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pair[:, None] * stride_y + offs_n[None, :], acc * weight[:, None],
                 mask=rmask[:, None] & (offs_n[None, :] < D))


def _check(x, topk_weights, topk_ids, gp, gs, up, us, dp, ds) -> tuple[int, int, int, int, int]:
    """(N, d, k, E, I) after checking every shape against the contract."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"fused_moe: x must be a float tensor [N, d], found {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_weights/topk_ids must both be [N={n}, k], found "
                         f"{tuple(topk_weights.shape)}/{tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_moe: topk_ids must be int64 (or int32), found {topk_ids.dtype}")
    if gp.dim() != 3:
        raise ValueError(f"fused_moe: w_gate_packed must be int32 [E, I, d/8], found shape {tuple(gp.shape)}")
    e, i = gp.shape[0], gp.shape[1]
    if e == 0:
        raise ValueError("fused_moe: no experts (w_gate_packed has E = 0); a rank without experts should not call it")
    for name, p, s, shape in (("w_gate", gp, gs, (i, d)), ("w_up", up, us, (i, d)), ("w_down", dp, ds, (d, i))):
        if p.dim() != 3 or s.dim() != 3 or p.shape[0] != e or s.shape[0] != e:
            raise ValueError(f"fused_moe: {name}_packed/{name}_scale must be [E={e}, ...], found "
                             f"{tuple(p.shape)}/{tuple(s.shape)}")
        int4.check_packed(p[0], s[0], shape, what=f"fused_moe: {name} (per expert)")
    return n, d, topk_ids.shape[1], e, i


def fused_moe_torch(x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale,
                    w_down_packed, w_down_scale, expert_offset: int = 0) -> torch.Tensor:
    """The fallback: loop over the experts that have tokens, dequantize each, SwiGLU, weighted sum."""
    n, d, k, e, i = _check(x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale,
                           w_down_packed, w_down_scale)
    out = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    local = topk_ids - expert_offset
    for expert in torch.unique(local[(local >= 0) & (local < e)]).tolist():
        tokens, slot = torch.nonzero(local == expert, as_tuple=True)
        xe = x[tokens].float()
        gate = xe @ int4.dequantize(w_gate_packed[expert], w_gate_scale[expert], (i, d)).T
        up = xe @ int4.dequantize(w_up_packed[expert], w_up_scale[expert], (i, d)).T
        y = (torch.nn.functional.silu(gate) * up) @ int4.dequantize(w_down_packed[expert], w_down_scale[expert], (d, i)).T
        out.index_add_(0, tokens, topk_weights[tokens, slot].float()[:, None] * y)
    return out


def block_schedule(topk_ids: torch.Tensor, expert_offset: int, num_experts: int, block_m: int):
    """Sort the (token, slot) pairs by local expert and cut each expert's run into blocks of ``block_m``.

    Returns ``order`` [P] (pair indices n·k + j, sorted by expert; foreign pairs last) and, per block of a
    grid sized for the worst case, ``expert`` (-1: spare block), ``start`` and ``end`` rows into ``order``.
    Everything stays on the device: no host synchronisation, so a decode step can be captured in a CUDA graph.
    """
    ids = topk_ids.reshape(-1).long() - expert_offset
    pairs = ids.numel()
    key = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
    order = torch.argsort(key, stable=True)
    # A scatter-add, not torch.bincount: bincount on CUDA reads the largest key back to the host to size
    # its output, a synchronisation in every MoE layer of every decode step (and no CUDA-graph capture).
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    first_row = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks, 0)
    max_blocks = -(-pairs // block_m) + min(num_experts, pairs) if pairs else 1  # ⌈P/BLOCK_M⌉ + min(E, P)
    b = torch.arange(max_blocks, device=ids.device)
    expert = torch.searchsorted(blocks_end, b, right=True)  # the expert whose blocks include b (E: none)
    e = expert.clamp(max=num_experts - 1)
    start = first_row[e] + (b - (blocks_end[e] - blocks[e])) * block_m
    end = first_row[e] + counts[e]
    expert = torch.where(expert < num_experts, expert, torch.full_like(expert, -1))
    return order.to(torch.int32), expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def block_rows(n: int, k: int, e: int) -> int:
    """BLOCK_M for N tokens with top-k over E local experts: 1 (fp32 FMAs), else 16 or 64 (``tl.dot``)."""
    if n == 1:  # one token (decode) gives each expert one row: GEMV blocks, no 16-row dot padding
        return 1
    return 16 if interpreting() or n * k <= 64 * e else 64


def fused_moe_triton(x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale,
                     w_down_packed, w_down_scale, expert_offset: int = 0, *, block_m: int | None = None,
                     up_config: dict | None = None, down_config: dict | None = None) -> torch.Tensor:
    """The Triton path: block schedule, gate/up kernel (SwiGLU fused), down kernel, combine.

    ``up_config``/``down_config`` override each kernel's launch (keys BLOCK_N, BLOCK_K, num_warps, num_stages).
    """
    n, d, k, e, i = _check(x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale,
                           w_down_packed, w_down_scale)
    if n == 0:
        return torch.zeros(0, d, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    gp, gs, up_p, us = (t.contiguous() for t in (w_gate_packed, w_gate_scale, w_up_packed, w_up_scale))
    dp, ds = w_down_packed.contiguous(), w_down_scale.contiguous()
    if block_m is None:
        block_m = block_rows(n, k, e)
    if block_m != 1 and block_m < 16:
        raise ValueError(f"fused_moe: block_m must be 1 (fp32 FMAs) or ≥ 16 (tl.dot), found {block_m}")
    warps = 8 if block_m >= 32 else 4  # 64 rows on 4 warps would use all 255 registers of a thread
    if interpreting():
        up = down = dict(BLOCK_N=32, BLOCK_K=32, num_warps=warps)
    elif block_m == 1:  # one row a block: GEMV tiles, deep along k (fp32 FMAs, [1, BLOCK_N, BLOCK_K] in registers;
        # on an H200 0.33 ms for one token's 8 experts against 0.38 for 16-row dot blocks: launch sweep)
        up, down = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4), dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)
    else:  # the H200 launch sweep (benchmarks/results/h200.md): decode wants narrower, deeper gate/up tiles
        few = n * k <= 64
        up = dict(BLOCK_N=32 if few else 64, BLOCK_K=128 if few else 64, num_warps=warps)
        down = dict(BLOCK_N=128 if block_m == 16 else 64, BLOCK_K=64, num_warps=warps)
    up = launch_config(up_config, "fused_moe (gate/up)", **up)
    down = launch_config(down_config, "fused_moe (down)", **down)
    order, blk_expert, blk_start, blk_end = block_schedule(topk_ids, expert_offset, e, block_m)
    weights = topk_weights.float().contiguous().view(-1)
    h = torch.empty(n * k, i, dtype=torch.float32, device=x.device)
    mode = dot_mode(x.dtype)
    _gate_up_kernel[(blk_expert.numel(), triton.cdiv(i, up["BLOCK_N"]))](
        x, order, blk_expert, blk_start, blk_end, gp, gs, up_p, us, h,
        d, i, k, x.stride(0), gp.stride(0), gp.stride(1), gs.stride(0), gs.stride(1), h.stride(0),
        BLOCK_M=block_m, GROUP=int4.GROUP_SIZE, DOT_MODE=mode, USE_DOT=block_m > 1, **up,
    )
    y = torch.zeros(n * k, d, dtype=torch.float32, device=x.device)  # foreign pairs stay 0
    _down_kernel[(blk_expert.numel(), triton.cdiv(d, down["BLOCK_N"]))](
        h, order, blk_expert, blk_start, blk_end, weights, dp, ds, y,
        d, i, h.stride(0), dp.stride(0), dp.stride(1), ds.stride(0), ds.stride(1), y.stride(0),
        BLOCK_M=block_m, GROUP=int4.GROUP_SIZE, DOT_MODE=mode, USE_DOT=block_m > 1, **down,
    )
    return y.view(n, k, d).sum(1)


def fused_moe(x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale,
              w_down_packed, w_down_scale, expert_offset: int = 0) -> torch.Tensor:
    """Σ_k topk_weights · expert(x) over this rank's experts, in fp32 [N, d] (see the module doc)."""
    args = (x, topk_weights, topk_ids, w_gate_packed, w_gate_scale, w_up_packed, w_up_scale, w_down_packed, w_down_scale)
    if use_triton(*args):
        return fused_moe_triton(*args, expert_offset)
    return fused_moe_torch(*args, expert_offset)
