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
#   real K2.7-Code format (arithmetic, unit conversions, calculator calls, follow-ups, chit-chat) in many
#   phrasings, with the loss only on what the assistant wrote;
# * the optimizer: [kimi_ref/muonclip.py](../kimi_ref/muonclip.py) — Muon for the matrices, AdamW for the
#   rest, and QK-Clip;
# * the loop: [weights_tools/train_nano.py](../weights_tools/train_nano.py); the grader:
#   [weights_tools/nano_eval.py](../weights_tools/nano_eval.py), on held-out phrasings and on questions
#   written by hand ([tests/nano_questions.py](../tests/nano_questions.py)).

# %%
import json

import matplotlib.pyplot as plt
import torch

import kimi_ref
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
# ## The data: any phrasing, numbers up to six digits
#
# The mix (`nano_data.KINDS`): arithmetic 45% — operands of 1 to 6 digits, `+ - * /`, remainders,
# powers, square roots, percentages, negative numbers, decimals, parenthesised expressions —, unit
# conversions 17% (the factor recalled in the reasoning: "1 mile is 5280 feet, so I multiply 3 by
# 5280"), follow-ups 26% ("now add 9 to that": the call builds on the last result) and chit-chat 12%
# (a short answer, never a tool). Every number goes through the calculator, even `2+3`: the first
# kimi-nano spent 40% of its data memorizing the single-digit table and still missed some of it; a
# calculator call costs a few tokens and is always right.
#
# A question is a *core* ("1234 + 5678", "the product of 12 and 7", "subtract 250 from 1000") set in a
# *frame* ("What is {}?", "Could you compute {} for me?") with a random case and ending. The frames
# come in two families, and the held-out set is phrased **only** from the second, so its score measures
# phrasings the model never saw. The operator words are shared: a model trained from scratch knows no
# English beyond its data, so "take away" means minus only if some training question said so.
#
# What made held-out phrasings work is the other side of that remark: to this model an unknown word is
# noise, and a held-out question is mostly unknown words around numbers and an operator. So training
# questions come wrapped in words that carry nothing — openers ("Real quick,", "Homework:"), closers
# (", thanks"), asides ("My calculator is broken.") —, unit questions come in longer sentences ("We
# walked 12 miles. In feet, please."), and follow-ups are built from parts: a pronoun for the last
# result ("that", "it", "the total"), an operator phrase ("divide {p} by {c}", "{p} minus {c}") and a
# start or a frame. The model learns to read the numbers, the operator word and the units wherever they
# sit, and to ignore the rest. Parts can combine into a held-out phrasing by chance, so a training
# conversation whose question has the *template* of a held-out one (numbers, case and punctuation taken
# out: `nano_data.template`) is drawn again. The held-out set itself never changes: a test pins its
# first 300 conversations by hash.

# %%
for split in nano_data.SPLITS:
    print(f"{split}: {len(nano_data.FRAMES[split]['noun'])} noun frames, {len(nano_data.FRAMES[split]['verb'])} verb frames")
    for i in range(6):
        print("   ", [m["content"] for m in nano_data.example(i, split).messages if m["role"] == "user"])
print(nano_data.template("Divide it by 3, please."), "|", len(nano_data.heldout_templates()), "held-out templates")

# %% [markdown]
# ## Muon vs AdamW
#
# Muon replaces each matrix's momentum by its nearest orthogonal matrix (five Newton–Schulz
# iterations), scaled so its RMS matches an AdamW update (`0.2·√max(m, n)`), which lets both share
# one learning rate. Embeddings, `lm_head` and the norms stay with AdamW. A short race on the toy
# config (the same code as the real run, fewer steps):

# %%
# Muon's update direction, from kimi_ref/muonclip.py (chapters/show_code.py shows the current source):
# five Newton-Schulz steps push every singular value of the momentum towards 1.
from kimi_ref.muonclip import newton_schulz
from show_code import show

show(newton_schulz)

# %%
toy = train_nano.nano_config(toy=True)
runs = {}
for name, optimizer, tau in [("AdamW", "adamw", None), ("Muon (no clip)", "muonclip", None),
                             ("MuonClip τ=10", "muonclip", 10.0)]:
    # lr 1e-2, above the real run's 3e-3, so that the logits grow within 40 steps
    _, runs[name] = train_nano.train(toy, steps=40, batch_size=8, optimizer=optimizer, lr=1e-2, tau=tau,
                                     log_every=2, progress=lambda line: None)

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

# %%
# The clip itself, in kimi_ref/muonclip.py, after its input checks: γ = τ/S for the heads over τ; √γ on the
# no-position rows of q and k, γ on the rotary rows of q; the shared rotary key and the values untouched.
from kimi_ref.muonclip import qk_clip_
from show_code import show

show(qk_clip_, start="gamma = torch.ones_like")

# %% [markdown]
# ## What it took: copying numbers
#
# Almost every number kimi-nano writes is *copied*: from the question into its reasoning and its
# call, from the tool's result into its answer. The first kimi-nano (lr 1e-2, a demo vocabulary that
# merged digits the way Kimi's real one does: `845` was `8` + `45`) learned every format detail within
# a few hundred steps — thinking, the kimi_k2 call grammar, chit-chat — and then got 10% of the
# answers right. Two changes fixed it, and measuring them separately says which mattered:
#
# * **the learning rate.** At 1e-2 every layer's largest logit sat at τ = 100 from step 200 on
#   (QK-Clip cutting every step). At 3e-3 the logits stay near 50 (the plot above) and copying
#   appears after a few hundred steps — suddenly, the loss dropping in a step, the signature of an
#   induction circuit forming.
# * **the vocabulary.** The demo vocabulary is now trained with `train_bpe(..., split_digits=True)`.
#   At lr 1e-2 this was the difference between copying and not (merged digits: 4% of the digits inside
#   calls right after 300 steps; split: 74% after 600). At 3e-3, though, merged digits copy *sooner*
#   (89% vs 68% after 700 steps): see
#   [benchmarks/results/nano_digits_cpu.md](../benchmarks/results/nano_digits_cpu.md)
#   (`python benchmarks/bench_nano_digits.py`). The shipped nano was trained and graded with split
#   digits; whether merged ones would make a better finished nano is exercise 3.
#
# Last, the single-digit table had to be memorized fact by fact, so those questions got the largest
# share of that first data (at 15% of the data a nano got 38% of them right, at 40% 94%). The data
# above drops the table: every number goes to the calculator.

# %% [markdown]
# ## What it took, again: questions written by people
#
# That first kimi-nano scored 96% on its held-out set — whose questions came from the very templates
# and number sizes it was trained on. Asked as a newcomer would ask, it fell apart: "Compute 1234 +
# 5678." called `calculator("123+567")`, "hi" got `1 times 1 is 0.`, a literal `</think>` leaked into
# answers. Graded the same way (greedy, the real tool loop) on the new held-out set and on the 52
# questions written by hand in [tests/nano_questions.py](../tests/nano_questions.py):
#
# | kimi-nano | data | steps × batch | CPU time | held-out: answer · call · well formed | hand-written: answer · call · well formed |
# |---|---|---|---:|---|---|
# | the first | one family of templates, numbers up to 3 digits, 40% single-digit table | 2400 × 16 | 39 min wall | 3.6 · 3.6 · 68% | 34.9 · 23.3 · 73% |
# | the second | two families, 1–6 digits, every operation, no table | 1700 × 16 | 24 min | 81.9 · 84.3 · 100% | 93.0 · 97.7 · 100%\* |
# | tried | the second, a quarter of the numbers round (1000, 2500, 999999) | 2000 × 16 | 27 min | 73.5 · 74.7 · 100%\*\* | 95.3 · 97.7 · 100%\* |
# | tried | the second + words that mean nothing, composed follow-ups, longer unit sentences ("the newest") | 2400 × 16 | 30 min | 97.6 · 97.6 · 100% | 93.0 · 95.3 · 100% |
# | tried | the same | 3000 × 16 | 42 min | 95.2 · 96.4 · 99% | 95.3 · 95.3 · 100% |
# | tried | the same | 3600 × 16 | 47 min | 95.2 · 94.0 · 97% | 97.7 · 100 · 100% |
# | tried | the newest + small-to-big units 45%, separators 20%, round results 5% | 2400 × 16 | 32 min | 95.2 · 96.4 · 97% | 93.0 · 93.0 · 100% |
# | tried | the same | 3000 × 16 | 41 min | 92.8 · 92.8 · 99% | 95.3 · 97.7 · 100% |
# | tried | the newest; 5 layers (one more MoE layer) | 2400 × 16 | 40 min | 90.4 · 91.6 · 100% | 93.0 · 93.0 · 100% |
# | tried | the newest; rotary part 32 wide per head (was 16) | 2400 × 16 | 35 min | 91.6 · 94.0 · 99% | 93.0 · 93.0 · 100% |
# | tried | the newest; learning rate falling to 0, not to a tenth | 2400 × 16 | 31 min | 92.8 · 97.6 · 99% | 97.7 · 100 · 100% |
# | **shipped** | the newest; the mean of the weights after each of the last 240 updates | 2400 × 16 | 32 min | **95.2 · 95.2 · 100%** | **95.3 · 95.3 · 100%** |
# | tried | the same, seed 1: the last update's weights | 2400 × 16 | 32 min | 91.6 · 91.6 · 100% | 97.7 · 97.7 · 100% |
# | tried | the same, seed 1: the mean of the last 240 updates | 2400 × 16 | 32 min | 94.0 · 94.0 · 99% | 100 · 100 · 100% |
# | tried | the same, seed 2: the last update's weights | 2400 × 16 | 32 min | 89.2 · 91.6 · 98% | 90.7 · 93.0 · 100% |
# | tried | the same, seed 2: the mean of the last 240 updates | 2400 × 16 | 32 min | 89.2 · 92.8 · 98% | 93.0 · 95.3 · 100% |
#
# (INT4 as shipped; 100 held-out conversations, 52 hand-written questions. The shipped row and the seeds'
# second rows write the mean of the last 240 updates, every other row its last update's weights. \*On the
# list before three unit questions got numbers the newest training data never asks. \*\*On its own
# held-out set, which had the round numbers too.)
#
# The second kimi-nano had the phrasing families and the numbers, and still failed held-out
# *follow-ups* (48% right: "Divide it by 3, please." became `304025-3`): a phrase it never saw attached
# to a result was read as the operator it had seen most. More steps made that worse. What fixed it was
# data that teaches the model what to ignore — the words that mean nothing, the composed follow-ups
# (the section on the data above) — and held-out follow-ups went to 100%.
#
# Two lessons from the rows between. Longer runs learn the hand-written questions better and the
# held-out phrasings worse, and now and then break the format (3600 steps typed a `</think>` into its
# answer to "Good night"): with one data set, the number of steps trades memory of the training
# phrasings against reading new ones. And aiming data at three hand-written misses (more small-to-big
# units, more thousands separators, round results like 999999+1) fixed none of them and cost held-out
# points: a few questions move between runs either way — with 83 graded answers one question is 1.2
# points. The newest data's 2400-step run kept every output well formed and got 97.6% of the held-out
# answers, but was one question short of 95% on the hand-written ones (40 of 43). Its misses are
# instructive: a run of one digit copied (`999999+1 = 10000000.`: attention finds *which* digit to copy
# by content, and six 0s in a row all look alike), a thousands separator read as a digit
# (`1,500 + 2,500` sent as `1500+25500`), and small-to-big units multiplied instead of divided.
#
# The next three rows change the model or its schedule, not the data. A bigger model (a fifth layer,
# or twice the rotary width) lost 6 to 7 held-out points and fixed no hand-written miss: more room to
# memorize the training phrasings is not more reading of new ones. A learning rate that falls all the
# way to 0 settled the unit factors and every hand-written question but one — and then copied long
# tool results worse: `373.77777777777777` came back as `373.7777777777777`, and once a
# `48380.3999…` ran on in 9s to the token limit. Copying a run of one token is the nano's weak spot in
# every run; which questions fall into it moves from run to run.
#
# What shipped is the same 2400-step run with one change at the end. Each of the last updates still moves
# the weights by the noise of one batch of 16, so the checkpoint is the *mean* of the weights after each
# of the last 240 updates (a tail average: `train_nano.TailAverage`, `--average-last 0.1`). The idea came
# from the test sets, and that belongs in the lesson: the mean of that run's last two snapshots got
# `999999+1` right. With the mean of all 240 as the default, seed 0 meets every bar of issue 17 at once,
# by one question on each set (79 of 83, 41 of 43): it lost two held-out answers and gained one
# hand-written. Seeds 1 and 2 of the same recipe say how far to trust that: the average gained one
# hand-written answer in each, and 2 and 0 held-out answers; neither meets the held-out bar (94.0% and
# 89.2%), and both break an output or two. The seed moves held-out answers from 89 to 98% (with the
# average or without), more than the average does. The shipped scores belong to this run — seed 0, the
# default before any of this — not to the recipe.
#
# The plot: held-out accuracy along the shipped run (each update's own weights, fp32 snapshots every
# 240 steps, experts before INT4, 40 conversations: `nano_curve_shipped.json`; the star is the shipped
# checkpoint, the mean of the last 240 updates) against the second kimi-nano's run on the
# data before (every 170 steps of its 1700, the same 40 conversations: `nano_curve.json`), with the
# first kimi-nano as crosses. The open squares are finished runs of other lengths on the newest data
# (as stored, INT4, 100 conversations; each has its own learning-rate schedule, so they are endpoints,
# not points of one curve; `nano_runs.json` holds them and the other runs of the table).
# `python benchmarks/bench_nano_curve.py` makes the three files. Up to 1700 steps the two data sets
# teach the held-out set at the same pace; the second data's run ends there, and more steps on that
# data made its follow-ups worse; on the newest data the answers keep climbing, to 97% at 2400 (on 40
# conversations; the star's 95% is on all 100).

# %%
from pathlib import Path

results = Path(kimi_ref.__file__).resolve().parents[1] / "benchmarks/results"
curve = json.loads((results / "nano_curve.json").read_text())
runs = json.loads((results / "nano_runs.json").read_text())
shipped = json.loads((results / "nano_curve_shipped.json").read_text())
fig, ax = plt.subplots(figsize=(10, 4.4))
for key, label, color in (("answer", "right final answer", "C0"), ("tool_call", "right calculator calls", "C1"),
                          ("well_formed", "well-formed output", "C2")):
    ax.plot(curve["steps"], curve["scores"][key], marker="o", color=color, alpha=0.4, linestyle="--",
            label=f"second data, one run: {label}")
    ax.plot(shipped["steps"], shipped["scores"][key], marker=".", color=color,
            label=f"newest data, the shipped run: {label}")
    newest = sorted((r["steps"], r["scores"][key]) for r in runs["finished"] if r["checkpoint"].startswith("v2"))
    ax.scatter(*zip(*newest), marker="s", edgecolors=color, facecolors="none",
               label=f"newest data, finished runs of other lengths: {label}")
    tail = next(r for r in runs["finished"] if r["checkpoint"] == "tail_2400")
    ax.scatter([tail["steps"]], [tail["scores"][key]], marker="*", s=90, color=color, zorder=3,
               label=f"shipped: mean of the last 240 updates: {label}")
old = curve["old_model"]
ax.scatter([old["steps"]] * 2, [old["scores"]["answer"], old["scores"]["tool_call"]], color="grey", marker="x",
           label=f"first data, {old['steps']} steps: answer / calls")
ax.set(xlabel="training step", ylabel="held-out score", ylim=(0, 1.02))
ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Talking to it
#
# `nano_eval.play` runs one conversation the way the chat CLI does: render with the real template,
# generate greedily to `<|im_end|>`, parse the kimi_k2 tool call, run the calculator, feed the
# result back, generate again.
#
# On the 100 held-out conversations the shipped kimi-nano gets 95% of the answers right and sends the
# right calculator calls 95% of the time; on the 52 hand-written questions 95% and 95%; every output
# is well formed on both
# ([kimi_ref/data/nano/README.md](../kimi_ref/data/nano/README.md) has the table).

# %%
from weights_tools import nano_eval

model = kimi_ref.load_model(nano, dtype=torch.float32, progress=False)
nano_tok = Tokenizer.from_pretrained(nano)
history, calls, problems = nano_eval.play(model, nano_tok, ["What is 1000 - 1?", "Now multiply that by 3."])
for message in history:
    print(f"[{message['role']}]", {k: v for k, v in message.items() if k != "role"})

# %% [markdown]
# ## Exercises
#
# 1. Write `clip_factor(max_logit, tau)`: the per-head γ of QK-Clip (1 where the head is under τ), and
#    `split(gamma)`: the factors applied to (q_nope, k_nope, q_rope, k_rope).
# 2. Write `trained_fraction(messages, tokenizer)`: the share of a conversation's tokens that carry
#    a loss. Compare a calculator conversation with chit-chat: which parts of each carry no loss, and why?
# 3. (Open) Copying appears suddenly. Train a kimi-nano with
#    `train_nano.train(config, steps=..., batch_size=16, after_step=...)` and record the loss on number
#    tokens alone every 50 steps: where is the jump? Does it move with the learning rate, with the
#    number of heads, or with `split_digits=False` (see `benchmarks/bench_nano_digits.py`)? Train a
#    whole nano on merged digits (`train(..., tokenizer=...)`; the benchmark builds that vocabulary) and
#    grade the returned model with `nano_eval.evaluate(model, tokenizer)`: is it better than the shipped one?
#
# Solutions: [chapters/solutions/13_kimi_nano.py](solutions/13_kimi_nano.py).

# %%
from importlib import import_module

solutions = import_module("solutions.13_kimi_nano")
print(solutions.clip_factor(torch.tensor([50.0, 200.0]), 100.0), solutions.split(torch.tensor(0.25)))
print(f"{solutions.trained_fraction(example.messages, tok):.2f} of this {example.kind} conversation is trained")
