# %% [markdown]
# # 07 — INT4: the experts in four bits
#
# Kimi K2.x has 61 layers; 60 of them hold 384 routed experts, each three Linears of
# 7168 × 2048 weights. That is 1.01 trillion weights in the experts alone: 2.03 TB in bf16. The
# checkpoint is 595 GB because Moonshot trained the experts to live in **4 bits** (quantization-aware
# training) and ships them that way, in the compressed-tensors `pack-quantized` format. Everything
# else (attention, the dense layer 0, the shared experts, embeddings, norms, `lm_head`) stays bf16.
#
# Code: [kimi_ref/int4.py](../kimi_ref/int4.py) (torch), [kimi_ref/oracle/int4.py](../kimi_ref/oracle/int4.py)
# (the numpy twin), tests in [tests/test_int4.py](../tests/test_int4.py) — bit-exact against
# compressed-tensors itself.
#
# One quantized Linear `y = x @ W.T` with `W` [out, in] is stored as three tensors:
#
# | tensor | dtype | shape | meaning |
# |---|---|---|---|
# | `weight_packed` | int32 | [out, in/8] | eight 4-bit values per word |
# | `weight_scale` | bf16 | [out, in/32] | one scale per group of 32 input columns |
# | `weight_shape` | int32 | [2] | (out, in) |
#
# and means `W[o, i] = q[o, i] · scale[o, i // 32]` with `q` an integer in −8 … 7.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref import int4
from kimi_ref.config import fixture_path, load_config
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

torch.manual_seed(0)
config = load_config(fixture_path("kimi_k25"))
d, w = config.hidden_size, config.moe_intermediate_size
print(f"one expert: gate/up [{w}, {d}], down [{d}, {w}] = {3 * d * w:,} weights")

# %% [markdown]
# ## Quantizing: one scale per 32 weights
#
# compressed-tensors' `minmax` observer, symmetric, 4 bits:
#
#     scale = bf16( max |W_group| / 7.5 )        7.5 = (q_max − q_min) / 2 = (7 − (−8)) / 2
#     q     = clamp( round_half_even(W / scale), −8, 7 )
#
# The divisor is 7.5, not 7. The most negative weight of a group lands exactly on −8; the most
# positive lands on +7.5, rounds to 8 and is clipped to 7. So the grid is slightly lopsided and the
# largest positive weight loses half a step. Below: "real-looking" weights — a trained matrix is not
# Gaussian: heavy tails, and a few input channels with much larger magnitude. `int4.quantize` is
# `pack(quantize_groups(w))`; the rounding is all here:

# %%
show(int4.quantize_groups)

# %%
gen = torch.Generator().manual_seed(7)
W = torch.distributions.StudentT(5.0).sample((256, d)) * 0.012  # 256 rows of a gate_proj: heavy tails
W[:, torch.randperm(d, generator=gen)[:60]] *= 6  # a few outlier input channels
W = W.to(torch.bfloat16)  # the model's dtype, as when the checkpoint was written

packed, scale = int4.quantize(W)
W_hat = int4.dequantize(packed, scale, W.shape, torch.float32)
step = scale.float().repeat_interleave(32, dim=1)
err_in_steps = ((W_hat - W.float()) / step).flatten().numpy()
rel = float((W_hat - W.float()).norm() / W.float().norm())
print(f"packed {tuple(packed.shape)} {packed.dtype}, scale {tuple(scale.shape)} {scale.dtype}")
print(f"relative error ‖Ŵ − W‖ / ‖W‖ = {rel:.3f}")
print(f"error in quantization steps: min {err_in_steps.min():+.3f}, max {err_in_steps.max():+.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].hist(W.float().flatten().numpy(), bins=200, color="tab:blue")
axes[0].set_yscale("log")
axes[0].set_title("weights (heavy tails, outlier channels)")
axes[1].hist(err_in_steps, bins=101, color="tab:orange")
axes[1].set_title("quantization error, in units of each group's step")
axes[1].set_xlabel("(Ŵ − W) / scale")
plt.tight_layout()
plt.show()

# %% [markdown]
# The error is nearly uniform on ±½ step — rounding — with a spike at −½ from the clipped
# maxima (+7.5 → 7) and a small one at 0 from bf16 weights that already sit on their group's grid. The scale itself is rounded to bf16 (8 bits of mantissa), which moves the
# grid by at most 0.4 % and is why the edges are not perfectly sharp.

# %% [markdown]
# ## Bytes: 24.77 MB instead of 88 MB per expert
#
# Per weight: 4 bits of `q`, plus a 16-bit scale shared by 32 weights = 4.5 bits, against 16 for bf16.

# %%
expert_int4 = 2 * int4.packed_bytes(w, d) + int4.packed_bytes(d, w)
expert_bf16 = 3 * d * w * 2
print(f"one expert: INT4 {expert_int4 / 1e6:.2f} MB vs bf16 {expert_bf16 / 1e6:.2f} MB ({expert_bf16 / expert_int4:.2f}× smaller)")
n_moe = sum(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
all_experts = n_moe * config.n_routed_experts
print(f"{all_experts:,} routed experts: INT4 {all_experts * expert_int4 / 1e9:.2f} GB vs bf16 "
      f"{all_experts * expert_bf16 / 1e9:.2f} GB")

# %% [markdown]
# ## Packing, bit by bit
#
# Eight 4-bit values share one int32 word. Column `i` goes to word `i // 8`, bits `4·(i % 8)` …
# `4·(i % 8) + 3`: the lowest column in the lowest nibble. The stored nibble is `q + 8` — **excess-8**
# (offset binary), not two's complement: −8 is `0000`, 0 is `1000`, 7 is `1111`. A word whose top
# nibble is ≥ 8 has bit 31 set, so as a signed int32 it is negative; unpacking shifts and masks with
# `& 0xF`, which gives the same nibble either way. (A well-known converter once read the nibbles as
# two's complement: the model still "works", but every weight is wrong.)

# %%
show(int4.pack)
show(int4.unpack)

# %%
q = torch.tensor([[-8, -3, 0, 1, 7, -1, 4, 2]], dtype=torch.int8)
word = int4.pack(q).item()
print("q       =", q.tolist()[0])
print("nibbles =", (q + 8).tolist()[0], " (q + 8)")
print(f"word    = 0x{word & 0xFFFFFFFF:08X} = {word} as int32")

bits = [(word >> b) & 1 for b in range(32)]  # bit 0 first
fig, ax = plt.subplots(figsize=(11, 2.2))
colors = plt.cm.tab10(np.arange(8))
for b in range(32):
    x = 31 - b  # draw bit 31 on the left, as a number is written
    ax.add_patch(plt.Rectangle((x, 0), 1, 1, color=colors[b // 4], alpha=0.35 + 0.5 * bits[b]))
    ax.text(x + 0.5, 0.5, str(bits[b]), ha="center", va="center", fontsize=10)
for k in range(8):
    ax.text(32 - 4 * k - 2, 1.15 + 0.35 * (k % 2), f"col {k}: q={q[0, k].item():+d} → {q[0, k].item() + 8:04b}",
            ha="center", fontsize=8)
ax.set_xlim(0, 32)
ax.set_ylim(0, 1.9)
ax.axis("off")
ax.set_title("one int32 word: column 0 in bits 0–3 (right), column 7 in bits 28–31 (left)", fontsize=10)
plt.show()

assert int4.unpack(int4.pack(q), q.shape).tolist() == q.tolist()

# %% [markdown]
# ## Why groups of 32?
#
# One scale per group must cover the group's largest weight, so every other weight of the group
# gets a coarser grid than it needs. Smaller groups follow the local magnitude (an outlier channel
# spoils only its own group) but cost more scales: 16 bits per group is 0.5 bit per weight at 32, 2
# bits at 8, and almost nothing per row (per-channel, group = in). Group 32 is the knee.

# %%
sizes = [8, 16, 32, 64, 128, 256, 1024, W.shape[1]]
errors, bits_per_weight = [], []
for g in sizes:
    p, s = int4.quantize(W, group_size=g)
    errors.append(float((int4.dequantize(p, s, W.shape, group_size=g) - W.float()).norm() / W.float().norm()))
    bits_per_weight.append(4 + 16 / g)
for g, e, b in zip(sizes, errors, bits_per_weight):
    print(f"group {g:5d}: relative error {e:.4f}, {b:.3f} bits per weight")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(bits_per_weight, errors, "o-")
for g, e, b in zip(sizes, errors, bits_per_weight):
    ax.annotate(str(g), (b, e), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_xlabel("bits per weight (4 + 16 / group)")
ax.set_ylabel("relative error")
ax.set_title("group size: accuracy vs storage")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## W4A16: dequantize per use
#
# `W4A16Linear` keeps only the packed buffers (named as in the checkpoint, so the state dict *is* the
# checkpoint) and dequantizes to the activation dtype inside each call. A model built from them never
# holds all experts dense — a token touches 8 of 384, and only those are expanded, briefly. In float32
# the dequantized weights are exact (a 4-bit integer times a bf16 scale fits in 24 bits of mantissa),
# so the layer agrees with a float64 dequantize-then-matmul to float32 rounding. Its forward either
# dequantizes and calls `F.linear` (the reference) or hands the packed buffers to the W4A16 GEMM kernel
# that [kimi_ref/backend.py](../kimi_ref/backend.py) put in its `kernel` slot (chapter 12):

# %%
show(int4.dequantize)
show(int4.W4A16Linear.forward)

# %%
from kimi_ref.oracle import int4 as oracle_int4

layer = int4.W4A16Linear.from_dense(W)
print(layer)
print({k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()})
x = torch.randn(4, W.shape[1])
y = layer(x)
y64 = x.double().numpy() @ oracle_int4.dequantize(layer.weight_packed.numpy(), layer.weight_scale.float().numpy(), tuple(W.shape)).T
print("max |torch − float64 oracle| / max |oracle| =", float(np.abs(y.double().numpy() - y64).max() / np.abs(y64).max()))

# %% [markdown]
# ## Exercises
#
# 1. Write `pack_word(values)` that packs eight integers in −8 … 7 into the signed int32 the checkpoint
#    stores, with plain Python integers, and `unpack_word(word)`. Check them against `int4.pack`.
# 2. Write `error_by_group_size(w, sizes)` returning the RMS quantization error for each group size.
#    Show that on weights with outlier channels the error grows with the group size.
# 3. Write `expert_bytes(d, width, group_size)`: the bytes of one INT4 expert. At what group size would
#    the scales cost as much as the 4-bit values themselves?
#
# Solutions: [chapters/solutions/07_int4.py](solutions/07_int4.py) (tested in `tests/test_int4.py`).
