# %% [markdown]
# # 13 — kimi-nano: training a Kimi in miniature
#
# A random checkpoint proves the plumbing but says nothing. **kimi-nano** is the same architecture
# — MLA with YaRN RoPE, a sigmoid-routed MoE with a shared expert and the aux-loss-free bias, INT4
# experts, the real chat template with `<think>` and kimi_k2 tool calls — at 128 wide and 4 layers,
# trained from scratch on this machine's CPU. It ships inside the package and is what
# `python -m kimi_ref.chat` talks to when you give it no checkpoint.
#
# The pieces:
#
# * the data: [weights_tools/nano_data.py](../weights_tools/nano_data.py) — generated conversations in the
#   real K2.7-Code format (arithmetic, unit conversions, calculator calls, follow-ups, chit-chat),
#   with the loss only on what the assistant wrote;
# * the optimizer: [kimi_ref/muonclip.py](../kimi_ref/muonclip.py) — Muon for the matrices, AdamW for the
#   rest, and QK-Clip;
# * the loop: [weights_tools/train_nano.py](../weights_tools/train_nano.py); the grader:
#   [weights_tools/nano_eval.py](../weights_tools/nano_eval.py).

# %%
import json

import matplotlib.pyplot as plt
import torch

from kimi_ref.chat import default_checkpoint
from kimi_ref.chat_template import render
from weights_tools import nano_data, train_nano

torch.set_num_threads(1)
example = nano_data.example(3)
print(example.kind)
print(render(example.messages, tools=nano_data.TOOLS, variant=nano_data.VARIANT, add_generation_prompt=False))

# %% [markdown]
# ## What is trained on
#
# `nano_data.encode` returns the ids and a mask: 1 exactly on the tokens the assistant produced —
# after the generation prompt `<|im_assistant|>assistant<|im_middle|><think>` up to and including
# its `<|im_end|>`. The tool's result and the user's words are context, never targets.

# %%
from kimi_ref.tokenizer import Tokenizer

tok = Tokenizer.demo()
ids, mask = nano_data.encode(example.messages, tok)
trained = "".join(tok.decode([i]) if m else "·" for i, m in zip(ids, mask))
print(f"{len(ids)} tokens, {sum(mask)} trained; untrained tokens shown as '·':\n")
print(trained[-400:])

# %% [markdown]
# ## Muon vs AdamW
#
# Muon replaces each matrix's momentum by its nearest orthogonal matrix (five Newton–Schulz
# iterations), scaled so its RMS matches an AdamW update (`0.2·√max(m, n)`), which lets both share
# one learning rate. Embeddings, `lm_head` and the norms stay with AdamW. A short race on the toy
# config (the same code as the real run, fewer steps):

# %%
toy = train_nano.nano_config(toy=True)
runs = {}
for name, optimizer, tau in [("AdamW", "adamw", None), ("Muon (no clip)", "muonclip", None),
                             ("MuonClip τ=10", "muonclip", 10.0)]:
    _, runs[name] = train_nano.train(toy, steps=40, batch_size=8, optimizer=optimizer, tau=tau, log_every=2,
                                     progress=lambda line: None)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, log in runs.items():
    ax1.plot(log["step"], log["loss"], label=name)
    ax2.plot(log["step"], [max(max(h) for h in layers) for layers in log["max_logit"]], label=name)
ax1.set(xlabel="step", ylabel="loss", title="toy model: loss")
ax2.set(xlabel="step", ylabel="max attention logit", title="largest scaled q·k logit, any head")
ax2.axhline(10, color="grey", ls=":")
ax1.legend(), ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## QK-Clip
#
# Attention logits can grow without bound during training; in Kimi K2's training some heads' logits
# ran away, and the report's fix is QK-Clip (arXiv 2507.20534): after each step, for every head whose
# largest logit `S` exceeded `τ`, scale that head's query and key weights by `γ = τ/S` split between
# them — √γ on the per-head no-position parts of q and k, γ on the head's rotary query part — and
# **never** the rotary key, which is one head shared by all heads (scaling it for one head would
# change every head). At full scale τ = 100. The orange and green curves above show the clip at
# work on the toy model (τ = 10 there, so that it bites within 40 steps): the logged maximum is the
# one seen *before* each step's clip.
#
# The real run's log ships with the model:

# %%
nano = default_checkpoint()
log = json.loads((nano / "train_log.json").read_text())
steps = log["step"]
heads = torch.tensor(log["max_logit"])  # [logged steps, layers, heads]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(steps, log["loss"])
ax1.set(xlabel="step", ylabel="loss", yscale="log", title=f"kimi-nano ({log['config']['optimizer']}, "
        f"τ = {log['config']['tau']})")
for layer in range(heads.shape[1]):
    ax2.plot(steps, heads[:, layer].amax(-1), label=f"layer {layer}")
ax2.axhline(log["config"]["tau"], color="grey", ls=":", label="τ")
ax2.set(xlabel="step", ylabel="max logit (any head)", title="per-layer max attention logit")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Talking to it
#
# `nano_eval.play` runs one conversation the way the chat CLI does: render with the real template,
# generate greedily to `<|im_end|>`, parse the kimi_k2 tool call, run the calculator, feed the
# result back, generate again.
#
# Be warned: the kimi-nano shipped today is an early model
# ([kimi_ref/data/nano/README.md](../kimi_ref/data/nano/README.md)). It thinks, calls the calculator
# in perfect kimi_k2 form and reads the result back — but it has not yet learned to *copy* the numbers
# of the question, so the numbers it sends are wrong. Copying a rare token from far back is exactly the
# kind of circuit a small model finds late; exercise 3 asks you to find out what it needs.

# %%
import kimi_ref
from weights_tools import nano_eval

model = kimi_ref.load_model(nano, dtype=torch.float32, progress=False)
nano_tok = Tokenizer.from_pretrained(nano)
history, calls = nano_eval.play(model, nano_tok, ["What is 17*23?"])
for message in history:
    print(f"[{message['role']}]", {k: v for k, v in message.items() if k != "role"})

# %% [markdown]
# ## Exercises
#
# 1. Write `clip_factor(max_logit, tau)`: the per-head γ of QK-Clip (1 where the head is under τ), and
#    `split(gamma)`: the factors applied to (q_nope, k_nope, q_rope, k_rope).
# 2. Write `trained_fraction(messages, tokenizer)`: the share of a conversation's tokens that carry
#    a loss. Compare a calculator conversation with chit-chat: which parts of each carry no loss, and why?
# 3. (Open) Train with `python -m weights_tools.train_nano OUT --steps ...` and grade with
#    `python -m weights_tools.nano_eval OUT`: how many steps, what latent width or weight decay does the
#    model need before it copies numbers? Plot the loss on number tokens alone.
#
# Solutions: [chapters/solutions/13_kimi_nano.py](solutions/13_kimi_nano.py).

# %%
from importlib import import_module

solutions = import_module("solutions.13_kimi_nano")
print(solutions.clip_factor(torch.tensor([50.0, 200.0]), 100.0), solutions.split(torch.tensor(0.25)))
print(f"{solutions.trained_fraction(example.messages, tok):.2f} of this {example.kind} conversation is trained")
