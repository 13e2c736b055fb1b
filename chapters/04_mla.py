# %% [markdown]
# # 04 — Multi-head Latent Attention
#
# Kimi K2.x has 64 attention heads of width 192 (128 "nope" + 64 rotary) for queries and keys and 128
# for values. Ordinary multi-head attention would cache 64 · (192 + 128) = 20,480 numbers per token per
# layer. MLA caches **576**: one 512-wide latent from which every head's key and value are *computed*,
# plus one 64-wide rotary key shared by all heads.
#
# Code: [kimi_ref/mla.py](../kimi_ref/mla.py) (torch, both forms, the KV cache), the float64 twin
# [kimi_ref/oracle/mla.py](../kimi_ref/oracle/mla.py), tests [tests/test_mla.py](../tests/test_mla.py).
# RoPE and the softmax scale come from chapter 03 ([kimi_ref/rope.py](../kimi_ref/rope.py)).
#
# Per token (c = kv_lora_rank 512, r = 64, n = 128, v = 128):
#
# ```
# q_nope, q_rope = q_b_proj(rms_norm(q_a_proj(x), eps=1e-6))      per head [n | r]
# latent, k_rope = kv_a_proj_with_mqa(x)                           [c | r]
# latent         = rms_norm(latent, eps=1e-6)                      <- cached
# k_rope         = rope(k_rope, pos)                               <- cached
# W_uk [h,n,c], W_uv [h,v,c] = kv_b_proj.weight split per head    (MLA.split_kv_b)
# ```

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.mla import MLA, KVCache
from kimi_ref.oracle import mla as omla
from kimi_ref.rope import softmax_scale
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

config = load_config(fixture_path("kimi_k25"))
tiny = tiny_config(config, vision=False)
torch.set_grad_enabled(False)  # inference only in this chapter
print(f"tiny: d {tiny.hidden_size}, heads {tiny.num_attention_heads}, c {tiny.kv_lora_rank}, "
      f"n {tiny.qk_nope_head_dim}, r {tiny.qk_rope_head_dim}, v {tiny.v_head_dim}")

# %% [markdown]
# The module's forward is the recipe above line for line: project the query, compress the key/value
# input into the latent, turn the rotary parts, then attend in one of two forms.

# %%
show(MLA.forward)
show(MLA.split_kv_b)

# %% [markdown]
# ## Two forms, one function
#
# **Naive**: build every head's key `[W_uk·latent | k_rope]` and value `W_uv·latent`, then run ordinary
# attention. **Absorbed**: since `q_nope · (W_uk latent) = (W_ukᵀ q_nope) · latent`, move W_uk into the
# query and attend straight to the latent; apply W_uv after the weighted sum. Same parameters, same
# numbers, very different cache.

# %%
show(MLA.attend_naive)

# %% [markdown]
# The absorbed form caches only `latent` and `k_rope`; its scores and its weighted sum both run over the
# latent (the decode kernel of chapter 12 does the same for one new token):

# %%
from kimi_ref import mla

show(MLA.attend_absorbed)
show(mla.absorbed_scores)
show(mla.mix_latents)

# %% [markdown]
# Both must equal the float64 oracle:

# %%
torch.manual_seed(0)
naive, absorbed = MLA(tiny, mode="naive"), MLA(tiny, mode="absorbed")
absorbed.load_state_dict(naive.state_dict())
x = torch.randn(2, 10, tiny.hidden_size)
weights = {k: v.double().numpy() for k, v in naive.state_dict().items()}
oracle = omla.mla(x.double().numpy(), weights, tiny, np.arange(10), form="naive")
for module in (naive, absorbed):
    err = np.abs(module(x).double().numpy() - oracle).max() / np.abs(oracle).max()
    print(f"{module.mode:8}: relative error vs float64 oracle {err:.1e}")
print(f"softmax scale: {softmax_scale(tiny):.7f} = qk_head_dim^-0.5 · mscale² (never (c+r)^-0.5, even absorbed)")

# %% [markdown]
# ## Incremental decoding with the cache
#
# A cache is allocated once for `max_len` tokens. Each call appends its T new tokens, and query t
# sees keys up to its own position. Prefill 6 tokens, then decode 4 one at a time: the same result
# as one forward over all 10.

# %%
cache = absorbed.new_cache(batch=2, max_len=16)
steps = [absorbed(x[:, :6], cache=cache)] + [absorbed(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
print("cache length:", cache.length, " max |prefill+decode − full|:", float((torch.cat(steps, 1) - absorbed(x)).abs().max()))
print({name: tuple(t.shape) for name, t in cache.tensors.items()}, "values per token:", cache.values_per_token())

# %% [markdown]
# ## What the cache costs at full size
#
# The full K2.5 module on PyTorch's `meta` device (shapes, no memory) tells us the exact bytes per
# token of both caches in bf16, over all 61 layers:

# %%
per_token = {}
for mode in ("naive", "absorbed"):
    layer = MLA(config, mode=mode, dtype=torch.bfloat16, device="meta")
    full_cache = KVCache([layer.new_cache(1, 1) for _ in range(config.num_hidden_layers)])
    per_token[mode] = full_cache.bytes_per_token()
    print(f"{mode:8}: {per_token[mode]:>10,} bytes per token ({full_cache[0].values_per_token():,} values per layer)")
print(f"ratio {per_token['naive'] / per_token['absorbed']:.1f}x")

contexts = np.array([1_024, 8_192, 32_768, 131_072, 262_144])
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for mode, label in (("naive", "MHA-equivalent (naive)"), ("absorbed", "MLA latent (absorbed)")):
    ax.loglog(contexts, contexts * per_token[mode] / 2**30, marker="o", label=label)
ax.axhline(80e9 / 2**30, color="gray", lw=0.8)
ax.text(contexts[0], 90, "one 80 GB GPU", fontsize=8)
ax.set_xlabel("context (tokens)"); ax.set_ylabel("KV cache per sequence (GiB, bf16)")
ax.set_title("Kimi K2.x, 61 layers"); ax.legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# At the full 262,144-token context one sequence needs about 17 GiB of latent cache, against about
# 610 GiB for the MHA-equivalent one: the absorbed form is what makes long context possible at all.
#
# ## QK-Clip: watching the largest logit
#
# Kimi was trained with MuonClip, which rescales W_q/W_k of a head whenever its largest pre-softmax
# logit exceeds a threshold. `track_max_logit=True` makes the module record that number per head,
# where both forms turn scores into probabilities:

# %%
show(MLA.probabilities)

# %%
absorbed.track_max_logit = True
absorbed(x)
print("largest scaled logit per head:", absorbed.max_logit.numpy().round(3))
absorbed.track_max_logit = False

# %% [markdown]
# ## Exercises
#
# 1. Write `cache_bytes(config, context, mode, bytes_per_value=2, batch=1)` for the whole model and check
#    it against `KVCache.bytes_per_token()`. How many 262,144-token sequences fit in the latent cache of
#    8 × 80 GB next to 595 GB of weights?
# 2. Write `absorbed_output_weight(mla)`: fold W_uv into o_proj, a [d, h·c] matrix, so the absorbed form
#    goes straight from the latent-space attention output to the hidden state.
# 3. Write `attention_flops_per_decode_token(config, context, mode)`. The absorbed form does *more*
#    arithmetic per cached token (c + r + c against n + r + v per head). Why is it still faster at decode?
#
# Solutions: [chapters/solutions/04_mla.py](solutions/04_mla.py) (tested in `tests/test_mla.py`).
