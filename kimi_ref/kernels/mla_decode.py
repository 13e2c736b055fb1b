"""MLA decode attention over the latent cache (the absorbed form), split along the context.

    q_latent [B, H, c] fp32   the query moved into latent space: W_uk[h]ᵀ q_nope[h]
    q_rope   [B, H, r] fp32   the query's rope part, after RoPE
    latent   [B, S, c]        the cached, normalized KV latent (c = kv_lora_rank = 512 in Kimi)
    k_rope   [B, S, r]        the cached rope key after RoPE, shared by all heads (r = 64)
    length   int ≤ S          how many cache entries are valid (the new token's own included)

    score[b,h,s] = scale · (q_latent[b,h]·latent[b,s] + q_rope[b,h]·k_rope[b,s])      s < length
    out[b,h]     = Σ_s softmax_s(score[b,h,:])[s] · latent[b,s]                    -> [B, H, c] fp32

The caller multiplies ``out`` by W_uv and o_proj (``kimi_ref/mla.py``). Every head reads the *same*
576 numbers per token, so one program takes BLOCK_H heads at once and the cache is streamed once
per head block: scores are a [BLOCK_H, c]·[c, BLOCK_S] ``tl.dot``.

Split-K over the context ("flash decoding"): with B·H/BLOCK_H programs only, a long cache would leave
most of the GPU idle, so the valid context is cut into ``num_splits`` chunks. Each program runs an
online softmax over its chunk and writes its normalized partial output and log-sum-exp; the combine
step weights chunk i by exp(lse_i − max lse). Chunks are sized so that none is empty (so no -inf − -inf).
Cache entries at s ≥ length are never loaded: garbage (even NaN) there cannot leak in.

The float64 twin is ``kimi_ref/oracle/mla.py::scores_absorbed`` with ``softmax``.
"""

from __future__ import annotations

import torch

from kimi_ref.kernels._runtime import (dot_acc, dot_mode, interpreting, jit, launch_config, next_pow2, tl, triton,
                                       use_triton)
from kimi_ref.mla import absorbed_scores, mix_latents

__all__ = ["mla_decode", "mla_decode_torch", "mla_decode_triton"]


@jit
def _mla_decode_kernel(ql_ptr, qr_ptr, lat_ptr, kr_ptr, o_ptr, lse_ptr,
                       H, C, R, length, chunk, scale,
                       stride_qb, stride_qh, stride_rb, stride_rh, stride_lb, stride_ls, stride_kb, stride_ks,
                       stride_ob, stride_oh, stride_osplit, stride_lseb, stride_lseh,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                       DOT_MODE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    hmask = offs_h < H
    q_lat = tl.load(ql_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                    mask=hmask[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
    q_rope = tl.load(qr_ptr + b * stride_rb + offs_h[:, None] * stride_rh + offs_r[None, :],
                     mask=hmask[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
    if DOT_MODE == 2:  # bf16 tensor-core dots: round the query once, not once per step (and halve its registers)
        q_lat = q_lat.to(tl.bfloat16)
        q_rope = q_rope.to(tl.bfloat16)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max of the scores
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running Σ exp(score - m_i)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)  # running Σ exp(score - m_i) · latent
    s_start = split * chunk
    s_end = tl.minimum(s_start + chunk, length)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < s_end
        lat = tl.load(lat_ptr + b * stride_lb + offs_s[:, None] * stride_ls + offs_c[None, :],
                      mask=smask[:, None] & (offs_c[None, :] < C), other=0.0)  # [BLOCK_S, C]
        kr = tl.load(kr_ptr + b * stride_kb + offs_s[:, None] * stride_ks + offs_r[None, :],
                     mask=smask[:, None] & (offs_r[None, :] < R), other=0.0)  # [BLOCK_S, R]
        if DOT_MODE != 2:  # fp32 dots (and the interpreter, whose bf16 math is wrong): widen at once
            lat = lat.to(tl.float32)
            kr = kr.to(tl.float32)
        # (DOT_MODE 2 keeps the bf16 tile as loaded: a [64, 512] fp32 copy would not fit in registers)
        scores = dot_acc(q_lat, tl.trans(lat), tl.zeros((BLOCK_H, BLOCK_S), dtype=tl.float32), DOT_MODE)
        scores = dot_acc(q_rope, tl.trans(kr), scores, DOT_MODE) * scale
        scores = tl.where(smask[None, :], scores, float("-inf"))
        # every block starts below s_end, so each row has a finite score and m_new is finite
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot_acc(p, lat, acc * alpha[:, None], DOT_MODE)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + split * stride_osplit + offs_h[:, None] * stride_oh + offs_c[None, :], out,
             mask=hmask[:, None] & (offs_c[None, :] < C))
    tl.store(lse_ptr + b * stride_lseb + offs_h * stride_lseh + split, m_i + tl.log(l_i), mask=hmask)


def _check(q_latent, q_rope, latent, k_rope, length) -> tuple[int, int, int, int, int]:
    if q_latent.dim() != 3 or q_rope.dim() != 3 or latent.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(f"mla_decode: expected q_latent [B,H,c], q_rope [B,H,r], latent [B,S,c], k_rope [B,S,r]; found "
                         f"{tuple(q_latent.shape)}, {tuple(q_rope.shape)}, {tuple(latent.shape)}, {tuple(k_rope.shape)}")
    b, h, c = q_latent.shape
    r = q_rope.shape[-1]
    s = latent.shape[1]
    if q_rope.shape[:2] != (b, h) or latent.shape != (b, s, c) or k_rope.shape != (b, s, r):
        raise ValueError(f"mla_decode: shapes do not agree: q_latent {tuple(q_latent.shape)}, q_rope {tuple(q_rope.shape)}, "
                         f"latent {tuple(latent.shape)} (want [{b}, S, {c}]), k_rope {tuple(k_rope.shape)} (want [{b}, {s}, {r}])")
    if not 1 <= int(length) <= s:
        raise ValueError(f"mla_decode: length must be in 1..{s} (the cache's size), found {length}")
    return b, h, c, r, s


def mla_decode_torch(q_latent, q_rope, latent, k_rope, length: int, scale: float) -> torch.Tensor:
    """The fallback: ``kimi_ref.mla``'s absorbed attention for one query over the first ``length`` entries."""
    _check(q_latent, q_rope, latent, k_rope, length)
    lat, kr = latent[:, :length], k_rope[:, :length]
    scores = absorbed_scores(q_latent[:, None], q_rope[:, None], lat, kr)  # [B,h,1,S]
    return mix_latents(torch.softmax(scores * scale, dim=-1), lat)[:, 0]  # one query sees every entry: no mask


def _num_splits(b: int, head_blocks: int, length: int, block_s: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(length, block_s)))  # exercise the combine even on the CPU
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # one wave of programs: on an H200 64 splits (B=1, 64 heads) beat 128 at 4K and 32K (launch sweep)
    return max(1, min(triton.cdiv(length, block_s), triton.cdiv(sms, b * head_blocks)))


def mla_decode_triton(q_latent, q_rope, latent, k_rope, length: int, scale: float, *,
                      num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """The Triton kernel: partial attention per (batch, head block, context chunk), then the combine.

    ``config`` overrides the launch (keys BLOCK_H, BLOCK_S, num_warps, num_stages), for tuning sweeps.
    """
    b, h, c, r, s = _check(q_latent, q_rope, latent, k_rope, length)
    length = int(length)
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope)):
        if t.stride(-1) != 1:
            raise ValueError(f"mla_decode: {name} must be contiguous in its last axis")
    # tl.dot needs ≥ 16 rows. Each head block streams the whole cache once, so bigger blocks read less;
    # 32 heads × 32 keys × 512 is the largest tile that compiles for sm_90 without spilling on 8 warps; on
    # 4 warps it spills ~350 bytes a thread and still ran 1.5× faster on an H200 (launch sweep,
    # benchmarks/results/h200.md): fewer warps, more programs resident per SM, more loads in flight.
    if interpreting():
        block_h, block_s, warps = 16, 16, 4
    else:
        block_h, warps = (32 if h > 16 else 16), (4 if latent.element_size() == 2 else 8)
        block_s = 32 if latent.element_size() == 2 else 16  # an fp32 tile of 32 keys would spill
    launch = launch_config(config, "mla_decode", BLOCK_H=block_h, BLOCK_S=block_s, num_warps=warps)
    block_h, block_s = launch.pop("BLOCK_H"), launch.pop("BLOCK_S")
    head_blocks = triton.cdiv(h, block_h)
    splits = _num_splits(b, head_blocks, length, block_s, q_latent.device) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"mla_decode: num_splits must be ≥ 1, found {splits}")
    chunk = triton.cdiv(triton.cdiv(length, splits), block_s) * block_s  # whole blocks per chunk
    splits = triton.cdiv(length, chunk)  # so that no chunk is empty
    partial = torch.empty(b, splits, h, c, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_kernel[(b, head_blocks, splits)](
        q_latent, q_rope, latent, k_rope, partial, lse, h, c, r, length, chunk, float(scale),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        partial.stride(0), partial.stride(2), partial.stride(1), lse.stride(0), lse.stride(1),
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_C=max(16, next_pow2(c)), BLOCK_R=max(16, next_pow2(r)),  # tl.dot: K ≥ 16
        DOT_MODE=dot_mode(latent.dtype),
        **launch,
    )
    if splits == 1:
        return partial[:, 0]
    # combine: chunk i holds softmax restricted to it; its share of the whole is exp(lse_i - logsumexp(lse))
    weights = torch.softmax(lse, dim=-1)  # [B, H, splits]
    return torch.einsum("bhi,bihc->bhc", weights, partial)


def mla_decode(q_latent, q_rope, latent, k_rope, length: int, scale: float) -> torch.Tensor:
    """softmax_{s<length}(scale·(q_latent·latent_s + q_rope·k_rope_s)) · latent  ->  [B, H, c] fp32."""
    if use_triton(q_latent, q_rope, latent, k_rope):
        return mla_decode_triton(q_latent, q_rope, latent, k_rope, length, scale)
    return mla_decode_torch(q_latent, q_rope, latent, k_rope, length, scale)
