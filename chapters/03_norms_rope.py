# %% [markdown]
# # 03 — RMSNorm, RoPE and YaRN
#
# Two small pieces that every layer of Kimi K2.x uses, and where most reimplementations go quietly
# wrong: the **RMSNorm** (five per layer) and the **rotary position embedding** with YaRN context
# extension (inside attention, chapter 04).
#
# Code: [kimi_ref/norms.py](../kimi_ref/norms.py), [kimi_ref/rope.py](../kimi_ref/rope.py); their float64
# twins [kimi_ref/oracle/norms.py](../kimi_ref/oracle/norms.py), [kimi_ref/oracle/rope.py](../kimi_ref/oracle/rope.py);
# tests [tests/test_norms.py](../tests/test_norms.py), [tests/test_rope.py](../tests/test_rope.py).

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref import norms, rope
from kimi_ref.config import RopeConfig, fixture_path, load_config
from kimi_ref.mla import LATENT_NORM_EPS
from kimi_ref.oracle import norms as onorms
from kimi_ref.oracle import rope as orope
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

config = load_config(fixture_path("kimi_k25"))
thinking = load_config(fixture_path("kimi_k2_thinking"))
torch.set_grad_enabled(False)  # inference only in this chapter
print(config.rope)

# %% [markdown]
# ## RMSNorm
#
# `y = weight · x / sqrt(mean(x²) + eps)`. Kimi computes the statistics in **fp32** whatever the model
# dtype, casts back, and only then multiplies by the weight. Two eps values live in the model: the
# decoder-layer norms use `rms_norm_eps` from the config (1e-5), but the two norms inside MLA
# (`q_a_layernorm`, `kv_a_layernorm`) are built with the class default **1e-6**. The function the
# `RMSNorm` module calls:

# %%
show(norms.rms_norm)

# %%
print("config rms_norm_eps:", config.rms_norm_eps, "  MLA latent norms:", LATENT_NORM_EPS)
x = torch.randn(4, config.hidden_size, dtype=torch.bfloat16)
layer_norm = norms.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=torch.bfloat16)
y = layer_norm(x)
expected = onorms.rms_norm(x.double().numpy(), layer_norm.weight.detach().double().numpy(), config.rms_norm_eps)
print("bf16 in, bf16 out:", y.dtype, " max |error| vs float64 oracle:", float(np.abs(y.double().numpy() - expected).max()))

# %% [markdown]
# Does the eps matter? Only when a vector's RMS is small compared with √eps ≈ 3e-3. The plot shows
# the output RMS of the two eps values against the input RMS: they part ways below about 1e-2.

# %%
scales = np.logspace(-5, 0, 40)
g = torch.Generator().manual_seed(0)
base = torch.randn(512, generator=g, dtype=torch.float64)
ones = torch.ones(512, dtype=torch.float64)
out_rms = {eps: [float(norms.rms_norm(base * s, ones, eps).pow(2).mean().sqrt()) for s in scales]
           for eps in (1e-6, 1e-5)}
fig, ax = plt.subplots(figsize=(6, 3.2))
for eps, values in out_rms.items():
    ax.semilogx(scales, values, label=f"eps = {eps:g}")
ax.set_xlabel("RMS of the input"); ax.set_ylabel("RMS of the output"); ax.legend(); ax.set_title("RMSNorm: where eps bites")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## RoPE, interleaved
#
# Only the last `qk_rope_head_dim` = 64 numbers of each query/key head rotate. They are stored as
# **adjacent pairs** (x0, y0, x1, y1, …); pair *i* turns by `pos · inv_freq[i]`. NeoX-style code
# (Llama, HF's `rotate_half`) pairs x[i] with x[i + 32] instead: on Kimi's weights that gives a model that
# still talks, but worse. A rotated pair keeps its length, and the dot product of a rotated query and key
# depends only on the *distance* between their positions. The rotation, pair by pair:

# %%
show(rope.apply_rope)

# %%
r = config.qk_rope_head_dim
q, k = torch.randn(r, dtype=torch.float64), torch.randn(r, dtype=torch.float64)


def rotated_dot(pos_q: int, pos_k: int) -> float:
    cq, sq = rope.cos_sin(torch.tensor(pos_q), config.rope, r)
    ck, sk = rope.cos_sin(torch.tensor(pos_k), config.rope, r)
    return float(rope.apply_rope(q.float(), cq, sq) @ rope.apply_rope(k.float(), ck, sk))


print([round(rotated_dot(p + 10, p), 4) for p in (0, 1000, 100_000)], "— the same for distance 10 anywhere")

# %% [markdown]
# ## YaRN: stretching the context 64×
#
# Kimi was trained on 4096 tokens and runs at 262,144 (factor 64). YaRN leaves the **fast** pairs
# alone (they turn many times within 4096 tokens, so they have seen every angle), divides the **slow**
# pairs' frequencies by the factor (interpolation), and blends in between. Which pair is fast is set by
# `beta_fast`/`beta_slow`: the pairs that complete at least 32 resp. at most 1 turn over the original
# context. For K2.5 the ramp runs from pair 8 to pair 20; K2-Thinking (and K2-Instruct-0905) ship
# `beta_fast = 1`, a ramp from 19 to 20. The frequencies, and where the ramp starts and ends:

# %%
show(rope.inv_freq)
show(rope.correction_range)

# %%
pairs = np.arange(r // 2)
plain = dict(theta=config.rope.theta, type="default")  # the plain RoPE of the same θ, for comparison

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
ax1.semilogy(pairs, 2 * np.pi / rope.inv_freq(RopeConfig(**plain), r).numpy(), "k--", label="plain RoPE")
for name, cfg in (("K2.5 (β_fast 32)", config), ("K2-Thinking (β_fast 1)", thinking)):
    ax1.semilogy(pairs, 2 * np.pi / rope.inv_freq(cfg.rope, r).numpy(), label=name)
    low, high = rope.correction_range(cfg.rope, r)
    freq_extra = rope.inv_freq(RopeConfig(**plain), r)
    keep = (rope.inv_freq(cfg.rope, r) - freq_extra / cfg.rope.factor) / (freq_extra - freq_extra / cfg.rope.factor)
    ax2.plot(pairs, keep.numpy(), marker=".", label=f"{name}: ramp {low}..{high}")
ax1.axhline(config.rope.original_max_position_embeddings, color="gray", lw=0.8)
ax1.text(0, config.rope.original_max_position_embeddings * 1.3, "original context 4096", fontsize=8)
ax1.set_xlabel("pair i"); ax1.set_ylabel("wavelength (tokens)"); ax1.legend(fontsize=8)
ax1.set_title("wavelength of each rotary pair")
ax2.set_xlabel("pair i"); ax2.set_ylabel("share of the original frequency"); ax2.legend(fontsize=8)
ax2.set_title("YaRN ramp: 1 = extrapolate, 0 = interpolate")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## The attention scale
#
# Stretching positions makes attention flatter; YaRN compensates by multiplying the logits by
# `m² = (0.1·mscale_all_dim·ln(factor) + 1)²`. Kimi's softmax scale is therefore not 1/√192 = 0.0722 but:

# %%
show(rope.softmax_scale)
m = rope.yarn_get_mscale(config.rope.factor, config.rope.mscale_all_dim)
print(f"mscale = {m:.5f}, softmax scale = 192^-0.5 · mscale² = {rope.softmax_scale(config):.7f}")
print("cos/sin factor mscale/mscale_all_dim =", rope.attention_factor(config.rope))
assert abs(rope.softmax_scale(config) - orope.softmax_scale(config)) < 1e-15

# %% [markdown]
# ## Angles in float64
#
# At position 262,144 the fastest pair has turned 262,144 radians. A float32 number that large has a
# spacing of 1/64, so a float32 angle is off by up to ~1e-2 rad; kimi_ref forms the angles in float64
# and only rounds cos/sin to float32:

# %%
show(rope.cos_sin)

# %%
positions = torch.arange(0, 262_145, 4096)
ocos, _ = orope.cos_sin(positions.numpy(), config.rope, r)
cos64, _ = rope.cos_sin(positions, config.rope, r)
cos32 = (positions.float()[:, None] * rope.inv_freq(config.rope, r).float()).cos()
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(positions, np.abs(cos32.double().numpy() - ocos).max(-1) + 1e-12, label="fp32 angles")
ax.semilogy(positions, np.abs(cos64.double().numpy() - ocos).max(-1) + 1e-12, label="float64 angles (kimi_ref)")
ax.set_xlabel("position"); ax.set_ylabel("max |cos error|"); ax.legend(); ax.set_title("why the angles are float64")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Write `wavelengths(rope_cfg, dim)` (tokens per full turn of each pair) and
#    `turns_in_original_context(rope_cfg, dim)` (turns of plain RoPE over the original context). Check
#    that pairs before `low` make at least `beta_fast` turns and pairs from `high` on at most `beta_slow`.
# 2. Write `to_halves(x)`, the permutation from Kimi's interleaved layout to HF's halves layout, and show
#    that rotating q and k then permuting both leaves q·k unchanged.
# 3. Write `rms_norm_by_hand(x, weight, eps)` with a plain sum instead of `mean` and check it against
#    `norms.rms_norm` in bf16.
#
# Solutions: [chapters/solutions/03_norms_rope.py](solutions/03_norms_rope.py) (tested in
# `tests/test_rope.py` and `tests/test_norms.py`).
