# %% [markdown]
# # 06 — Experts: SwiGLU, the shared expert, and the mixture
#
# After attention, every decoder layer runs an MLP on each token separately. In Kimi K2.x layer 0 has
# one big **dense** SwiGLU (width 18432); layers 1 … 60 have a **mixture of experts**: 384 small SwiGLUs
# (width 2048), of which the router (chapter 05) picks 8 per token, plus one **shared expert** (width
# 2048) that every token uses:
#
#     swiglu(x)  = down_proj( silu(gate_proj(x)) ⊙ up_proj(x) )
#     moe(x)     = Σ_j weights_j · expert_{ids_j}(x)  +  shared_experts(x)      (weights already × 2.827)
#
# Code: [kimi_ref/experts.py](../kimi_ref/experts.py) (torch), [kimi_ref/oracle/experts.py](../kimi_ref/oracle/experts.py)
# (float64 twin); tests in [tests/test_experts.py](../tests/test_experts.py): fp32, bf16 and INT4 experts
# against the oracle, tensor-parallel partial sums, and the Triton switch. The routed experts are stored
# in 4 bits (chapter 07), as `int4.W4A16Linear`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref import int4
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.experts import MoE, SwiGLU
from kimi_ref.model import KimiForCausalLM
from kimi_ref.oracle import experts as oracle_experts
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

real = load_config(fixture_path("kimi_k25"))
d, f = real.hidden_size, real.moe_intermediate_size
expert_weights = 3 * d * f
moe_layers = sum(real.is_moe_layer(i) for i in range(real.num_hidden_layers))
print(f"one expert: 3 × {d} × {f} = {expert_weights / 1e6:.1f} M weights")
print(f"all routed experts: {moe_layers} layers × {real.n_routed_experts} = "
      f"{moe_layers * real.n_routed_experts * expert_weights / 1e12:.2f} T weights")
print(f"per token: {real.num_experts_per_tok} routed + {real.n_shared_experts} shared experts per MoE layer")

# %% [markdown]
# That is the point of an MoE: a trillion weights of capacity, but each token pays for
# 8/384 ≈ 2 % of the routed experts. The shared expert carries what every token needs (it is added
# *unscaled*; `routed_scaling_factor` only multiplies the routed part). Every expert, routed, shared or
# dense, is the same module:

# %%
show(SwiGLU.forward)

# %% [markdown]
# and the MoE block joins them: route, run the routed part, add the shared expert, one all-reduce.

# %%
show(MoE.forward)

# %% [markdown]
# ## A tiny MoE, checked against the oracle
#
# The tiny configuration keeps every behaviour flag of the real one — INT4 experts included — and
# shrinks only the sizes.

# %%
cfg = tiny_config(real, hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                  vision=False)
torch.manual_seed(0)
moe = MoE(cfg, layer=1)
with torch.no_grad():
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
print("routed expert projections are", type(moe.experts["0"].gate_proj).__name__)
print("state-dict keys:", list(moe.state_dict())[:5], "...")

# the oracle wants float64 weights with the INT4 experts dequantized
sd = moe.state_dict()
w = {}
for key, value in sd.items():
    if key.endswith("weight_packed"):
        base = key[: -len("weight_packed")]
        w[base + "weight"] = int4.dequantize(value, sd[base + "weight_scale"], tuple(sd[base + "weight_shape"].tolist()),
                                             torch.float64).numpy()
    elif not key.endswith(("weight_scale", "weight_shape")):
        w[key] = value.double().numpy()
x = torch.randn(32, cfg.hidden_size)
with torch.no_grad():
    ours = moe(x)
want = oracle_experts.moe(x.double().numpy(), w, cfg)
print(f"max |torch - oracle| / max |oracle| = {np.abs(ours.double().numpy() - want).max() / np.abs(want).max():.2e}")

# %% [markdown]
# ## Dispatch and combine
#
# Running each token through its 8 experts one by one would be N·8 tiny matrix-vector products. Instead
# `MoE.routed_torch` lists all N·k (token, expert) picks, **sorts them by expert**, and runs one matmul
# per expert over its contiguous run of tokens (dispatch). Each output row, times its routing weight, is
# added back into its token's row with `index_add_` (combine). Left: which expert each pick goes to, in
# token order; right: the same picks sorted — every expert's tokens now sit together.

# %%
show(MoE.routed_torch)

# %%
with torch.no_grad():
    weights, ids = moe.gate(x[:12])
flat = ids.flatten()
order = torch.argsort(flat, stable=True)
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6), sharey=True)
for ax, values, title in ((axes[0], flat, "picks in token order"), (axes[1], flat[order], "picks sorted by expert")):
    ax.scatter(np.arange(len(values)), values.numpy(), c=(np.arange(len(values)) if ax is axes[0] else order.numpy()) // 4,
               cmap="tab20", s=14)
    ax.set_title(title), ax.set_xlabel("pick (token·k + j)")
axes[0].set_ylabel("expert")
plt.tight_layout()
plt.show()
print("token of each pick, sorted:", (order // cfg.num_experts_per_tok).tolist()[:16], "...")

# %% [markdown]
# ## Expert load in the tiny model
#
# A forward hook on every router (`mlp.gate`) records which experts the tokens of a batch pick, per
# layer. With random weights the load is uneven but not degenerate; in a trained model the
# `e_score_correction_bias` keeps it near uniform (chapter 05).

# %%
model_cfg = tiny_config(real, vocab_size=512, n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=4,
                        vision=False)
model = KimiForCausalLM(model_cfg).eval()
loads = {}


def record(layer):
    def hook(module, inputs, output):
        loads[layer] = torch.bincount(output[1].flatten(), minlength=model_cfg.n_routed_experts).numpy()
    return hook


handles = [layer.mlp.gate.register_forward_hook(record(i)) for i, layer in enumerate(model.model.layers)
           if model_cfg.is_moe_layer(i)]
with torch.no_grad():
    model(torch.randint(0, 512, (4, 64)))
for h in handles:
    h.remove()
heat = np.stack([loads[i] for i in sorted(loads)])
plt.figure(figsize=(8, 2.2))
plt.imshow(heat, aspect="auto", cmap="viridis")
plt.colorbar(label="picks")
plt.yticks(range(len(loads)), [f"layer {i}" for i in sorted(loads)])
plt.xlabel("expert")
plt.title(f"{4 * 64} tokens × top-{model_cfg.num_experts_per_tok}: expert load per MoE layer")
plt.tight_layout()
plt.show()
print("layer 0 is dense:", type(model.model.layers[0].mlp).__name__)

# %% [markdown]
# ## Under tensor parallelism
#
# With `--tp N` a rank holds whole experts, `[r·E/N, (r+1)·E/N)` — the `experts` ModuleDict is keyed by
# the **global** index and holds only those — while the shared expert and the dense MLP are split
# Megatron-style (gate/up rows, down columns). Every rank computes a partial sum; routed and shared parts
# meet in **one** all-reduce per layer ([kimi_ref/parallel.py](../kimi_ref/parallel.py)). On the triton
# backend ([kimi_ref/backend.py](../kimi_ref/backend.py), `use_backend(model, "triton")`) the MoE's kernel
# slot holds one fused INT4 kernel that replaces `routed_torch` over the rank's stacked experts
# (chapter 12).
#
# ## Exercises
#
# 1. Write `moe_by_loop(moe, x)`: for each token, for each of its k picks, run that expert on that one
#    token and add weight × output; then add the shared expert. Check it equals `moe(x)`.
# 2. Write `active_parameters(config)` returning the total text-model weights, the weights one token
#    touches, and the routed-expert weights. Check the "1T total, 32B active" of the model card.
# 3. Write `capacity_drop(ids, n_experts, capacity_factor)`: training systems often cap each expert at
#    `ceil(capacity_factor · N·k / E)` tokens and drop the rest. What fraction of picks would the tiny
#    model above drop at capacity factor 1.0 and 1.25? (Kimi's inference drops none.)
#
# Solutions: [chapters/solutions/06_experts.py](solutions/06_experts.py) (tested in `tests/test_experts.py`).
