# %% [markdown]
# # 08 — The whole model, and the real checkpoint on disk
#
# Chapters 03–07 built the parts: RMSNorm and RoPE, MLA, the router, the experts, INT4. This chapter
# stacks them into `KimiForCausalLM` and loads it from a checkpoint laid out **exactly** like the real
# 595 GB one — only tiny.
#
#     input_ids [B,T] → embed_tokens → 61 × (x += MLA(norm(x)); x += MLP-or-MoE(norm(x))) → norm → lm_head → logits [B,T,V]
#
# Code: [kimi_ref/model.py](../kimi_ref/model.py) (the model),
# [kimi_ref/checkpoint.py](../kimi_ref/checkpoint.py) (names, strict loading, one rank's slices),
# [weights_tools/](../weights_tools/) (`make_tiny`, `inspect`, `verify`, `memory_plan`, `dequantize`),
# the float64 twin [kimi_ref/oracle/forward.py](../kimi_ref/oracle/forward.py); tests in
# [tests/test_checkpoint.py](../tests/test_checkpoint.py) and [tests/test_weights_tools.py](../tests/test_weights_tools.py).

# %%
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import kimi_ref
from kimi_ref import checkpoint
from kimi_ref.config import fixture_path, load_config
from kimi_ref.model import KimiModel
from kimi_ref.tokenizer import Tokenizer
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines
from weights_tools import inspect, memory_plan
from weights_tools.make_tiny import tiny_checkpoint

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only in this chapter
real = load_config(fixture_path("kimi_k25"))  # the K2.5 / K2.7-Code config.json, from docs/sources.md
path = tiny_checkpoint("kimi_k25")              # built once by weights_tools.make_tiny, then cached
print(path)
print(sorted(p.name for p in path.iterdir()))

# %% [markdown]
# The stack itself is a short loop: embed (or take spliced image embeddings, chapter 11), compute the
# rotary table once, run every decoder layer (chapter 00 shows one) with its slice of the cache, normalise.

# %%
show(KimiModel.forward)

# %% [markdown]
# ## What is on disk
#
# A Kimi K2.5+ directory holds `config.json` (nested: `text_config` with its `quantization_config`,
# `vision_config`), `model.safetensors.index.json` mapping every tensor name to a shard, and the
# shards. The real one has 64 shards: layer 0 (dense MLP), one shard per MoE layer, then embeddings
# and `lm_head`, the projector, the vision tower. The tiny one is split the same way. A safetensors
# file is an 8-byte header length, a JSON header (name → dtype, shape, byte range) and raw bytes, so
# everything below — layers, dtypes, bytes per component — is read from the index and headers alone.

# %%
index = json.loads((path / checkpoint.INDEX_FILE).read_text())
for name in list(index["weight_map"])[:4]:
    print(f"{name:70s} → {index['weight_map'][name]}")
print("…")
print(inspect.summary(path))

# %% [markdown]
# ## Names: one mapping, in one place
#
# Our model's state-dict keys are the **flat** names (`model.layers.3.mlp.experts.17.up_proj.weight_packed`,
# `lm_head.weight`) — the names of the K2-Thinking checkpoint and of HF's DeepseekV3. K2.5+ nest the
# text model under `language_model.`; the vision tower and projector sit at the top.
# `checkpoint.checkpoint_name` / `flat_name` are the only place that knows.

# %%
show(checkpoint.checkpoint_name)
for key in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.3.up_proj.weight_packed", "lm_head.weight",
            "vision_tower.encoder.blocks.0.wqkv.weight"):
    print(f"{key:55s} ↔ {checkpoint.checkpoint_name(key, real)}")

# %% [markdown]
# The list of tensors a checkpoint must hold is **generated from config.json**
# (`checkpoint.expected_tensors` builds the model above on the meta device, shapes without memory,
# and reads its state dict): for the real K2.5 config it is exactly the 208,550 tensors of the
# public dump (sources §5). Most of them are routed-expert INT4 triples; most of the *bytes* too.

# %%
expected = checkpoint.expected_tensors(real)
print(f"{len(expected):,} tensors")
by_component: dict[str, int] = {}
for name, (shape, dtype) in expected.items():
    comp = checkpoint.component(checkpoint.flat_name(name, real))
    by_component[comp] = by_component.get(comp, 0) + math.prod(shape) * checkpoint.ITEMSIZE[dtype]
total = sum(by_component.values())
print(f"{total / 1e9:.2f} GB in all ({total / 2**30:.1f} GiB)")

names, sizes = zip(*sorted(by_component.items(), key=lambda kv: kv[1]))
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.barh(names, [s / 1e9 for s in sizes], color="tab:purple")
ax.set_xscale("log")
ax.set_xlabel("GB on disk (log scale)")
ax.set_title("Kimi K2.5 checkpoint by component: the INT4 experts are 96 % of it")
for y, s in enumerate(sizes):
    ax.text(s / 1e9 * 1.1, y, f"{s / 1e9:.2f} GB", va="center", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Loading, strictly
#
# `kimi_ref.load_model` builds the model on the **meta** device (shapes, no memory), checks every
# tensor in the index and headers against the config's list *before reading a byte of weights* —
# a missing or unexpected tensor, a wrong shape or dtype, a truncated shard, a tensor in the wrong
# shard: every problem, each naming file and tensor — then reads shard by shard and assigns.
# Routed experts stay packed (`W4A16Linear`), the router's `e_score_correction_bias` stays fp32.

# %%
model = kimi_ref.load_model(path, dtype=torch.float32, progress=False)
n_params = sum(t.numel() for t in model.state_dict().values())
print(f"{type(model).__name__}: {n_params:,} stored values")
layer1 = model.model.layers[1]
print(layer1.self_attn)
print(layer1.mlp.gate)
print(f"experts {list(layer1.mlp.experts)}, each:", layer1.mlp.experts["0"])
print("shared:", layer1.mlp.shared_experts)

# %% [markdown]
# ## A forward pass, checked against the float64 oracle
#
# The oracle (`kimi_ref.oracle.forward`) reads the same directory with its own safetensors reader,
# dequantizes the experts in float64 and runs the obvious numpy forward. The torch model in float32
# agrees to float32 rounding.

# %%
tok = Tokenizer.demo()
ids = torch.tensor([tok.encode("What is 17*23? Let me think step by step.")])
logits = model(ids)
reference = kimi_ref.oracle.forward(path, ids.numpy())
err = float(np.abs(logits.double().numpy() - reference).max() / np.abs(reference).max())
print(f"ids {tuple(ids.shape)} → logits {tuple(logits.shape)} {logits.dtype}; relative error vs float64: {err:.2e}")
assert err < 1e-5

fig, ax = plt.subplots(figsize=(4.5, 4))
ax.scatter(reference[0, -1], logits[0, -1].detach().numpy(), s=3)
ax.set_xlabel("float64 oracle logit")
ax.set_ylabel("torch float32 logit")
ax.set_title("last position, all 4096 logits")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Inside: the residual stream and the router
#
# Forward hooks read what each layer adds and which experts each token is sent to. Layer 0 is the
# dense SwiGLU (`first_k_dense_replace = 1`); layers 1 and 2 are MoE, top-2 of 8 here (top-8 of 384 in
# the real model), chosen by `sigmoid(logits) + e_score_correction_bias`.

# %%
norms, picks = [], {}
hooks = [layer.register_forward_hook(lambda m, a, out: norms.append(out[0].norm(dim=-1).detach()))
         for layer in model.model.layers]
for i, layer in enumerate(model.model.layers):
    if hasattr(layer.mlp, "gate"):
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: picks.__setitem__(i, out[1])))
model(ids)
for h in hooks:
    h.remove()

fig, axes = plt.subplots(1, 1 + len(picks), figsize=(12, 3.2))
for i, n in enumerate(norms):
    axes[0].plot(n.numpy(), label=f"after layer {i}")
axes[0].set_xlabel("position")
axes[0].set_ylabel("‖x‖")
axes[0].set_title("residual stream norm")
axes[0].legend(fontsize=7)
for ax, (layer_idx, chosen) in zip(axes[1:], picks.items()):
    grid = np.zeros((ids.shape[1], model.config.n_routed_experts))
    for t, row in enumerate(chosen.numpy()):
        grid[t, row] = 1
    ax.imshow(grid.T, aspect="auto", cmap="Greens")
    ax.set_xlabel("position")
    ax.set_ylabel("expert")
    ax.set_title(f"layer {layer_idx}: experts chosen")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One real layer on a laptop
#
# `checkpoint.load_layer(dir, layer, experts=None)` reads one decoder layer lazily from its shard —
# with the real checkpoint that is ~9 GB of INT4 experts, or a few of them with `experts=[…]` — so you
# can run and inspect a real layer on a CPU. Here it reproduces the layer inside the full model.

# %%
seen = {}
hook = model.model.layers[2].register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
model(ids)
hook.remove()
layer2 = checkpoint.load_layer(path, 2)
print("load_layer == the layer in the model:", torch.equal(layer2(seen["x"], torch.arange(ids.shape[1])), seen["out"]))

# %% [markdown]
# ## Both layouts, and tensor parallelism
#
# The flat (K2-Thinking-style) layout loads through the same code. `make_tiny --layout flat` copies the
# K2-Thinking-style fixture, whose YaRN `beta_fast` is 1 rather than 32, so with the *same* weights its
# logits differ everywhere but position 0 (no rotation there): the config decides.
#
# With `tp=TP(rank, N)` a rank reads only its rows/columns (`safe_open(...).get_slice`) and only its
# `E/N` routed experts. For the real model at TP 8:

# %%
flat = kimi_ref.load_model(tiny_checkpoint("flat"), dtype=torch.float32, progress=False)
diff = (flat(ids) - logits).abs().amax(dim=-1)[0]
print("max |flat − kimi_k25| per position:", [f"{d:.1e}" for d in diff.tolist()])

plan = memory_plan.plan(real, tp=8, context=262_144)
print(plan.report())

# %%
contexts = [2**k for k in range(12, 19)] + [262_144]
parts = {"weights": [], "KV cache": [], "activations": []}
for ctx in contexts:
    p = memory_plan.plan(real, tp=8, context=ctx)
    parts["weights"].append((p.weights_total + p.overhead) / 2**30)
    parts["KV cache"].append(p.kv_cache / 2**30)
    parts["activations"].append(p.activations["peak"] / 2**30)
fig, ax = plt.subplots(figsize=(8, 3.6))
bottom = np.zeros(len(contexts))
for label, values in parts.items():
    ax.bar(range(len(contexts)), values, bottom=bottom, label=label)
    bottom += np.array(values)
for gpu, capacity in memory_plan.GPUS.items():
    ax.axhline(capacity / 2**30, ls="--", color="k" if "H200" in gpu else "r", lw=1)
    ax.text(-0.4, capacity / 2**30 + 1, gpu, fontsize=8)
ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" for c in contexts])
ax.set_xlabel("context (tokens, batch 1)")
ax.set_ylabel("GiB per rank")
ax.set_title("TP 8: per-rank memory; the latent KV cache is replicated, not split")
ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# On 8 × 80 GB the weights alone (77 GB per rank, 71 GB of it packed experts) leave about 5 GB: a
# 37K-token context at most with this reference path. On 8 × H200 (141 GB) the full 256K context
# fits, with the 18 GB latent cache (70 KB per token across 61 layers — an MHA cache would be 35×
# larger) and the prefill scores as the other big items.
#
# ## Exercises
#
# 1. Write `parameter_counts(config) -> (total, active)`: the text model's weights, INT4 Linears at
#    their dense size, and those a token uses (all but the routed experts, plus k of them per MoE
#    layer). Check the "1T total, 32B active" on the real config.
# 2. Write `kv_cache_bytes_per_token(config, mode, itemsize=2)` for the absorbed (latent) and naive
#    (per-head K and V) caches; compare with `model.new_cache(1, 8).bytes_per_token()` for a model
#    built with `mla_mode="naive"`.
# 3. Write `rank_read_bytes(config, tp_size, rank)`: the bytes one rank reads from the checkpoint.
#    Why do the 8 ranks together read more than the checkpoint holds?
#
# Solutions: [chapters/solutions/08_model.py](solutions/08_model.py) (tested in `tests/test_checkpoint.py`).
