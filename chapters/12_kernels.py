# %% [markdown]
# # 12 — Triton kernels: a W4A16 GEMM, fused MoE and MLA decode
#
# The torch model of chapters 03–08 is the reference: readable, and slow where it matters. Decoding
# one token reads every picked expert's weights and the whole KV cache, and torch's INT4 path first
# *writes* each expert's dense bf16 weight to memory and then reads it back for the matmul. A kernel
# that dequantizes **inside** the matmul reads 0.56 bytes per weight instead of 2 + 2 + 0.56.
#
# Code: [kimi_ref/kernels/](../kimi_ref/kernels/) — one file per kernel, each with a torch fallback:
#
# | kernel | file | replaces |
# |---|---|---|
# | `w4a16_matmul` | [w4a16.py](../kimi_ref/kernels/w4a16.py) | `W4A16Linear` (dequantize, then matmul) |
# | `fused_moe` | [fused_moe.py](../kimi_ref/kernels/fused_moe.py) | the expert loop of [experts.py](../kimi_ref/experts.py) |
# | `mla_decode` | [mla_decode.py](../kimi_ref/kernels/mla_decode.py) | the absorbed attention of [mla.py](../kimi_ref/mla.py) for one new token |
# | `rms_norm`, `apply_rope` | [rms_norm.py](../kimi_ref/kernels/rms_norm.py), [rope.py](../kimi_ref/kernels/rope.py) | [norms.py](../kimi_ref/norms.py), [rope.py](../kimi_ref/rope.py) |
#
# The backend is chosen in one place, [kimi_ref/backend.py](../kimi_ref/backend.py):
# `use_backend(model, "triton")` (which `model.set_backend("triton")` calls) hands each module its kernel.
# The modules hold kernel slots (None = run their own reference code) and never look at a backend's
# name; each kernel's torch fallback calls the same reference functions. The tests
# ([tests/test_kernels.py](../tests/test_kernels.py)) prove each kernel equal to the float64 oracle on
# generated shapes, ragged ones included, and the tiny model equal across backends.
#
# We have no GPU here, so this chapter runs the kernels in **Triton's interpreter**, which executes
# the same kernel code with numpy on the CPU. It must be switched on *before* triton is imported
# (the `@triton.jit` decorator reads it). The interpreter is slow: tiny shapes only.

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import importlib
import re

import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref import int4, kernels
from kimi_ref.backend import use_backend
from kimi_ref.config import fixture_path, load_config
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

w4 = importlib.import_module("kimi_ref.kernels.w4a16")  # the module (kernels.w4a16_matmul is the function)
moe = importlib.import_module("kimi_ref.kernels.fused_moe")
mla = importlib.import_module("kimi_ref.kernels.mla_decode")

config = load_config(fixture_path("kimi_k25"))
print("Triton can run here:", kernels.available())
show(use_backend)

# %% [markdown]
# ## Tiles
#
# A GPU kernel is written for **one program**, and launched on a grid of them. For
# `y [M, out] = x [M, in] @ Wᵀ` each program owns one `[BLOCK_M, BLOCK_N]` tile of `y`. It walks
# the input dimension in `BLOCK_K` steps; each step loads a `[BLOCK_M, BLOCK_K]` tile of `x` and a
# `[BLOCK_N, BLOCK_K]` tile of `W` and accumulates their product in fp32 registers. Out-of-range
# rows and columns are masked off on every load and store (the interpreter would not catch a stray
# read; a GPU would read garbage).
#
# When M is tiny (decode: M = 1) there are few output tiles — `out / BLOCK_N` of them, 64 for a
# gate_proj — and an H100 has 132 streaming multiprocessors. So the input dimension is also cut,
# into `split_k` slices, each computed by its own program; their partial sums are added at the end.
# The picture: which program computes which part of `y` and reads which part of `W`.

# %%
M, OUT, IN = 20, 96, 128
BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K = 16, 32, 32, 2
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
tile_y = np.zeros((M, OUT))
for pm in range(-(-M // BLOCK_M)):
    for pn in range(OUT // BLOCK_N):
        tile_y[pm * BLOCK_M:(pm + 1) * BLOCK_M, pn * BLOCK_N:(pn + 1) * BLOCK_N] = pm * (OUT // BLOCK_N) + pn
axes[0].imshow(tile_y, cmap="tab20", aspect="auto", interpolation="nearest")
axes[0].set(title=f"y [{M}, {OUT}]: one colour per (pid_m, pid_n)\nrows 16..19: a ragged, masked tile",
            xlabel="out", ylabel="M")
slice_w = np.zeros((OUT, IN))
for pn in range(OUT // BLOCK_N):
    for pk in range(SPLIT_K):
        slice_w[pn * BLOCK_N:(pn + 1) * BLOCK_N, pk * IN // SPLIT_K:(pk + 1) * IN // SPLIT_K] = pn * SPLIT_K + pk
axes[1].imshow(slice_w, cmap="tab20", aspect="auto", interpolation="nearest")
for k in range(0, IN, BLOCK_K):
    axes[1].axvline(k - 0.5, color="w", lw=0.6)
axes[1].set(title=f"W [{OUT}, {IN}]: split_k = {SPLIT_K} slices per column of tiles\n(white lines: BLOCK_K steps)",
            xlabel="in", ylabel="out")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Dequantization inside the kernel
#
# The weight tile arrives packed: `BLOCK_K / 8` int32 words per row, loaded contiguously (so the
# loads coalesce). Inside the program each word becomes 8 nibbles by shifting and masking, nibble
# `i` of word `j` being column `8j + i`; subtracting 8 undoes the excess-8 code; each run of 32
# columns is multiplied by its bf16 scale (converted to fp32 the moment it is loaded: the
# interpreter gets bf16 arithmetic wrong). This is `dequant_tile` in
# [w4a16.py](../kimi_ref/kernels/w4a16.py), a Triton function that the GEMM kernel calls once per step:

# %%
show(w4.dequant_tile)

# %% [markdown]
# The shift of a negative word is arithmetic (it drags in sign bits), which is harmless: `& 0xF`
# keeps only our nibble. Here is one word of a real-looking tile, taken apart the same way:

# %%
gen = torch.Generator().manual_seed(0)
W = torch.randn(4, 64, generator=gen) * 0.02
packed, scale = int4.quantize(W)
word = int(packed[0, 0])
nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
print(f"word {word} = 0x{word & 0xFFFFFFFF:08x}")
print("nibbles (lowest first):", nibbles)
print("q = nibble - 8:        ", [n - 8 for n in nibbles])
print("int4.unpack, columns 0..7:", int4.unpack(packed, (4, 64))[0, :8].tolist())

# %% [markdown]
# Now the real kernel, in the interpreter, on a ragged problem (M = 5 is not a multiple of any
# block), with and without split-K, against torch's "dequantize everything, then matmul". That is the
# kernel's torch fallback, which calls the reference `int4.dequantize` of chapter 07; the public function
# picks one of the two:

# %%
show(w4.w4a16_matmul_torch)
show(w4.w4a16_matmul)

# %%
x = torch.randn(5, 64, generator=gen)
reference = x @ int4.dequantize(packed, scale, (4, 64)).T
for split_k in (1, 2):
    y = w4.w4a16_matmul_triton(x, packed, scale, split_k=split_k)
    print(f"split_k={split_k}: max |kernel - torch| = {float((y - reference).abs().max()):.2e}")

# %% [markdown]
# The interpreter runs the kernel's Python, not Triton's compiler, so a kernel could pass every test
# here and still not compile for a GPU. Triton ships its compiler and NVIDIA's assembler, so
# `python -m kimi_ref.kernels.compile_check` compiles each kernel, with the block sizes used on a GPU,
# for an H100 (sm_90) on this CPU-only machine and prints each one's registers and spills
# ([compile_check.py](../kimi_ref/kernels/compile_check.py); the tests run it too).
#
# ## The roofline
#
# Is a kernel limited by arithmetic or by memory? Per weight a W4A16 GEMM does 2·M flops and reads
# 0.5 + 2/32 = 0.5625 bytes, so its **arithmetic intensity** is 3.6·M flop/byte. A GPU of peak
# `P` flop/s and bandwidth `B` byte/s can reach at most `min(P, intensity · B)`: the roofline. For an
# H100 SXM (spec sheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3) the ridge is at ~295 flop/byte, so
# W4A16 is memory-bound for every decode batch below M ≈ 83 (exercise 2). MLA decode has one more
# twist: all heads read the *same* 576-number latent per token, so its intensity grows with the heads
# (128 heads: ≈ 2·128·(512+64+512) flops per 576·2 bytes ≈ 240 flop/byte — close to the ridge).
#
# `benchmarks/device_check.py` measures the kernels on a GPU and writes `benchmarks/results/<gpu>.md`:
# the device's copy bandwidth (the memory roof it can actually reach) and each kernel's time. The
# cell below draws its W4A16 rows against that roof; without such a file, where the kernels *would*
# sit at full bandwidth.

# %%
PEAK = 989e12  # dense bf16 flop/s of an H100/H200 SXM (spec sheet: the same chip, an assumption)
BYTES_PER_WEIGHT = 0.5 + 2 / 32


def measured(path: str = "../benchmarks/results/h200.md") -> tuple[float | None, list[tuple[str, float, float]]]:
    """(copy bandwidth B/s or None, [(label, flop/byte, achieved flop/s)] of the W4A16 rows) from a device check."""
    bandwidth, points = None, []
    for line in open(path) if os.path.exists(path) else []:
        found = re.search(r"copy bandwidth \(read \+ write\) \| \*\*(\d+) GB/s", line)
        bandwidth = float(found[1]) * 1e9 if found else bandwidth
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"(\d+)×(\d+)", cells[0]) if len(cells) >= 4 else None
        if m and cells[1].isdigit() and re.fullmatch(r"[\d.]+", cells[2]):
            out_f, in_f, rows, ms = int(m[1]), int(m[2]), int(cells[1]), float(cells[2])
            flops = 2 * rows * out_f * in_f
            points.append((f"{out_f}×{in_f} M={rows}", flops / (out_f * in_f * BYTES_PER_WEIGHT), flops / (ms * 1e-3)))
    return bandwidth, points


BW, points = measured()
BW = BW or 4.8e12  # no measurement: the H200 spec sheet's 4.8 TB/s
intensity = np.logspace(-0.5, 3.5, 200)
plt.figure(figsize=(7, 4.2))
plt.loglog(intensity, np.minimum(PEAK, intensity * BW), "k-", label=f"roofline at {BW / 1e12:.2f} TB/s")
if points:
    for label, ai, achieved in points:
        plt.loglog(ai, achieved, "o")
        plt.annotate(label, (ai, achieved), fontsize=7)
    plt.title("W4A16 GEMM on an H200 (benchmarks/results/h200.md)")
else:
    for m_rows in (1, 4, 16, 64):
        ai = 2 * m_rows / BYTES_PER_WEIGHT
        plt.loglog(ai, min(PEAK, ai * BW), "o", label=f"W4A16, M={m_rows} (ideal)")
    plt.title("No measured table: where the kernels would sit at full bandwidth")
plt.xlabel("arithmetic intensity (flop / byte)")
plt.ylabel("flop / s")
plt.legend(fontsize=7)
plt.show()
for label, ai, achieved in points:
    print(f"{label:>18}: {achieved / min(PEAK, ai * BW):5.1%} of its roof")

# %% [markdown]
# The points sit an order of magnitude under the roof, and the device check says why. One expert
# matrix is 8 MB: at 4.3 TB/s it streams in 2 µs, but *every* launch configuration tried took
# 15–25 µs — a handful of dependent trips to memory per program, the launch itself and the split-K
# sum, none of which more bandwidth would shorten. A single small GEMV cannot reach its roof; what
# matters is the work per launch. The fused MoE reads one token's 8 experts (198 MB) in one launch
# and reaches 14%; a whole decoder layer's step is 0.59 ms of GPU time against a 0.12 ms byte roof,
# and ~3 ms when launched eagerly from Python (96 launches). So on real hardware the order of work is:
# first launch overhead (replay the decode step as a CUDA graph: 5× on this layer), then the fused
# MoE kernel's memory-level parallelism (exercise 4).
#
# %% [markdown]
# ## Fused MoE: tokens sorted by expert
#
# For N tokens and top-k routing there are N·k (token, expert) pairs. The kernel sorts them by
# expert, cuts each expert's run into blocks of `BLOCK_M` rows, and launches one program per block
# (and per `BLOCK_N` columns). The block schedule is built on the device; the grid is sized for the
# worst case and spare programs return at once. An expert nobody picked has **no block**: its 24.8 MB
# of weights are never read — that is most experts at decode (8 of 384 per token).
#
# Each block multiplies its rows by the expert's gate and up matrices (dequantized in registers),
# applies `silu(g)·u` before anything leaves the chip, then a second kernel does `down` and scales
# each row by its router weight; the k rows of a token are summed at the end.

# %%
n_tokens, top_k, n_experts = 6, 2, 8
# every token picks expert 3 first (one expert with all the tokens), then one other expert
others = torch.tensor([e for e in range(n_experts) if e != 3])
ids = torch.stack([torch.full((n_tokens,), 3), others[torch.randint(0, n_experts - 1, (n_tokens,), generator=gen)]], dim=1)
order, block_expert, start, end = moe.block_schedule(ids, expert_offset=0, num_experts=n_experts, block_m=4)
counts = torch.bincount(ids.flatten(), minlength=n_experts)
used = block_expert >= 0
print("picks per expert:     ", counts.tolist())
print("blocks (expert, rows):", [(int(e), int(min(b - a, 4))) for e, a, b in zip(block_expert[used], start[used], end[used])])
print(f"grid: {block_expert.numel()} programs, {int(used.sum())} with work")

fig, ax = plt.subplots(figsize=(7, 2.8))
ax.bar(range(n_experts), counts.numpy(), color=["C0" if c else "lightgray" for c in counts.tolist()])
for e in range(n_experts):
    blocks = int((block_expert == e).sum())
    ax.text(e, counts[e].item() + 0.1, f"{blocks} blk", ha="center", fontsize=8)
ax.set(xlabel="expert", ylabel="rows (token picks)", title="Rows per expert and the blocks they get (BLOCK_M = 4)")
plt.show()

# %% [markdown]
# The kernel against the torch fallback on this routing, with INT4 experts of a toy size. The fallback
# is the obvious loop over the experts that have tokens:

# %%
show(moe.fused_moe_torch)

# %%
d_model, inter = 64, 32
make = lambda o, i: [int4.quantize(torch.randn(o, i, generator=gen) * 0.05) for _ in range(n_experts)]  # noqa: E731
stack = lambda ws: (torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws]))  # noqa: E731
weights = (*stack(make(inter, d_model)), *stack(make(inter, d_model)), *stack(make(d_model, inter)))
tokens = torch.randn(n_tokens, d_model, generator=gen)
topk_weights = torch.rand(n_tokens, top_k, generator=gen)
fast = moe.fused_moe_triton(tokens, topk_weights, ids, *weights)
slow = moe.fused_moe_torch(tokens, topk_weights, ids, *weights)
print(f"fused_moe: max |kernel - torch| = {float((fast - slow).abs().max()):.2e} (values up to {float(slow.abs().max()):.2f})")

# %% [markdown]
# ## MLA decode: split the context, then combine
#
# One new token per sequence attends to the whole latent cache. All heads read the same latent, so a
# program takes 16 heads at once (a `[16, c] · [c, BLOCK_S]` dot per step) and runs an online softmax
# over the keys. A 128K-token cache with a handful of programs would leave the GPU idle, so the context
# is cut into chunks, each a program, each writing its normalized output and its log-sum-exp; the
# combine weights chunk i by `exp(lse_i − max lse)` (exercise 3). Entries past `length` are never read.
# The fallback it is checked against is MLA's own absorbed attention (chapter 04), for one query:

# %%
show(mla.mla_decode_torch)

# %%
b, heads, c, r, s = 1, 16, 32, 16, 90
q_latent, q_rope = torch.randn(b, heads, c, generator=gen), torch.randn(b, heads, r, generator=gen)
latent, k_rope = torch.randn(b, s, c, generator=gen), torch.randn(b, s, r, generator=gen)
reference = mla.mla_decode_torch(q_latent, q_rope, latent, k_rope, 83, 0.2)
for splits in (1, 3):
    out = mla.mla_decode_triton(q_latent, q_rope, latent, k_rope, 83, 0.2, num_splits=splits)
    print(f"{splits} context chunk(s): max |kernel - torch| = {float((out - reference).abs().max()):.2e}")

# %% [markdown]
# ## Exercises
#
# Solutions: [chapters/solutions/12_kernels.py](solutions/12_kernels.py), tested in
# [tests/test_kernels.py](../tests/test_kernels.py).
#
# 1. Write `unpack_tile(words, scales)` in numpy: int32 words [N, K/8] and scales [N, K/32] to the
#    float64 tile [N, K], exactly what `dequant_tile` computes. Check it against `int4.dequantize`.
# 2. Write `ridge_batch(peak_flops, bandwidth, bytes_per_weight=0.5625)`: the M at which a W4A16 GEMM
#    stops being memory-bound. What is it for an H100? For bf16 weights (2 bytes each)?
# 3. Write `combine_splits(partials, lse)`: given each chunk's softmax-normalized output [splits, c]
#    and its log-sum-exp [splits], return the attention output over all chunks. Why does subtracting
#    `max(lse)` matter at 128K tokens?
# 4. (Open; a GPU helps.) On an H200 the fused MoE reads one token's 8 experts at 14% of the copy
#    bandwidth. Little's law says a memory system with ~1 µs latency delivers bandwidth only with
#    `bandwidth × latency` bytes in flight: how many bytes per SM is that at 4.3 TB/s over 132 SMs?
#    How many does the default one-row launch keep in flight (programs per SM × bytes loaded per
#    step)? Change the launch or the kernel to raise it and measure with
#    `python benchmarks/device_check.py --parts 2 --out mine.md`.
