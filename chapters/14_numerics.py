# %% [markdown]
# # 14 — Numerics you can see: where do two engines part?
#
# You have ported Kimi to another engine and its logits differ from ours by 3e-2. Is that bf16 noise,
# or a bug in layer 17? The logits cannot tell you. A **trace** can: every named activation of one
# forward pass — the embedding; per layer the attention input, the q and kv latents, the attention
# output, the router's scores and chosen experts, the MoE output and the residual; the final norm and
# the logits — in one safetensors file. Two traces of the same tokens, **diffed** activation by
# activation against the one tolerance table, show where the numbers part and whether that is more
# than the dtype can explain.
#
#     python -m weights_tools.trace CKPT --prompt "What is 12 + 30?" --dtype bfloat16 --out bf16.safetensors
#     python -m weights_tools.trace CKPT --prompt "What is 12 + 30?" --oracle --out oracle.safetensors
#     python -m weights_tools.diff bf16.safetensors oracle.safetensors --plot bf16.png
#
# `--hf` traces HF transformers' DeepseekV3 instead, `--tp 2` two tensor-parallel ranks, `--backend
# triton` the kernels. The names are documented in [docs/numerics.md](../docs/numerics.md) so another
# engine can write the same file.
#
# Code: [weights_tools/trace.py](../weights_tools/trace.py), [weights_tools/trace_file.py](../weights_tools/trace_file.py),
# [weights_tools/diff.py](../weights_tools/diff.py), the table [kimi_ref/tolerances.py](../kimi_ref/tolerances.py);
# tests in [tests/test_trace.py](../tests/test_trace.py).

# %%
import matplotlib.pyplot as plt
import torch

import kimi_ref
from kimi_ref.chat import NANO_DIR
from kimi_ref.tokenizer import Tokenizer
from weights_tools import diff, nano_eval, trace
from weights_tools.trace_file import Trace
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

nano = NANO_DIR
tok = Tokenizer.from_pretrained(nano)
prompt = "What is 12 + 30? Kimi-nano answers with a calculator call, then a number."
ids = [tok.encode(prompt)]
print(len(ids[0]), "tokens")


def as_trace(tensors: dict, dtype: str, name: str) -> Trace:
    """An in-memory trace (the files hold exactly this: a header and the activations)."""
    return Trace(name, {"format": 1, "input_ids": ids, "dtype": dtype, "source": name}, tensors)


oracle = as_trace(trace.trace_oracle(nano, ids), "float64", "oracle")
runs = {dtype: as_trace(trace.trace_kimi(nano, ids, dtype=dtype), dtype, f"kimi_ref {dtype}")
        for dtype in ("float32", "float16", "bfloat16")}
print(diff.report(diff.compare(runs["float32"], oracle)))

# %% [markdown]
# The diff is one loop over the activations both traces share: the relative L∞ error of each against the
# more precise trace, its largest distance in ulps, and for the router's choices the number of tokens
# whose expert set changed. The tolerance is the one row of the table for the coarser precision.

# %%
from kimi_ref.tolerances import rel_error

show(diff.compare)
show(rel_error)

# %% [markdown]
# ## Error growth over depth
#
# In float32 every activation sits within 1e-5 of the float64 oracle: a few hundred ops of a 2⁻²⁴
# rounding each. In bf16 (8 significant bits) the error starts at one rounding, 2e-3 to 4e-3, at the
# first norm and grows through the layers; fp16 (11 bits) sits about 8× lower. The dashed lines are
# the rows of the table. That is what "bf16 noise" looks like on kimi-nano: smooth growth, every kind
# of activation together, no step, right up against the whole-model bf16 row (2e-2).
#
# The random tiny model shows the other face of an MoE: its bf16 error jumps from 1e-2 to 0.3 in
# layer 2. Nothing is broken — its random router has near-tied experts, bf16 rounding tipped one token
# to another expert (the diff below counts it), and that token's MoE output changed completely. An
# MoE is piecewise: a rounding can move a token across a routing boundary.

# %%
import tempfile

from weights_tools import make_tiny

tiny = make_tiny.make_tiny(tempfile.mkdtemp() + "/tiny", seed=0)  # 3 layers of random weights, INT4 experts
tiny_oracle = as_trace(trace.trace_oracle(tiny, ids), "float64", "oracle")
tiny_runs = {d: as_trace(trace.trace_kimi(tiny, ids, dtype=d), d, f"tiny {d}") for d in ("float32", "float16", "bfloat16")}

fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, title, reference, compared in ((axes[0], "kimi-nano (trained)", oracle, runs),
                                       (axes[1], "make_tiny (random weights)", tiny_oracle, tiny_runs)):
    for dtype, run in compared.items():
        c = diff.compare(run, reference)
        xs, ys = zip(*[(r.layer, r.rel_error) for r in c.rows if r.activation == "residual"])
        line, = ax.plot([*xs, xs[-1] + 1], [*ys, c.row("logits").rel_error], marker="o",
                        label=f"{dtype} (residual, then logits)")
        ax.axhline(c.tolerance, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("layer (last point: logits)")
axes[0].set_ylabel("relative L∞ error vs float64")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Every activation of one layer
#
# The diff's own picture (`--plot`) draws every kind of activation against depth, here for the tiny
# model in bf16: everything grows together until the MoE output of layer 2, where the flipped token
# lands. The router line shows why the flip is not the router's fault: its scores are as accurate as
# everything else; two experts were simply closer than that. (The first activation past the 2e-2 row
# is layer 1's MoE output, by a hair: growth, not a step. The step is the flip, in layer 2.)

# %%
tiny_bf16 = diff.compare(tiny_runs["bfloat16"], tiny_oracle)
print("tiny model, bf16: tokens whose expert set flipped, per MoE layer:", tiny_bf16.flips)
fig, ax = plt.subplots(figsize=(9, 4))
diff.draw(tiny_bf16, ax)
plt.show()

# %% [markdown]
# ## INT4 experts against the bf16 experts they came from
#
# kimi-nano ships `dense_experts.safetensors`, the bf16 experts its INT4 ones were quantized from
# (`nano_eval.dense_twin`). Both run here in float32, so the only difference is the 4-bit weights:
# it enters at the first MoE layer's output (layer 0 is dense) and it is larger than computing in
# bf16 — quantization moves every expert weight by up to half a step of its group's scale.

# %%
int4_model = kimi_ref.load_model(nano, dtype=torch.float32, progress=False)
dense_model = nano_eval.dense_twin(nano, int4_model)
dense = as_trace(trace.record_kimi(dense_model, torch.tensor(ids)), "float32", "bf16 experts")
int4 = as_trace(trace.record_kimi(int4_model, torch.tensor(ids)), "float32", "INT4 experts")
c = diff.compare(int4, dense)
print(f"{'layer':>5}  {'mlp_out':>9}  {'residual':>9}   (relative error, INT4 vs bf16 experts)")
for layer in range(4):
    print(f"{layer:>5}  {c.row(f'layers.{layer}.mlp_out').rel_error:9.2e}  {c.row(f'layers.{layer}.residual').rel_error:9.2e}")
print("logits", f"{c.row('logits').rel_error:.2e}", "| bf16 compute, logits:", f"{diff.compare(runs['bfloat16'], oracle).row('logits').rel_error:.2e}")
print("expert sets that differ:", {layer: f"{n}/{total}" for layer, (n, total) in c.flips.items()})

# %% [markdown]
# ## How often does the router flip in bf16?
#
# The router's scores are an fp32 island, but its *input* is the bf16 residual stream. When two
# experts' scores are within the input's error, bf16 picks the other one: the token then goes
# through a different expert, and the MoE output changes by far more than a rounding. Over the
# held-out questions of chapter 13 (each token a routing decision per MoE layer). A flip is a token whose
# *set* of experts differs (the order among the chosen ones does not change the MoE output):

# %%
show(diff.expert_flips)

# %%
from weights_tools import nano_data

questions = [tok.encode(nano_data.example(i, "heldout").messages[0]["content"]) for i in range(80)]
batch = [q[:12] for q in questions if len(q) >= 12]  # one [B, 12] batch: B sequences traced at once
reference = trace.trace_oracle(nano, batch)
for dtype in ("float32", "float16", "bfloat16"):
    got = trace.trace_kimi(nano, batch, dtype=dtype)
    per_layer = [diff.expert_flips(got[n], reference[n]) for n in got if n.endswith("router_experts")]
    total = len(batch) * 12
    print(f"{dtype:9}: flipped expert sets per MoE layer {per_layer} of {total} tokens "
          f"({sum(per_layer) / (total * len(per_layer)):.1%} of all routing decisions)")

# %% [markdown]
# Trained kimi-nano flips a few percent of its routing decisions in bf16 and none in fp16 or fp32. A
# flip is not a bug — the diff reports flips next to the errors, not as errors — but it is why an MoE
# in bf16 cannot be judged token by token with a tolerance alone: compare the flip rate, and compare
# the tokens that did not flip.
#
# ## What a real bug looks like
#
# Now break one thing, the way ports break: layer 2's `post_attention_layernorm` built with eps 1e-1
# instead of the config's 1e-5. In the diff against the oracle the error is flat and tiny up to
# `layers.2.mlp_in`, then jumps by orders of magnitude at exactly that activation — a step, not
# growth. That is the signature of a bug: find the first activation past tolerance and read the code
# that produces it.

# %%
bugged_model = kimi_ref.load_model(nano, dtype=torch.float32, progress=False)
bugged_model.model.layers[2].post_attention_layernorm.eps = 1e-1
bugged = as_trace(trace.record_kimi(bugged_model, torch.tensor(ids)), "float32", "bugged")
c = diff.compare(bugged, oracle)
at = c.rows.index(c.first_past)
for row in c.rows[at - 4:at + 4]:
    print(f"{row.name:24} {row.rel_error:9.2e}{'   << first past tolerance' if row is c.first_past else ''}")
fig, ax = plt.subplots(figsize=(9, 4))
diff.draw(c, ax)
plt.show()

# %% [markdown]
# Not every quirk shows on every checkpoint. The q_a/kv_a latent norms use eps 1e-6, not the config's
# 1e-5 (docs/numerics.md). On kimi-nano the latents have rms ≈ 1, where 1e-6 and 1e-5 change nothing
# in float32 — the diff stays clean. The test that pins that quirk feeds the module latents of rms
# 1e-3 instead (`tests/test_norms.py`): a trace shows what a prompt exercises, not everything the code promises.

# %%
quirk = kimi_ref.load_model(nano, dtype=torch.float32, progress=False)
for layer in quirk.model.layers:
    layer.self_attn.kv_a_layernorm.eps = 1e-5
c = diff.compare(as_trace(trace.record_kimi(quirk, torch.tensor(ids)), "float32", "kv eps 1e-5"), oracle)
print("kv_a eps 1e-5 on kimi-nano: first past tolerance:", c.first_past)

# %% [markdown]
# ## Exercises
#
# 1. Write `first_step(comparison, factor=10)`: the first activation whose relative error is more than
#    `factor` times the previous activation's — a bug's step, as opposed to noise's growth. Does it find
#    the bug above? What does it say for the plain bf16 trace?
# 2. Write `flip_fraction(a_ids, b_ids)` for two `[B, T, k]` expert-id tensors: the fraction of tokens
#    whose *set* of experts differs (order inside a token does not count).
# 3. (Open) Trace kimi-nano with `--backend triton` (under `TRITON_INTERPRET=1` on a CPU) and with
#    `--tp 2`: which activations differ from the plain fp32 trace at all, and by how many ulps?
#
# Solutions: [chapters/solutions/14_numerics.py](solutions/14_numerics.py).

# %%
from importlib import import_module

solutions = import_module("solutions.14_numerics")
print("step found at:", solutions.first_step(diff.compare(bugged, oracle)).name)
print("bf16 step:", getattr(solutions.first_step(diff.compare(runs["bfloat16"], oracle)), "name", None))
print("flips, oracle vs bf16, layer 3:", solutions.flip_fraction(runs["bfloat16"].tensors["layers.3.router_experts"],
                                                                  oracle.tensors["layers.3.router_experts"]))
