# %% [markdown]
# # 10 — Tensor parallelism: one model, N GPUs
#
# Kimi K2.x is 595 GB on disk; the biggest GPU holds 141 GB. `python -m kimi_ref.chat --tp 8` splits
# the model over 8 ranks so that each holds 1/8 of almost every matrix, and all of them compute every
# token together. This chapter draws **which matrix splits which way**, finds **where the ranks must
# talk** (the all-reduces), prices **per-rank memory** at full size, and then goes **beyond one
# machine**: pipeline stages (`--pp`), what crosses between them, and why at batch 1 they take turns.
#
# Code: [kimi_ref/parallel.py](../kimi_ref/parallel.py) (the layout and *every* `torch.distributed`
# call), [kimi_ref/launch.py](../kimi_ref/launch.py) (starting the ranks: spawned by us, or by torchrun),
# [kimi_ref/checkpoint.py](../kimi_ref/checkpoint.py) (`rank_slice`: each rank reads only its slices),
# [kimi_ref/control.py](../kimi_ref/control.py) (what rank 0 tells the others, stage to stage),
# [weights_tools/memory_plan.py](../weights_tools/memory_plan.py). Tests:
# [tests/test_parallel.py](../tests/test_parallel.py) — TP 2, 4 and 8 and TP × PP 2 × 2, 1 × 3, 4 × 2
# give the logits of TP 1 (float32 tolerance) and the same greedy and seeded tokens;
# [tests/test_multinode.py](../tests/test_multinode.py) — the same across two torchrun "nodes".

# %%
import inspect
import subprocess
import sys
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from kimi_ref import parallel
from kimi_ref.checkpoint import expected_tensors, flat_name, rank_slice
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.model import KimiForCausalLM
from kimi_ref.parallel import PP, TP
from weights_tools import memory_plan

real = load_config(fixture_path("kimi_k25"))
tiny = tiny_config(real, vocab_size=4096, num_attention_heads=8, vision=False)
print(parallel.__doc__.split("Per decoder layer")[0])

# %% [markdown]
# ## 1. Which matrix splits which way
#
# A `Linear` computes `y = x Wᵀ` with `W` [out, in]. Two ways to split it over N ranks:
#
# * **column-parallel** (split `out`, the rows of `W`): each rank computes a slice of `y` from the whole
#   `x`. No communication, but the output is scattered.
# * **row-parallel** (split `in`, the columns of `W`): each rank needs only its slice of `x` and produces
#   a *partial sum* of the whole `y`; an **all-reduce** (sum over ranks) completes it.
#
# Chain a column-parallel matrix into a row-parallel one and the scattered slice is exactly the input
# the second one needs: one all-reduce per pair. Attention is that pair per head group (q_b_proj and
# kv_b_proj by rows, o_proj by columns); the shared expert and the dense MLP too (gate/up by rows, down
# by columns). Routed experts are not split at all: each rank owns E/N whole experts.
#
# The picture below is computed from `checkpoint.rank_slice` (what each rank actually loads) for one
# MoE layer of a tiny config at TP 4; grey = every rank holds all of it.

# %%
N = 4
names = {flat_name(n, tiny): shape for n, (shape, _) in expected_tensors(tiny, include_vision=False).items()}
panels = ["self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
          "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.gate.weight",
          "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.down_proj.weight"]
cmap = ListedColormap(["#bbbbbb", "C0", "C1", "C2", "C3"])


def owner_map(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """[out, in] array: which rank holds each element (0 = replicated, r + 1 = rank r only)."""
    owners = np.zeros(shape[:2], dtype=int)
    for r in range(N):
        dim, start, size = rank_slice(key, shape, tiny, TP(rank=r, world_size=N))
        if dim == 0:
            owners[start:start + size, :] = r + 1
        elif dim == 1:
            owners[:, start:start + size] = r + 1
    return owners


fig, axes = plt.subplots(2, 5, figsize=(15, 6))
for ax, part in zip(axes.flat, panels):
    key = f"model.layers.1.{part}"
    ax.imshow(owner_map(key, names[key]), cmap=cmap, vmin=0, vmax=N, aspect="auto", interpolation="nearest")
    ax.set_title(f"{part.rsplit('.', 1)[0]}\n{list(names[key])}", fontsize=9)
    ax.set_xlabel("in")
    ax.set_ylabel("out")
experts = np.array([[next(r + 1 for r in range(N) if rank_slice(f"model.layers.1.mlp.experts.{e}.up_proj.weight_packed",
                                                                (1, 1), tiny, TP(r, N)) is not None)
                     for e in range(tiny.n_routed_experts)]])
axes.flat[8].imshow(experts, cmap=cmap, vmin=0, vmax=N, aspect="auto")
axes.flat[8].set_title(f"routed experts 0..{tiny.n_routed_experts - 1}\n(whole experts per rank)", fontsize=9)
axes.flat[8].set_yticks([])
key = "lm_head.weight"
axes.flat[9].imshow(owner_map(key, names[key]), cmap=cmap, vmin=0, vmax=N, aspect="auto", interpolation="nearest")
axes.flat[9].set_title(f"lm_head (and embed_tokens)\n{list(names[key])}: vocab-parallel", fontsize=9)
handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(N + 1)]
fig.legend(handles, ["every rank"] + [f"rank {r}" for r in range(N)], loc="lower center", ncol=N + 1)
plt.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()

# %%
# The rule behind the picture, in kimi_ref/parallel.py: which dimension of a tensor the ranks split; and
# checkpoint.rank_slice, which turns it into the rows or columns one rank reads (chapters/show_code.py
# shows the current source of each).
from show_code import show

show(parallel.shard_dim)
show(rank_slice)

# %% [markdown]
# ## 2. Where the ranks talk
#
# Rather than trusting the docstring, count. We build rank 0 of a TP-4 model in this one process and
# replace `parallel.all_reduce` / `all_gather` with counters that remember who called them (the numbers
# are wrong, since no other rank adds its part, but every collective is called exactly where the real
# run calls it).

# %%
calls = Counter()


def counting(kind):
    def collective(x, tp, *args, **kwargs):
        caller = inspect.currentframe().f_back.f_locals.get("self")
        calls[(kind, type(caller).__name__, tuple(x.shape))] += 1
        return x
    return collective


torch.manual_seed(0)
rank0 = KimiForCausalLM(tiny, tp=TP(rank=0, world_size=4))
real_reduce, real_gather = parallel.all_reduce, parallel.all_gather
parallel.all_reduce, parallel.all_gather = counting("all_reduce"), counting("all_gather")
try:
    with torch.inference_mode():
        rank0(torch.tensor([[1, 2, 3]]))
finally:
    parallel.all_reduce, parallel.all_gather = real_reduce, real_gather
for (kind, who, shape), n in sorted(calls.items()):
    print(f"{kind:10s} × {n}  from {who:24s} on a tensor {shape}")
print(f"\n{tiny.num_hidden_layers} layers → {sum(n for (k, *_), n in calls.items() if k == 'all_reduce')} all-reduces "
      "(embedding + 2 per layer); 1 all-gather of the logits")

# %%
# Every collective the count found is one of these small functions of kimi_ref/parallel.py (the only file
# that calls torch.distributed); on a single rank they return x untouched.
from show_code import show

show(parallel.all_reduce)
show(parallel.all_gather)

# %% [markdown]
# Per decoder layer: one all-reduce after `o_proj`, one after the MLP or MoE (the shared expert's
# partial sums join the routed experts' before the single reduce). Plus one to finish the
# vocab-parallel embedding (each id lives on one rank; the others contribute zeros), and one
# all-gather that assembles the logits along the vocabulary. For the real model that is
# 2 × 61 + 1 = 123 all-reduces of a [tokens, 7168] tensor per forward.
#
# Sampling is the one thing done by a single rank: rank 0 draws the token and **broadcasts** it with
# a go-on/stop flag, so the ranks cannot disagree, and a Ctrl-C on rank 0 stops every rank at the
# same step (`kimi_ref/generate.py`).
#
# ## 3. Same numbers, any TP
#
# The CLI starts its own ranks (`launch.py`: this process is rank 0 and keeps the terminal; workers
# are spawned, gloo on the CPU, NCCL on GPUs). Greedy decoding must give the same text at TP 1 and 2:

# %%
def run_chat(tp):
    cmd = [sys.executable, "-m", "kimi_ref.chat", "--tp", str(tp), "--device", "cpu", "--dtype", "float32",
           "--prompt", "What is 17*23?", "--max-new-tokens", "8", "--temperature", "0", "--no-timings"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


one, two = run_chat(1), run_chat(2)
print(two)
assert one == two, (one, two)

# %% [markdown]
# ## 4. Memory per rank at full size
#
# `weights_tools.memory_plan` adds up what rank 0 loads (`checkpoint.rank_tensors`, INT4 experts still
# packed), the latent KV cache (which TP does **not** shrink: every rank's heads read the same
# latent), an activation estimate and a fixed runtime overhead. At the full 262,144-token context:

# %%
sizes = [1, 2, 4, 8, 16]
plans = {n: memory_plan.plan(real, n, real.max_position_embeddings) for n in sizes}
parts = {
    "routed experts (INT4)": lambda p: p.weights["routed_experts"],
    "other weights (bf16)": lambda p: p.weights_total - p.weights["routed_experts"],
    "KV cache (replicated)": lambda p: p.kv_cache,
    "activations + overhead": lambda p: p.activations["peak"] + p.overhead,
}
fig, ax = plt.subplots(figsize=(7, 4))
bottom = np.zeros(len(sizes))
for label, fn in parts.items():
    values = np.array([fn(plans[n]) for n in sizes]) / 2**30
    ax.bar([str(n) for n in sizes], values, bottom=bottom, label=label)
    bottom += values
for gpu, capacity in memory_plan.GPUS.items():
    ax.axhline(capacity / 2**30, color="k", ls="--", lw=1)
    ax.text(4.45, capacity / 2**30, gpu, va="bottom", ha="right", fontsize=8)
ax.set_yscale("log")
ax.set_xlabel("TP size")
ax.set_ylabel("GiB per rank")
ax.set_title("Kimi K2.x per-rank memory, context 262,144, batch 1")
ax.legend(fontsize=8)
plt.show()
print(plans[8].report())

# %% [markdown]
# ## 5. Beyond one machine: pipeline stages
#
# 8 × H100 hold the weights but not the full context (the 8 × H100 line above is short). Two nodes
# of 8 are enough, but how should 16 GPUs share the work? **TP 16** splits every matrix 16 ways, so
# both of each layer's all-reduces run over the slow link between the nodes. **TP 8 × PP 2** keeps
# TP inside each node and cuts the *layers* in two: stage 0 (node 0) holds layers 0..30 and the
# embedding, stage 1 (node 1) layers 31..60, the final norm and lm_head. Between them travels only the
# residual stream `x` [B, T, d] — for a decoded token, 7,168 numbers.
#
# `parallel.stage_layers` cuts the layers (the first stages get one more when they do not divide);
# a stage builds only its block, keyed by the layers' real indices, so it reads exactly those tensors:

# %%
print({P: [f"{b.start}..{b.stop - 1}" for b in parallel.stage_layers(real.num_hidden_layers, P)] for P in (2, 3, 4)})
for stage in range(2):
    held = KimiForCausalLM(tiny, pp=PP(stage, 2), device="meta").state_dict()
    tops = sorted({".".join(k.split(".")[:3]) if k.startswith("model.layers.") else k.rsplit(".", 1)[0] for k in held})
    print(f"stage {stage} of the tiny model holds: {tops}")

# %% [markdown]
# **What crosses between stages.** Build the two stages of a small model in this one process, with
# weights copied from a whole model, and replace `parallel.send`/`recv` with a wire that remembers
# what went over it. Stage 0 embeds and runs its layers, then sends the stream's shape and values;
# stage 1 receives them, runs its layers and the head. The logits are the whole model's, bit for bit
# (the same operations in the same order), and the wire shows what a decode step costs the link.

# %%
torch.manual_seed(0)
whole = KimiForCausalLM(tiny)
stages = [KimiForCausalLM(tiny, pp=PP(s, 2, tp_rank=0, tp_size=1), device="meta") for s in range(2)]
for stage in stages:
    stage.load_state_dict({k: whole.state_dict()[k] for k in stage.state_dict()}, assign=True)
wire, sent = [], Counter()


def wire_send(x, dst, pp):
    wire.append(x.clone())
    sent[(tuple(x.shape), str(x.dtype).replace("torch.", ""))] += 1


def wire_recv(x, src, pp):
    return x.copy_(wire.pop(0))


real_send, real_recv = parallel.send, parallel.recv
parallel.send, parallel.recv = wire_send, wire_recv
try:
    with torch.inference_mode():
        prompt = torch.tensor([[1, 2, 3, 4, 5]])
        caches = [stage.new_cache(1, 8) for stage in stages]
        assert stages[0](prompt, caches[0]) is None  # stage 0 sends its stream on and returns nothing
        piped = stages[1](prompt, caches[1])
        sent.clear()
        token = torch.tensor([[6]])
        stages[0](token, caches[0])  # one decode step
        step = stages[1](token, caches[1])
finally:
    parallel.send, parallel.recv = real_send, real_recv
with torch.inference_mode():
    cache = whole.new_cache(1, 8)
    full = whole(prompt, cache), whole(token, cache)
print("prefill logits equal the whole model's:", torch.equal(piped, full[0]))
print("decode-step logits equal the whole model's:", torch.equal(step, full[1]))
assert torch.equal(piped, full[0]) and torch.equal(step, full[1])
for (shape, dtype), n in sent.items():
    print(f"one decode step sent {n} × {dtype} {list(shape)}")

# %% [markdown]
# Add the step's control (40 bytes: `control.py`) and the sampled token coming back to rank 0 (8 bytes),
# and at d = 7,168 in bf16 one token costs the link 40 + 16 + 14,336 bytes per TP rank and 8 more, in
# 4 messages.
# TP 16 instead pays 123 all-reduces of 14,336 bytes (each ring all-reduce moves 2·15/16 of it over
# every edge, two of which cross between the nodes) plus the all-gather of the fp32 logits:

# %%
for t, p in ((16, 1), (8, 2)):
    traffic = memory_plan.link_traffic(real, t, p)
    print(f"TP {t:2d} × PP {p}: {traffic.total_bytes / 1e3:9,.1f} kB between the nodes per token, "
          f"{traffic.messages:3d} messages in turn, ≥ {traffic.seconds() * 1e6:4.0f} µs on a 400 Gb/s link (5 µs a message)")
print(memory_plan.plan(real, 8, real.max_position_embeddings, pp=2).report().split("KV cache per token")[0])

# %% [markdown]
# **The bubble.** At batch 1 a token must pass every layer before the next one can start, so the
# stages take turns: while node 1 runs layers 31..60, node 0 waits for the token; then node 1 waits.
# Each stage is idle (P-1)/P of the time — the *pipeline bubble*. Training fills it with many
# micro-batches; a server could with several sequences in flight (below, right). A single chat cannot.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 2.6), sharey=True)
colors = ["C0", "C1", "C2", "C3"]
for ax, sequences in zip(axes, (1, 2)):
    P, tokens, t = 2, 4, 0.0
    for k in range(tokens):
        for seq in range(sequences):
            for s in range(P):  # sequence `seq` at stage s: starts when the stage is free and its input is ready
                start = k * P + s + seq
                ax.barh(s, 0.95, left=start, color=colors[seq], alpha=0.85)
                ax.text(start + 0.47, s, f"t{k}" + ("" if sequences == 1 else f"/{'ab'[seq]}"), ha="center",
                        va="center", fontsize=8, color="white")
    ax.set_yticks([0, 1], ["stage 0 (node 0)", "stage 1 (node 1)"])
    ax.invert_yaxis()
    ax.set_xlabel("time (one stage's share of a token)")
    ax.set_title("batch 1: each stage idle half the time" if sequences == 1 else
                 "two sequences in flight: the bubble filled")
plt.tight_layout()
plt.show()

# %% [markdown]
# So pipeline stages do not make one chat faster: a token still takes all 61 layers, one after the
# other, plus a hop each way. What they buy is memory (each node holds half the layers and half the
# cache) at almost no cost on the slow link: one hidden state per token instead of 123 all-reduces.
# Across nodes that is the right trade; inside a node, where NVLink makes the all-reduces cheap,
# TP keeps every GPU busy on every token.
#
# ## Exercises
#
# Solutions: [chapters/solutions/10_parallel.py](solutions/10_parallel.py), tested in
# `tests/test_parallel.py`.
#
# 1. **Valid sizes.** Write `valid_tp_sizes(config, up_to)` using `parallel.validate_tp`. Which sizes
#    up to 16 work for the real model, and which width rules out 3, 6 and 12?
# 2. **Traffic.** Write `allreduce_bytes_per_token(config, bytes_per_value)`: the bytes one rank puts
#    into the all-reduces of one decoder layer for one token. Multiply by 61 layers: at 50 tokens/s,
#    is NVLink (hundreds of GB/s) or latency the limit?
# 3. **What is split.** Write `rank_stored_values(config, world_size)` from `checkpoint.rank_tensors`.
#    Rank 0 holds R + S/N values (R replicated, S split); use three TP sizes to find R and S.
# 4. **The bubble.** Write `stage_busy_fraction(stages, sequences)`: at decode, with `sequences`
#    independent sequences in flight (each one token at a time), what fraction of the time is each
#    stage busy? Check it against the picture in §5, then ask: how many sequences must a server keep in
#    flight to keep 4 stages busy?
