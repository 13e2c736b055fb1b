"""How much GPU memory each rank needs, and what crosses between nodes: ``python -m weights_tools.memory_plan``.

    python -m weights_tools.memory_plan DIR --tp 8 --context 262144 [--batch 1] [--chunk 1024]
    python -m weights_tools.memory_plan --config config.json --tp 8 --pp 2 --gpu-mem 80GiB
    python -m weights_tools.memory_plan --config config.json --machines    # the table in docs/full_weight_run.md

Per rank r of N = T per stage (``kimi_ref.parallel`` layout; within a stage every rank holds the same
amount; with ``--pp P`` the plan shows the stage that needs the most, and every stage's total):

    weights      Σ over the tensors rank r of stage s loads (``checkpoint.rank_tensors``) of numel · itemsize,
                 in the checkpoint's own dtypes: INT4 experts stay packed (int32 words + bf16 scales), the
                 rest bf16. Heads, vocabulary and MLP widths are split T ways; routed experts E/T whole
                 experts each; q_a/kv_a projections, norms and the router are replicated. A stage holds
                 only its block of layers (61 = 31 + 30 for P = 2), the first also the embedding and the
                 vision tower, the last the final norm and lm_head.
    KV cache     batch · context · layers of the stage · (kv_lora_rank + qk_rope_head_dim) · 2 bytes
                 = 576 bf16 values per token per layer for Kimi, and **replicated** inside a stage: every
                 rank's heads attend over the same latent, so TP does not shrink it; PP does.
    activations  an estimate for the torch reference path, prefilling ``chunk`` tokens at a time: the
                 hidden states, plus the largest of (attention scores and probabilities of a chunk
                 against the whole context, fp32: batch · h/N · chunk · context · 4 · 2), the MoE
                 intermediates with one dequantized expert, the dense MLP, and the fp32 logits of the
                 chunk (batch · chunk · vocab · 4).
    overhead     CUDA context, NCCL buffers, allocator slack: an assumed 3 GiB.

The numbers are printed beside the memory of an H200 (141 GB) and an H100 (80 GB), or the
``--gpu-mem`` given, with the headroom and the longest context that fits.

**Between nodes** (``--gpus-per-node``, default 8), per decoded token at batch 1, in what kimi_ref sends:

    a TP group spanning n nodes   every all-reduce (1 for the embedding, 2 per layer) of S = d · 2 bytes
                                  runs as a ring, whose n node-crossing edges each carry 2(T-1)/T · S;
                                  the fp32 logits' all-gather (T-1)/T · V · 4 on each
    a stage boundary between      each of the T ranks sends its peer the step (40 B), the stream's shape
    nodes                         (16 B) and the residual stream d · 2 B; the token comes home to rank 0 (8 B)

Time on the link ≥ bytes per link / bandwidth + messages in sequence × latency (``--link-gbps``,
``--link-latency-us``: assumptions about the fabric, stated, not measured).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kimi_ref.checkpoint import ITEMSIZE, component, rank_tensors, stage_holds
from kimi_ref.config import ConfigError, KimiConfig, load_config
from kimi_ref.parallel import PP, TP, TPError, stage_layers, validate_layout

from ._cli import INTERRUPTED, USAGE, fail
from ._format import gib, human_bytes, table

__all__ = ["GPUS", "MACHINES", "MemoryPlan", "LinkTraffic", "plan", "weight_bytes", "kv_bytes_per_token",
           "max_context", "link_traffic", "machines_table", "parse_bytes", "main"]

# Total memory as nvidia-smi reports it (MiB): H100 SXM "80GB", H200 "141GB", A100 SXM 80GB and 40GB.
GPUS: dict[str, int] = {"H200 141GB": 143_771 * 2**20, "H100 80GB": 81_559 * 2**20}
MORE_GPUS: dict[str, int] = {"A100 80GB": 81_920 * 2**20, "A100 40GB": 40_960 * 2**20}

# The machines of the table in docs/full_weight_run.md: (name, GPU, nodes, --tp, --pp); 8 GPUs a node.
MACHINES: tuple[tuple[str, str, int, int, int], ...] = (
    ("8 × H200", "H200 141GB", 1, 8, 1),
    ("8 × H100", "H100 80GB", 1, 8, 1),
    ("2 × 8 × H100", "H100 80GB", 2, 16, 1),
    ("2 × 8 × H100", "H100 80GB", 2, 8, 2),
    ("2 × 8 × A100-80GB", "A100 80GB", 2, 8, 2),
    ("4 × 8 × A100-40GB", "A100 40GB", 4, 8, 4),
)
LINK_GBPS = 400.0  # one 400 Gb/s InfiniBand NIC per GPU between nodes (an assumption)
LINK_LATENCY_US = 5.0  # one message across the fabric (an assumption)
OVERHEAD = 3 * 2**30  # CUDA context + NCCL + allocator slack per rank (an assumption, stated as one)
KV_ITEMSIZE = 2  # the latent cache is kept in bf16


def weight_bytes(config: KimiConfig, tp_size: int, include_vision: bool = True, pp_size: int = 1,
                 stage: int = 0) -> dict[str, int]:
    """Bytes of weights one rank of pipeline stage ``stage`` holds, by component (TP rank 0; all hold the same)."""
    pp = PP(stage, pp_size)
    out: dict[str, int] = {}
    for (comp, where), b in _weight_bytes(config, tp_size, include_vision):
        if stage_holds(where, config, pp):
            out[comp] = out.get(comp, 0) + b
    return out


@functools.lru_cache(maxsize=32)
def _weight_bytes(config: KimiConfig, tp_size: int, include_vision: bool) -> tuple[tuple[tuple[str, str], int], ...]:
    # Walks all 208,550 tensors of the real config (~1 s) once per TP size, summing by component and by
    # where a stage boundary can fall (the layer, or the key itself outside the layers).
    out: dict[tuple[str, str], int] = {}
    for key, (shape, dtype) in rank_tensors(config, TP(0, tp_size), include_vision).items():
        where = ".".join(key.split(".")[:3]) + "." if key.startswith("model.layers.") else key
        group = (component(key), where)
        out[group] = out.get(group, 0) + math.prod(shape) * ITEMSIZE[dtype]
    return tuple(out.items())


def kv_bytes_per_token(config: KimiConfig, layers: int | None = None) -> int:
    """Absorbed-MLA cache per token, all layers (or ``layers`` of them): the normalized latent and the rope key, bf16."""
    n = config.num_hidden_layers if layers is None else layers
    return n * (config.kv_lora_rank + config.qk_rope_head_dim) * KV_ITEMSIZE


def _activations(config: KimiConfig, tp_size: int, context: int, batch: int, chunk: int) -> dict[str, int]:
    c = min(chunk, context)
    heads = config.num_attention_heads // tp_size
    d = config.hidden_size
    bf16, fp32 = 2, 4
    hidden = batch * c * d * bf16 * 4  # residual, normed input, attention output, MLP output
    q_latent = batch * c * heads * (config.kv_lora_rank + config.qk_rope_head_dim) * fp32
    scores = batch * heads * c * context * fp32 * 2  # scores and softmax probabilities
    attention = q_latent + scores + batch * c * heads * config.kv_lora_rank * fp32
    expert = 3 * config.moe_intermediate_size * d * bf16  # one expert dequantized at a time
    moe = batch * c * config.num_experts_per_tok * 2 * config.moe_intermediate_size * fp32 + expert
    dense = batch * c * 2 * (config.intermediate_size // tp_size) * bf16
    logits = batch * c * config.vocab_size * fp32
    return {"hidden states": hidden, "attention (largest)": attention, "MoE": moe, "dense MLP": dense,
            "logits": logits, "peak": hidden + max(attention, moe, dense, logits)}


@dataclass
class MemoryPlan:
    """Per-rank bytes of pipeline stage ``stage`` (see the module doc); ``stage_totals``: every stage's total."""

    config: KimiConfig
    tp: int
    context: int
    batch: int
    chunk: int
    weights: dict[str, int]
    kv_cache: int
    activations: dict[str, int]
    overhead: int = OVERHEAD
    fits: dict[str, int] = field(default_factory=dict)  # GPU name -> spare bytes (negative: short)
    pp: int = 1
    stage: int = 0
    stage_totals: list[int] = field(default_factory=list)
    gpus: dict[str, int] = field(default_factory=lambda: dict(GPUS))  # GPU name -> bytes, the ones it is judged on

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.activations["peak"] + self.overhead

    @property
    def layers(self) -> range:
        return stage_layers(self.config.num_hidden_layers, self.pp)[self.stage]

    def report(self) -> str:
        cfg = self.config
        kv_tok = kv_bytes_per_token(cfg)
        layout = f"TP={self.tp}" + (f" × PP={self.pp}" if self.pp > 1 else "")
        lines = [
            f"memory plan for {cfg.source}: {layout}, context {self.context:,} tokens, batch {self.batch}, "
            f"prefill chunk {min(self.chunk, self.context):,}",
        ]
        if self.pp > 1:
            blocks = stage_layers(cfg.num_hidden_layers, self.pp)
            lines.append("stages: " + ", ".join(f"{s}: layers {b.start}..{b.stop - 1} ({human_bytes(t)} a rank)"
                                                for s, (b, t) in enumerate(zip(blocks, self.stage_totals))))
            lines.append(f"per rank of stage {self.stage}, the one that needs the most (TP rank 0 of {self.tp}; "
                         "every rank of a stage holds the same):")
        else:
            lines.append(f"per rank (rank 0 of {self.tp}; every rank holds the same):")
        rows = [["weights", human_bytes(self.weights_total), gib(self.weights_total), "checkpoint dtypes; INT4 experts packed"]]
        for comp, b in sorted(self.weights.items(), key=lambda kv: -kv[1]):
            rows.append([f"  {comp}", human_bytes(b), gib(b), ""])
        rows.append(["KV cache", human_bytes(self.kv_cache), gib(self.kv_cache),
                     f"{self.batch} × {self.context:,} tokens × {len(self.layers)} layers × "
                     f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} values × 2 B, replicated on every rank"
                     + (" of the stage" if self.pp > 1 else "")])
        act = self.activations
        rows.append(["activations (est.)", human_bytes(act["peak"]), gib(act["peak"]),
                     "hidden + max(" + ", ".join(f"{k} {human_bytes(v)}" for k, v in act.items()
                                                 if k not in ("peak", "hidden states")) + ")"])
        rows.append(["runtime overhead", human_bytes(self.overhead), gib(self.overhead), "assumed"])
        rows.append(["total", human_bytes(self.total), gib(self.total), ""])
        lines.append(table(rows, ["", "bytes", "", "what"], right={1, 2}))
        lines.append(f"KV cache per token: {kv_tok:,} B ({kv_tok / 1024:.1f} KiB) for all {cfg.num_hidden_layers} layers")
        lines.append("")
        ranks = f"{self.tp * self.pp}"
        for gpu, capacity in self.gpus.items():
            spare = capacity - self.total
            longest = max_context(cfg, self.tp, self.batch, self.chunk, capacity, self.pp)
            verdict = f"fits, {gib(spare)} headroom" if spare >= 0 else f"does NOT fit: {gib(-spare)} short"
            lines.append(f"{ranks} × {gpu} ({gib(capacity)} each): {verdict}; longest context at batch "
                         f"{self.batch}: {longest:,} tokens" if longest > 0 else
                         f"{ranks} × {gpu} ({gib(capacity)} each): {verdict}; the weights alone do not fit")
        return "\n".join(lines)


def _check_sizes(config: KimiConfig, context: int, batch: int, chunk: int) -> None:
    for name, value in (("context", context), ("batch", batch), ("chunk", chunk)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, found {value}")
    if context > config.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds max_position_embeddings {config.max_position_embeddings}")


def _stage_plan(config: KimiConfig, tp: int, pp: int, stage: int, context: int, batch: int, chunk: int) -> MemoryPlan:
    layers = len(stage_layers(config.num_hidden_layers, pp)[stage])
    return MemoryPlan(config, tp, context, batch, chunk, weight_bytes(config, tp, pp_size=pp, stage=stage),
                      batch * context * kv_bytes_per_token(config, layers), _activations(config, tp, context, batch, chunk),
                      pp=pp, stage=stage)


def plan(config: KimiConfig, tp: int, context: int, batch: int = 1, chunk: int = 1024, pp: int = 1,
         gpus: dict[str, int] | None = None) -> MemoryPlan:
    """The per-rank memory plan for ``config`` under TP = ``tp`` × PP = ``pp``: the stage that needs the most."""
    validate_layout(config, tp, pp)
    _check_sizes(config, context, batch, chunk)
    stages = [_stage_plan(config, tp, pp, s, context, batch, chunk) for s in range(pp)]
    p = max(stages, key=lambda sp: sp.total)
    p.stage_totals = [sp.total for sp in stages]
    p.gpus = dict(GPUS if gpus is None else gpus)
    p.fits = {gpu: cap - p.total for gpu, cap in p.gpus.items()}
    return p


def max_context(config: KimiConfig, tp: int, batch: int, chunk: int, capacity: int, pp: int = 1) -> int:
    """The longest context (≤ max_position_embeddings) whose plan fits in ``capacity`` bytes on every rank; 0 if none."""
    def need(ctx: int) -> int:
        return max(_stage_plan(config, tp, pp, s, ctx, batch, chunk).total for s in range(pp))

    lo, hi = 0, config.max_position_embeddings
    if need(1) > capacity:
        return 0
    while lo < hi:  # need() grows with the context: binary search the last one that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= capacity else (lo, mid - 1)
    return lo


# ---- between nodes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkTraffic:
    """What one decoded token (batch 1) sends between nodes: over all links, over the busiest link, in how
    many messages one after another (see the module doc)."""

    total_bytes: float
    link_bytes: float
    messages: int

    def seconds(self, link_gbps: float = LINK_GBPS, latency_us: float = LINK_LATENCY_US) -> float:
        """Lower bound of the time on the link: bytes at the link's rate plus each message's latency."""
        return self.link_bytes * 8 / (link_gbps * 1e9) + self.messages * latency_us * 1e-6


def link_traffic(config: KimiConfig, tp: int, pp: int, gpus_per_node: int = 8, act_bytes: int = 2) -> LinkTraffic:
    """Bytes and messages per decoded token that cross between nodes, as kimi_ref sends them."""
    d, V = config.hidden_size, config.vocab_size
    total = link = 0.0
    messages = 0
    spans = -(-tp // gpus_per_node)  # nodes one TP group spans
    if spans > 1:  # a ring over the group crosses between its nodes at `spans` edges
        reduces = 1 + 2 * config.num_hidden_layers  # embedding + attention and MLP of every layer, over all stages
        per_edge = reduces * 2 * (tp - 1) / tp * d * act_bytes + (tp - 1) / tp * V * 4 * pp
        step = 2 * (tp - 1) / tp * 40  # the step's broadcast inside stage 0
        total += spans * (per_edge + step)
        link += per_edge + step
        messages += reduces + pp + 1
    stage_nodes = [s * tp // gpus_per_node for s in range(pp)]  # the node each stage starts on
    crossings = sum(1 for s in range(pp - 1) if spans > 1 or stage_nodes[s] != stage_nodes[s + 1])
    if crossings:
        hop = 40 + 16 + d * act_bytes  # the step, the stream's shape, the residual stream
        total += crossings * tp * hop
        link += crossings * hop
        messages += 3 * crossings
    if pp > 1 and (spans > 1 or stage_nodes[0] != stage_nodes[-1]):  # the token comes home to rank 0
        total += 8
        link += 8
        messages += 1
    return LinkTraffic(total, link, messages)


def machines_table(config: KimiConfig, context: int, batch: int = 1, chunk: int = 1024,
                   link_gbps: float = LINK_GBPS, latency_us: float = LINK_LATENCY_US) -> str:
    """The markdown table of MACHINES at ``context``: per-rank memory, what fits, and the traffic between nodes."""
    all_gpus = {**GPUS, **MORE_GPUS}
    rows = ["| machine | layout | weights / rank | KV cache / rank | act. + overhead | total / rank | headroom "
            "| longest context | between nodes / token | link time / token |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, gpu, nodes, tp, pp in MACHINES:
        capacity = all_gpus[gpu]
        p = plan(config, tp, context, batch, chunk, pp=pp, gpus={gpu: capacity})
        spare = capacity - p.total
        longest = max_context(config, tp, batch, chunk, capacity, pp)
        traffic = link_traffic(config, tp, pp, gpus_per_node=tp * pp // nodes)
        between = "—" if nodes == 1 else human_bytes(traffic.total_bytes)
        when = "—" if nodes == 1 else f"{traffic.seconds(link_gbps, latency_us) * 1e6:,.0f} µs"
        layout = f"TP {tp}" + (f" × PP {pp}" if pp > 1 else "")
        rows.append(f"| {name} | {layout} | {gib(p.weights_total)} | {gib(p.kv_cache)} | "
                    f"{gib(p.activations['peak'] + p.overhead)} | {gib(p.total)} | "
                    f"{gib(spare) if spare >= 0 else '**' + gib(spare) + '**'} | {longest:,} | {between} | {when} |")
    return "\n".join(rows)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141GB``, ``81559MiB`` or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--gpu-mem {text!r}: expected a size such as 80GiB, 141GB or 81559MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.memory_plan", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="checkpoint directory (its config.json is read)")
    parser.add_argument("--config", help="a config.json instead of a directory")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size, ranks per stage (default 8)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default max_position_embeddings)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens (default 1024)")
    parser.add_argument("--gpu-mem", help="memory of one GPU, e.g. 80GiB (default: judge on an H200 and an H100)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one node, for the traffic between nodes")
    parser.add_argument("--link-gbps", type=float, default=LINK_GBPS, help=f"one link between nodes, Gb/s (default {LINK_GBPS:g})")
    parser.add_argument("--link-latency-us", type=float, default=LINK_LATENCY_US,
                        help=f"one message between nodes, µs (default {LINK_LATENCY_US:g})")
    parser.add_argument("--machines", action="store_true", help="print the table of common machines (markdown)")
    args = parser.parse_args(argv)
    if (args.dir is None) == (args.config is None):
        parser.error("give either a checkpoint DIR or --config FILE")
    try:
        if args.gpus_per_node < 1 or args.link_gbps <= 0 or args.link_latency_us < 0:
            raise ValueError("--gpus-per-node must be at least 1, --link-gbps positive, --link-latency-us not negative")
        config = load_config(Path(args.config or args.dir))
        context = args.context if args.context is not None else config.max_position_embeddings
        if args.machines:
            _check_sizes(config, context, args.batch, args.chunk)
            print(machines_table(config, context, args.batch, args.chunk, args.link_gbps, args.link_latency_us))
            return 0
        gpus = None if args.gpu_mem is None else {f"{args.gpu_mem} GPU": parse_bytes(args.gpu_mem)}
        print(plan(config, args.tp, context, args.batch, args.chunk, pp=args.pp, gpus=gpus).report())
        nodes = -(-args.tp * args.pp // args.gpus_per_node)
        if nodes > 1:
            print(_between_nodes(config, args.tp, args.pp, args.gpus_per_node, args.link_gbps, args.link_latency_us))
    except (ConfigError, TPError, ValueError, OSError) as e:
        return fail("memory_plan", e, USAGE)
    except KeyboardInterrupt:
        return fail("memory_plan", "stopped", INTERRUPTED)
    return 0


def _between_nodes(config: KimiConfig, tp: int, pp: int, per_node: int, gbps: float, latency_us: float) -> str:
    """The traffic of this layout beside the other one that uses the same GPUs (TP over the nodes vs a stage per node)."""
    world = tp * pp
    layouts = [(tp, pp)]
    other = (world, 1) if pp > 1 else (per_node, world // per_node) if world % per_node == 0 else None
    if other is not None and other != (tp, pp) and config.num_hidden_layers >= other[1]:
        layouts.append(other)
    lines = [f"\nbetween nodes ({per_node} GPUs a node), per decoded token at batch 1; links {gbps:g} Gb/s, "
             f"{latency_us:g} µs a message (assumed):"]
    for t, p in layouts:
        traffic = link_traffic(config, t, p, per_node)
        lines.append(f"  TP {t}" + (f" × PP {p}" if p > 1 else "") + f": {human_bytes(traffic.total_bytes)} over all "
                     f"links, {human_bytes(traffic.link_bytes)} on the busiest, {traffic.messages} messages in turn: "
                     f"≥ {traffic.seconds(gbps, latency_us) * 1e6:,.0f} µs a token")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
