# %% [markdown]
# # 00 — Overview: Kimi K2.7-Code in one page
#
# Kimi K2.7-Code is a 1-trillion-parameter Mixture-of-Experts language model with a vision
# encoder. Each token passes through **61 decoder layers**; each layer has **Multi-head Latent
# Attention** (MLA) and, from layer 1 on, a **MoE** block that sends the token to **8 of 384
# experts** plus one shared expert. The routed experts are stored as **4-bit integers**.
#
# This book builds the model from scratch, one concept per chapter, one file per concept:
#
# | chapter | concept | code |
# |---|---|---|
# | 01 | byte-level BPE tokenizer | [kimi_ref/bpe.py](../kimi_ref/bpe.py), [kimi_ref/tokenizer.py](../kimi_ref/tokenizer.py) |
# | 02 | chat template and tool calls | [kimi_ref/chat_template.py](../kimi_ref/chat_template.py), [kimi_ref/tool_declarations.py](../kimi_ref/tool_declarations.py), [kimi_ref/tool_parsing.py](../kimi_ref/tool_parsing.py) |
# | 03 | RMSNorm, RoPE, YaRN | [kimi_ref/norms.py](../kimi_ref/norms.py), [kimi_ref/rope.py](../kimi_ref/rope.py) |
# | 04 | Multi-head Latent Attention | [kimi_ref/mla.py](../kimi_ref/mla.py) |
# | 05 | the router | [kimi_ref/router.py](../kimi_ref/router.py) |
# | 06 | experts and MoE | [kimi_ref/experts.py](../kimi_ref/experts.py) |
# | 07 | INT4 weights | [kimi_ref/int4.py](../kimi_ref/int4.py) |
# | 08 | the whole model, loading a checkpoint | [kimi_ref/model.py](../kimi_ref/model.py), [kimi_ref/checkpoint.py](../kimi_ref/checkpoint.py) |
# | 09 | generation and chat | [kimi_ref/generate.py](../kimi_ref/generate.py), [kimi_ref/chat.py](../kimi_ref/chat.py), [kimi_ref/tools.py](../kimi_ref/tools.py) |
# | 10 | tensor parallelism | [kimi_ref/parallel.py](../kimi_ref/parallel.py) |
# | 11 | MoonViT: images and video | [kimi_ref/media.py](../kimi_ref/media.py), [kimi_ref/moonvit.py](../kimi_ref/moonvit.py) |
# | 12 | Triton kernels, the backend chosen in one place | [kimi_ref/kernels/](../kimi_ref/kernels/), [kimi_ref/backend.py](../kimi_ref/backend.py) |
#
# Every concept exists three times: a float64 numpy **oracle** in
# [kimi_ref/oracle/](../kimi_ref/oracle/) (slow, obvious, the definition), the readable **torch**
# model, and fast **Triton** kernels. The tests prove them equal. The architecture document
# ([docs/architecture.md](../docs/architecture.md)) draws the path of one token through the code.
#
# The chapters do not paste code: they call `show` from [chapters/show_code.py](show_code.py), which
# reads the current source of a function out of its file and displays it, with the file and line
# numbers, next to the text that explains it.

# %% [markdown]
# ## The checkpoint decides
#
# No number in `kimi_ref` comes from memory: everything is read from the checkpoint's
# `config.json`. The package ships a config written from the real K2.5 one (K2.7-Code has the same
# shape), so we can look at the full-size model without downloading 595 GB.

# %%
from collections import Counter

import matplotlib.pyplot as plt

from kimi_ref.checkpoint import expected_tensors
from kimi_ref.config import fixture_path, load_config

config = load_config(fixture_path("kimi_k25"))
print(f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads")
print(f"{config.n_routed_experts} routed experts, top {config.num_experts_per_tok}, "
      f"{config.n_shared_experts} shared; the first {config.first_k_dense_replace} layer(s) dense")
print(f"MLA: q_lora {config.q_lora_rank}, kv_lora {config.kv_lora_rank}, "
      f"head dims nope {config.qk_nope_head_dim} + rope {config.qk_rope_head_dim}, v {config.v_head_dim}")
print(f"context {config.max_position_embeddings:,} tokens, vocabulary {config.vocab_size:,}")

# %% [markdown]
# Every one of the 61 layers is the same pre-norm block: normalise, attend, add to the residual stream;
# normalise, run the MLP, add again. Here is the whole of it in the torch model:

# %%
from kimi_ref.config import KimiConfig
from kimi_ref.model import DecoderLayer
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

show(DecoderLayer.forward)

# %% [markdown]
# The MLP is a dense SwiGLU in the first `first_k_dense_replace` layers and a MoE block after them; the
# rule is DeepSeek's, read from the config:

# %%
show(KimiConfig.is_moe_layer)
print("MoE layers:", sum(config.is_moe_layer(layer) for layer in range(config.num_hidden_layers)),
      "of", config.num_hidden_layers)

# %% [markdown]
# ## Where the trillion parameters are
#
# `expected_tensors` lists every tensor the real checkpoint holds (208,550 of them) with its
# shape and dtype. An INT4 tensor (`weight_packed`, int32) holds 8 weights per element.

# %%
tensors = expected_tensors(config)
print(len(tensors), "tensors")


def group_of(name: str) -> str:
    if name.startswith(("vision_tower", "mm_projector")):
        return "vision"
    if ".experts." in name:
        return "routed experts (INT4)"
    if "shared_experts" in name:
        return "shared experts"
    if "self_attn" in name:
        return "attention (MLA)"
    if "embed_tokens" in name or "lm_head" in name:
        return "embedding + lm_head"
    if ".mlp." in name and ".gate." not in name:
        return "dense MLP (layer 0)"
    return "norms + router"


params, nbytes = Counter(), Counter()
bytes_per = {"BF16": 2, "F32": 4, "I32": 4}
for name, (shape, dtype) in tensors.items():
    count = 1
    for size in shape:
        count *= size
    if name.endswith("weight_shape"):
        continue
    nbytes[group_of(name)] += count * bytes_per[dtype]
    if name.endswith("weight_scale"):
        continue  # scales are metadata of the INT4 weights, not parameters
    params[group_of(name)] += count * (8 if name.endswith("weight_packed") else 1)

for group, count in params.most_common():
    print(f"{group:24s} {count / 1e9:8.2f} B params  {nbytes[group] / 1e9:8.2f} GB")
print(f"{'total':24s} {sum(params.values()) / 1e9:8.2f} B params  {sum(nbytes.values()) / 1e9:8.2f} GB")

# %%
fig, ax = plt.subplots(figsize=(7, 3))
groups = [g for g, _ in params.most_common()]
ax.barh(groups, [nbytes[g] / 1e9 for g in groups])
ax.set_xscale("log")
ax.set_xlabel("GB on disk (log scale)")
ax.set_title("Kimi K2.x checkpoint: bytes per component")
plt.tight_layout()
plt.show()

# %% [markdown]
# The routed experts are about 97% of the parameters, yet a token uses only 8 of 384 of them
# in each layer: that is why a trillion-parameter model costs about as much per token as a
# 32-billion-parameter dense one.
#
# ## Running it
#
# * `python -m kimi_ref.chat` talks to the small model embedded in the package, on CPU.
# * `python -m kimi_ref.chat --ckpt DIR --tp 8` runs the real checkpoint on 8 GPUs
#   ([docs/full_weight_run.md](../docs/full_weight_run.md)).
#
# ## Exercises
#
# 1. Write `active_parameters(config)`: how many parameters one token uses per forward pass
#    (attention, the dense layer, router, shared expert, the top-k routed experts, norms, the embedding
#    row it reads and the whole `lm_head`). How close is it to the "32B activated" of the model card?
# 2. Write `kv_cache_bytes(config, tokens, dtype_bytes=2)`: the bytes of MLA's latent cache for
#    `tokens` tokens, and compare with the cache a standard multi-head attention with the same heads
#    would need.
#
# Solutions: [chapters/solutions/00_overview.py](solutions/00_overview.py).

# %%
from importlib import import_module

overview = import_module("solutions.00_overview")  # chapters/solutions/, next to this notebook
print(f"active parameters per token: {overview.active_parameters(config) / 1e9:.1f} B")
print(f"latent cache for 262,144 tokens: {overview.kv_cache_bytes(config, 262_144) / 1e9:.1f} GB "
      f"vs {overview.mha_cache_bytes(config, 262_144) / 1e9:.0f} GB for plain multi-head attention")
