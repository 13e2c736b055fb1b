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
# 6. **parse** the stream into reasoning, answer and tool calls as it arrives,
# 7. and **serve** all of it to the official `openai` client, as vLLM serves the real model.
#
# Code: [kimi_ref/generate.py](../kimi_ref/generate.py) (the loop and sampling),
# [kimi_ref/chat.py](../kimi_ref/chat.py) (the CLI), [kimi_ref/tools.py](../kimi_ref/tools.py) (its demo
# tools: a calculator and a clock), [kimi_ref/tool_parsing.py](../kimi_ref/tool_parsing.py)
# (the stream parser), [kimi_ref/serve/](../kimi_ref/serve/) (the OpenAI-compatible server, section 7), tests in
# [tests/test_generate.py](../tests/test_generate.py), [tests/test_chat_cli.py](../tests/test_chat_cli.py) and
# [tests/test_serve.py](../tests/test_serve.py).
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
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

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
show(sample_next)
show(top_p_filter)

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
# and call tools. The whole loop, with tensor parallelism (rank 0 samples and broadcasts) and images
# (chapter 11) included:

# %%
show(generate)

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
# ## 7. The same model behind an OpenAI-compatible server
#
# Kimi's model cards show every use through the official `openai` client, talking to a server such as
# vLLM. `python -m kimi_ref.serve` is that server for this project ([docs/serving.md](../docs/serving.md)):
# each request is rendered with the chat template, generated with the loop above, and parsed by the
# stream parser into `reasoning_content`, `content` and `tool_calls`. Requests run one at a time from a
# bounded queue. Here we start it inside the notebook, in background threads, on a free port, serving
# the model already loaded above, and talk to it exactly as a notebook would talk to a real deployment.

# %%
from openai import OpenAI

from kimi_ref.serve import start

server = start(ckpt, model=model)  # 127.0.0.1, a free port; python -m kimi_ref.serve is the command line
client = OpenAI(base_url=server.base_url, api_key="none")
print(server.base_url, [m.id for m in client.models.list().data])

# %% [markdown]
# The model card's first example: a system prompt, a question, and an answer whose reasoning comes back
# in its own field. kimi-nano knows only the little world of arithmetic it was trained on (chapter 13), so
# what it says here is noise; the tool loop below is what it was made for. `seed` makes it repeatable (tests/test_serve.py checks that the chat CLI, given the same
# conversation and seed, writes the same tokens).

# %%
response = client.chat.completions.create(
    model="kimi-nano", max_tokens=40, seed=1,
    messages=[{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
              {"role": "user", "content": "which one is bigger, 9.11 or 9.9? think carefully."}])
message = response.choices[0].message
print("reasoning:", message.reasoning_content)
print("answer:   ", message.content)
print(response.choices[0].finish_reason, response.usage.model_dump(exclude_none=True))

# %% [markdown]
# Streamed, the same answer arrives as deltas (server-sent events), reasoning first. Joined up they are
# the answer above.

# %%
pieces = {"reasoning_content": [], "content": []}
for chunk in client.chat.completions.create(
        model="kimi-nano", max_tokens=40, seed=1, stream=True,
        messages=[{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
                  {"role": "user", "content": "which one is bigger, 9.11 or 9.9? think carefully."}]):
    delta = chunk.choices[0].delta
    for key in pieces:
        text = getattr(delta, key, None) or (delta.model_extra or {}).get(key)
        if text:
            pieces[key].append(text)
print(len(pieces["reasoning_content"]) + len(pieces["content"]), "deltas, e.g.", pieces["reasoning_content"][:6])
assert "".join(pieces["reasoning_content"]) == message.reasoning_content
assert "".join(pieces["content"]) == message.content

# %% [markdown]
# A K2-Thinking-style tool loop: the model asks for the calculator (a kimi_k2 call, id
# `functions.calculator:0`, JSON arguments), we run it and send the result back with the assistant
# message *including its reasoning* (K2.7-Code keeps earlier reasoning in the prompt), and it answers.

# %%
from kimi_ref.chat import checkpoint_tools
from kimi_ref.tools import run_tool

tools = checkpoint_tools(ckpt)  # the calculator kimi-nano was trained with
messages = [{"role": "user", "content": "What is 17*23?"}]
for _ in range(3):
    reply = client.chat.completions.create(model="kimi-nano", messages=messages, tools=tools,
                                           temperature=0, max_tokens=64)
    said = reply.choices[0].message
    messages.append(said.model_dump(exclude_none=True))
    print(f"[{reply.choices[0].finish_reason}] reasoning: {said.reasoning_content!r} content: {said.content!r}")
    if reply.choices[0].finish_reason != "tool_calls":
        break
    for call in said.tool_calls:
        result = run_tool(call.model_dump(), lambda question: "", ["calculator"])
        print(f"    {call.id} {call.function.arguments} -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": result})

# %% [markdown]
# Images travel as `image_url` content parts, here a base64 `data:` URL (the server never downloads a
# remote URL). The usage counts the image as the rows MoonViT gives it. And a request the server cannot
# take gets OpenAI's error shape, naming the field, while the server goes on.

# %%
import base64
import io

import openai
from PIL import Image

buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
seen = client.chat.completions.create(model="kimi-nano", max_tokens=16, seed=0, messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "What is in the picture?"}]}])
print("prompt tokens with the image:", seen.usage.prompt_tokens)
try:
    client.chat.completions.create(model="kimi-nano", messages=[
        {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "functions.calculator:0", "content": "2"}])
except openai.BadRequestError as error:
    print(error.status_code, error.body)
server.stop()

# %% [markdown]
# ## Try it
#
#     python -m kimi_ref.chat --prompt "What is 17*23?" --max-new-tokens 32 --seed 0
#     python -m kimi_ref.chat --temperature 0 --tools demo          # REPL; /reset, /exit, Ctrl-C stops a turn
#     python -m kimi_ref.serve --port 8000                          # then OpenAI(base_url="http://127.0.0.1:8000/v1")
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
