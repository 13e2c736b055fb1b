# %% [markdown]
# # 09 — Generation: prefill, decode, sample, stop
#
# A language model only ever answers one question: *given these tokens, how likely is each next
# token?* Generation asks it over and over. This chapter builds the loop that
# `python -m kimi_ref.chat` runs, one step at a time:
#
# 1. **render** the conversation into prompt ids (chapter 02),
# 2. **prefill**: one forward over the whole prompt fills the KV cache and gives the first logits,
# 3. **sample** a token from the last row of logits (temperature 1.0, top-p 0.95: the model card's defaults),
# 4. **decode**: feed that one token, reading everything earlier from the cache; repeat from 3,
# 5. **stop** at `<|im_end|>`, at `--max-new-tokens`, or when the context is full,
# 6. **parse** the stream into reasoning, answer and tool calls as it arrives.
#
# Code: [kimi_ref/generate.py](../kimi_ref/generate.py) (the loop and sampling),
# [kimi_ref/chat.py](../kimi_ref/chat.py) (the CLI), [kimi_ref/tool_parsing.py](../kimi_ref/tool_parsing.py)
# (the stream parser), tests in [tests/test_generate.py](../tests/test_generate.py) and
# [tests/test_chat_cli.py](../tests/test_chat_cli.py).
#
# We use the embedded tiny checkpoint (real layout, random weights), so what it *says* is noise;
# how it says it is exactly what the 1T-parameter model does.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import kimi_ref
from kimi_ref.chat import default_checkpoint
from kimi_ref.chat_template import render, render_ids
from kimi_ref.config import fixture_path, load_config
from kimi_ref.generate import generate, make_generator, sample_next, stop_ids_for, top_p_filter
from kimi_ref.tokenizer import Tokenizer
from kimi_ref.tool_parsing import StreamParser

ckpt = default_checkpoint()
model = kimi_ref.load_model(ckpt, dtype=torch.float32, progress=False)
tok = Tokenizer.from_pretrained(ckpt)
config = model.config
print(f"{ckpt.name}: {config.num_hidden_layers} layers, d={config.hidden_size}, vocab {config.vocab_size}, "
      f"context {config.max_position_embeddings:,}")

# %% [markdown]
# ## 1. The prompt
#
# K2.7-Code's template ends the prompt with `<|im_assistant|>assistant<|im_middle|><think>`: the
# model's first token is already *inside* its reasoning. The control tokens are single ids; the text
# between them is BPE-encoded.

# %%
messages = [{"role": "user", "content": "What is 17*23?"}]
print(render(messages))
prompt = render_ids(messages, tok)
print(len(prompt), "ids:", prompt)

# %% [markdown]
# ## 2. Prefill
#
# The cache is allocated once for the longest sequence we will need. Each layer keeps, per token, the
# **normalized latent** (kv_lora_rank values) and the **roped key** (qk_rope_head_dim values), not
# per-head keys and values (chapter 04). One forward over the T prompt tokens writes T entries into
# every layer and returns logits for every position; only the last row predicts a *new* token.

# %%
max_new = 12
cache = model.new_cache(batch=1, max_len=len(prompt) + max_new)
with torch.inference_mode():
    logits = model(torch.tensor([prompt]), cache)
print("logits", tuple(logits.shape), "| cache length", cache.length, "of", cache.max_len,
      f"| {cache.bytes_per_token()} bytes per token "
      f"({config.num_hidden_layers} layers × ({config.kv_lora_rank} + {config.qk_rope_head_dim}) × 4 B)")

# %% [markdown]
# ## 3. Sampling
#
# `sample_next` turns the last row of logits into a token:
#
#     p = softmax(logits / temperature)            (temperature 0 → argmax, "greedy")
#     keep the fewest most-likely tokens whose mass reaches top_p
#     draw u ~ U[0, mass kept) and take the first token whose cumulative mass exceeds u
#
# It runs on the CPU in float64 with an explicit uniform draw from a seeded `torch.Generator`, so a
# seed means the same tokens on any device and any number of TP ranks. The plot shows what the
# temperature does to the tiny model's next-token distribution, and where top-p cuts it.

# %%
last = logits[0, -1].double()
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
for ax, temperature in zip(axes, (0.5, 1.0, 2.0)):
    p = torch.softmax(last / temperature, -1)
    ranked = p.sort(descending=True).values[:60]
    kept = int((top_p_filter(p, 0.95) > 0).sum())
    ax.bar(range(len(ranked)), ranked.numpy(), color=["C0" if i < kept else "C7" for i in range(len(ranked))])
    ax.set_title(f"temperature {temperature}: top-p 0.95 keeps {kept} of {len(p)}")
    ax.set_xlabel("tokens, most likely first")
axes[0].set_ylabel("probability")
plt.tight_layout()
plt.show()

# %%
g = make_generator(seed=0)
print("greedy:", int(sample_next(logits[:, -1], temperature=0)[0]),
      "| sampled (seed 0):", [int(sample_next(logits[:, -1], 1.0, 0.95, g)[0]) for _ in range(5)])

# %% [markdown]
# ## 4. Decode, one token at a time
#
# Each step feeds a single token. Its position is `cache.length` (RoPE needs it), it attends over
# everything cached, and it appends its own latent. The loop below is `generate()` with the
# bookkeeping stripped away. Then we check the cache against the definition: one full forward over
# the whole sequence must give the same last-row logits at every step.

# %%
tokens, step_logits = [], []
next_logits = logits[:, -1]
for step in range(max_new):
    token = int(sample_next(next_logits, temperature=0)[0])
    tokens.append(token)
    step_logits.append(next_logits[0])
    with torch.inference_mode():
        next_logits = model(torch.tensor([[token]]), cache)[:, -1]
    print(f"step {step:2d}: token {token:5d} {tok.decode([token])!r:24} cache length {cache.length}")

with torch.inference_mode():
    full = model(torch.tensor([prompt + tokens]))[0]
worst = max(float((a - full[len(prompt) - 1 + k]).abs().max()) for k, a in enumerate(step_logits))
print(f"largest difference, cached decode vs full forward: {worst:.2e}")
assert worst < 1e-4

# %% [markdown]
# The cache turns each step from a forward over the whole sequence (quadratic attention, and every
# weight read for every token) into a forward over one token. Timing the two on the tiny model:

# %%
def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


lengths = [16, 64, 256, 512]
with_cache, without = [], []
for n in lengths:
    ids = torch.randint(0, 3000, (1, n))
    c = model.new_cache(1, n + 1)
    with torch.inference_mode():
        model(ids, c)
        with_cache.append(timed(lambda: (setattr(c, "length", n), model(ids[:, -1:], c))))
        without.append(timed(lambda: model(ids)))
plt.figure(figsize=(5, 3.2))
plt.plot(lengths, np.array(without) * 1e3, "o-", label="no cache: whole sequence again")
plt.plot(lengths, np.array(with_cache) * 1e3, "o-", label="latent cache: one token")
plt.xlabel("tokens so far")
plt.ylabel("ms per new token")
plt.legend()
plt.title("one decode step, tiny model, CPU")
plt.show()

# %% [markdown]
# ## 5. Stopping, streaming and parsing
#
# `generate()` stops when the sampled token is a stop id: `<|im_end|>` (end of turn) and the config's
# `[EOS]`. It calls `on_token` after every token; the chat feeds each one to a
# `tool_parsing.StreamParser`, which hands back *deltas*: reasoning text, answer text, tool-call names
# and argument fragments, each as soon as it is certain. Text that might be the start of a marker is
# held back until the next token decides. A random model never closes its `<think>`, so everything
# below is reasoning; see the scripted checkpoints in `tests/test_chat_cli.py` for models that answer
# and call tools.

# %%
parser = StreamParser(tok)
deltas = []
result = generate(model, prompt, max_new_tokens=20, seed=1, stop_ids=stop_ids_for(tok, config),
                  on_token=lambda t: deltas.extend(parser.feed([t])))
deltas += parser.finish()
print(result.finish_reason, "after", len(result.tokens), "tokens;",
      f"prefill {result.prefill_seconds * 1e3:.1f} ms, decode {result.decode_tokens_per_second:.0f} tok/s")
print(deltas[:4])
print(parser.result()["problems"])

# %% [markdown]
# ## 6. The real model's cache
#
# Why MLA matters for generation: with the real config, the absorbed cache holds
# 61 × (512 + 64) bf16 values per token, about 69 KiB. The MHA-equivalent cache (what naive mode, or a
# plain multi-head model of the same shape, keeps) holds every head's key (128 + 64) and value (128).

# %%
real = load_config(fixture_path("kimi_k25"))
per_token_latent = real.num_hidden_layers * (real.kv_lora_rank + real.qk_rope_head_dim) * 2
per_token_mha = real.num_hidden_layers * real.num_attention_heads * (real.qk_head_dim + real.v_head_dim) * 2
context = np.linspace(0, real.max_position_embeddings, 9)
plt.figure(figsize=(5, 3.2))
plt.plot(context / 1024, per_token_mha * context / 2**30, label=f"per-head K/V ({per_token_mha / 2**20:.1f} MiB/token)")
plt.plot(context / 1024, per_token_latent * context / 2**30, label=f"MLA latent ({per_token_latent / 2**10:.0f} KiB/token)")
plt.xlabel("context (K tokens)")
plt.ylabel("GiB per sequence")
plt.yscale("log")
plt.legend()
plt.title("KV cache of one sequence, Kimi K2.x, bf16")
plt.show()

# %% [markdown]
# ## Try it
#
#     python -m kimi_ref.chat --prompt "What is 17*23?" --max-new-tokens 32 --seed 0
#     python -m kimi_ref.chat --temperature 0 --tools demo          # REPL; /reset, /exit, Ctrl-C stops a turn
#
# ## Exercises
#
# Solutions: [chapters/solutions/09_generate.py](solutions/09_generate.py), tested in
# `tests/test_generate.py`.
#
# 1. **min-p.** Write `min_p_filter(probs, min_p)` that keeps the tokens at least `min_p` times as
#    likely as the most likely one. How does its cut differ from top-p on a flat distribution?
# 2. **No cache.** Write `generate_without_cache(model, prompt, max_new_tokens)` (greedy) that runs the
#    whole sequence every step, and check it returns the same tokens as `generate(..., temperature=0)`.
# 3. **Cache bytes.** Write `cache_bytes(config, tokens, bytes_per_value)` for the absorbed cache and
#    check it against `model.new_cache(1, n).bytes_per_token()`. How long a context fits in 10 GB?
