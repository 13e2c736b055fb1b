# %% [markdown]
# # 05 — The router: eight experts out of 384
#
# Every MoE layer of Kimi K2.x (layers 1 … 60) holds 384 routed experts, and each token visits only
# 8 of them (plus the always-on shared expert, chapter 06). The **router** (`mlp.gate`) decides which
# 8, and with what weight. It is tiny — one matrix [384, 7168] and a bias [384] — and it is where the
# model's sparsity comes from.
#
# Code: [kimi_ref/router.py](../kimi_ref/router.py) (torch), [kimi_ref/oracle/router.py](../kimi_ref/oracle/router.py)
# (the float64 twin), tests in [tests/test_router.py](../tests/test_router.py) (torch == oracle on generated
# inputs) and [tests/test_hf_peer.py](../tests/test_hf_peer.py) (the whole model == HF's DeepseekV3).
#
# Per token `x` [d], all in **fp32** whatever the model dtype:
#
#     scores  = sigmoid(x · Wᵀ)                          [384]   affinity for each expert
#     choice  = scores + e_score_correction_bias         [384]   decides WHICH experts win …
#     ids     = top-8 of choice, best first
#     weights = scores[ids] / Σ scores[ids] · 2.827              … but not HOW MUCH they count
#
# This is DeepSeek-V3's `noaux_tc` routing, which Kimi inherits unchanged.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref import router as router_module
from kimi_ref.router import Router, route
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

real = load_config(fixture_path("kimi_k25"))
print(f"experts {real.n_routed_experts}, top-k {real.num_experts_per_tok}, groups {real.n_group}/{real.topk_group}, "
      f"scoring {real.scoring_func}, method {real.topk_method}, scale {real.routed_scaling_factor}, "
      f"normalized {real.norm_topk_prob}")

# %% [markdown]
# The module's forward hands its two tensors to `route`, which is the four lines above plus the checks
# and the group step of the end of this chapter:

# %%
show(Router.forward)
show(route)

# %% [markdown]
# ## One token through the real-sized router
#
# We build the router at full size (random weights: the real ones are 5.5 MB per layer) and route four
# tokens. The weights of each token sum to `routed_scaling_factor` = 2.827, not 1: the routed experts
# are amplified relative to the shared expert, which is added unscaled.

# %%
torch.manual_seed(0)
router = Router(real)
with torch.no_grad():
    router.weight.normal_(0, 0.02)
x = torch.randn(4, real.hidden_size)
weights, ids = router(x)
print("ids     ", ids[0].tolist())
print("weights ", [round(w, 3) for w in weights[0].tolist()])
print("row sums", weights.sum(-1).tolist())

# %% [markdown]
# ## Why sigmoid, and why a bias
#
# A softmax router makes experts compete for one unit of probability; sigmoid scores are independent
# affinities in (0, 1), and the normalization over the chosen 8 happens only afterwards.
#
# Load balance is the hard part of MoE training: if a few experts win most tokens, the others never
# learn and the GPUs holding the popular ones stall everyone. Older MoEs add an auxiliary loss that
# fights the language-model loss. DeepSeek-V3 instead keeps a per-expert **bias** that is only used to
# *select*: after each batch, the bias of an overloaded expert goes down a little, that of an idle
# expert goes up. The bias never enters the weights, so the function the experts compute is not bent
# to serve balance. In the checkpoint it is `mlp.gate.e_score_correction_bias`, stored in **fp32**.
#
# Below: a skewed router (a few experts with large affinity for everything) on a batch of tokens,
# balanced by that bias update (`bias -= rate · sign(load − mean load)` after each batch). Left: the load per expert at step 0 and after 60 steps.
# Right: how unbalanced (max load / mean load) the layer is at each step.

# %%
cfg = tiny_config(real, hidden_size=64, n_routed_experts=32, num_experts_per_tok=4, vision=False)
gen = torch.Generator().manual_seed(1)
tokens = torch.randn(2048, cfg.hidden_size, generator=gen)
w_gate = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen) * 0.05
w_gate[:4] += 0.4 * tokens.mean(0) / tokens.mean(0).norm()  # four "popular" experts
w_gate[:4] += 0.05 * torch.randn(4, cfg.hidden_size, generator=gen)
tokens += 0.3 * tokens.mean(0)  # tokens share a common direction, which the popular experts align with

bias, loads = torch.zeros(cfg.n_routed_experts), []
for step in range(60):
    _, chosen = route(tokens, w_gate, bias, cfg)
    load = torch.bincount(chosen.flatten(), minlength=cfg.n_routed_experts).float()
    loads.append(load.numpy())
    bias -= 0.01 * torch.sign(load - load.mean())  # overloaded experts down, idle ones up
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.2))
ax0.bar(np.arange(32) - 0.2, loads[0], width=0.4, label="no bias (step 0)")
ax0.bar(np.arange(32) + 0.2, loads[-1], width=0.4, label="after 60 bias updates")
ax0.axhline(len(tokens) * cfg.num_experts_per_tok / 32, color="k", lw=0.8, ls="--", label="perfect balance")
ax0.set_xlabel("expert"), ax0.set_ylabel("tokens routed"), ax0.legend(fontsize=8)
ax1.plot([l.max() / l.mean() for l in loads])
ax1.set_xlabel("bias update step"), ax1.set_ylabel("max load / mean load")
plt.tight_layout()
plt.show()
print(f"max/mean load: {loads[0].max() / loads[0].mean():.2f} -> {loads[-1].max() / loads[-1].mean():.2f}")
print("bias of the popular experts:", [round(v, 3) for v in bias[:4].tolist()])

# %% [markdown]
# The weights a token gets stay the unbiased scores: the bias moved tokens to other experts, but an
# expert that is chosen still counts by how much the token actually likes it.

# %%
w_before, ids_before = route(tokens[:1], w_gate, torch.zeros(32), cfg)
w_after, ids_after = route(tokens[:1], w_gate, bias, cfg)
print("without bias:", ids_before.tolist(), [round(v, 3) for v in w_before[0].tolist()])
print("with bias:   ", ids_after.tolist(), [round(v, 3) for v in w_after[0].tolist()])

# %% [markdown]
# ## Group-limited routing (off in Kimi)
#
# DeepSeek-V3 splits its 256 experts into 8 groups (one per node) and lets a token use only the
# `topk_group` = 4 groups whose two best experts score highest, to bound cross-node traffic. Kimi sets
# `n_group = topk_group = 1`, so the step keeps every expert. kimi_ref still implements it (from the
# config) and tests it against the oracle and HF: masked experts get **−inf**, not 0 — with negative
# biases a 0 would beat every allowed expert.

# %%
show(router_module._mask_groups)

# %%
grouped = cfg.replace(n_group=4, topk_group=2)
_, gids = route(tokens[:6], w_gate, bias, grouped)
for row in gids.tolist():
    print(row, "groups", sorted({e // 8 for e in row}))

# %% [markdown]
# ## The fp32 island
#
# The router's matmul runs in fp32 even in a bf16 model (`x.float() @ W.float().T`). DeepSeek's own
# inference code takes the logits in bf16; near-ties between the 8th and 9th expert then flip. At the
# real size (d = 7168, 384 experts) a bf16 router picks a different expert set for a sizable share of
# tokens:

# %%
xs = torch.randn(256, real.hidden_size)
ws = torch.randn(real.n_routed_experts, real.hidden_size) * 0.02
b = torch.randn(real.n_routed_experts) * 0.01
_, ids32 = route(xs, ws, b, real)
ids16 = torch.topk(torch.sigmoid((xs.bfloat16() @ ws.bfloat16().T).float()) + b, real.num_experts_per_tok).indices
changed = (ids32.sort(-1).values != ids16.sort(-1).values).any(-1)
print(f"tokens whose expert set changes with bf16 logits: {100 * changed.float().mean():.1f}%")

# %% [markdown]
# ## Exercises
#
# 1. Write `route_by_hand(x, weight, bias, config)` for **one** token with plain Python lists and `math`
#    (no numpy, no torch), group step included. Compare it with `router.route`.
# 2. Write `balance_bias_proportional(x, weight, config, steps, rate)`: like the loop above, but move
#    each bias in proportion to its relative overload, `bias -= rate · (load − mean) / mean`. Return the
#    bias and the loads per step. Which rule ends closer to balance, and which oscillates?
# 3. Write `selection_margin(x, weight, bias, config)`: per token, the gap between the k-th and the
#    (k+1)-th choice score (fp32). Show that the tokens a bf16 router mis-routes are those with a margin
#    below bf16's resolution near the scores (about 2⁻⁸ · score).
#
# Solutions: [chapters/solutions/05_router.py](solutions/05_router.py) (tested in `tests/test_router.py`).
