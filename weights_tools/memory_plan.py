"""How much GPU memory each tensor-parallel rank needs: ``python -m weights_tools.memory_plan``.

    python -m weights_tools.memory_plan DIR --tp 8 --context 262144 [--batch 1] [--chunk 1024]
    python -m weights_tools.memory_plan --config config.json --tp 8 --context 262144

Per rank r of N (``kimi_ref.parallel`` layout; every rank holds the same amount):

    weights      Σ over the tensors rank r loads (``checkpoint.rank_tensors``) of numel · itemsize, in the
                 checkpoint's own dtypes: INT4 experts stay packed (int32 words + bf16 scales), the rest bf16.
                 Heads, vocabulary and MLP widths are split N ways; routed experts E/N whole experts each;
                 q_a/kv_a projections, norms and the router are replicated.
    KV cache     batch · context · layers · (kv_lora_rank + qk_rope_head_dim) · 2 bytes
                 = 576 bf16 values per token per layer for Kimi, and **replicated**: every rank's heads
                 attend over the same latent, so TP does not shrink it.
    activations  an estimate for the torch reference path, prefilling ``chunk`` tokens at a time: the
                 hidden states, plus the largest of (attention scores and probabilities of a chunk
                 against the whole context, fp32: batch · h/N · chunk · context · 4 · 2), the MoE
                 intermediates with one dequantized expert, the dense MLP, and the fp32 logits of the
                 chunk (batch · chunk · vocab · 4).
    overhead     CUDA context, NCCL buffers, allocator slack: an assumed 3 GiB.

The numbers are printed beside the memory of an H200 (141 GB) and an H100 (80 GB), with the longest
context that fits on each.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kimi_ref.checkpoint import ITEMSIZE, component, rank_tensors
from kimi_ref.config import ConfigError, KimiConfig, load_config
from kimi_ref.parallel import TP, TPError, validate_tp

from ._cli import INTERRUPTED, USAGE, fail
from ._format import gib, human_bytes, table

__all__ = ["GPUS", "MemoryPlan", "plan", "weight_bytes", "kv_bytes_per_token", "max_context", "main"]

# Total memory as nvidia-smi reports it (MiB): H100 SXM "80GB" and H200 "141GB".
GPUS: dict[str, int] = {"H200 141GB": 143_771 * 2**20, "H100 80GB": 81_559 * 2**20}
OVERHEAD = 3 * 2**30  # CUDA context + NCCL + allocator slack per rank (an assumption, stated as one)
KV_ITEMSIZE = 2  # the latent cache is kept in bf16


def weight_bytes(config: KimiConfig, tp_size: int, include_vision: bool = True) -> dict[str, int]:
    """Bytes of weights one rank holds, by component (rank 0; all ranks hold the same)."""
    return dict(_weight_bytes(config, tp_size, include_vision))


@functools.lru_cache(maxsize=32)
def _weight_bytes(config: KimiConfig, tp_size: int, include_vision: bool) -> tuple[tuple[str, int], ...]:
    # Walks all 208,550 tensors of the real config (~1 s); plans at several contexts reuse it.
    out: dict[str, int] = {}
    for key, (shape, dtype) in rank_tensors(config, TP(0, tp_size), include_vision).items():
        comp = component(key)
        out[comp] = out.get(comp, 0) + math.prod(shape) * ITEMSIZE[dtype]
    return tuple(out.items())


def kv_bytes_per_token(config: KimiConfig) -> int:
    """Absorbed-MLA cache per token, all layers: the normalized latent and the rope key, bf16."""
    return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * KV_ITEMSIZE


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
    """Per-rank bytes (see the module doc)."""

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

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.activations["peak"] + self.overhead

    def report(self) -> str:
        cfg = self.config
        kv_tok = kv_bytes_per_token(cfg)
        lines = [
            f"memory plan for {cfg.source}: TP={self.tp}, context {self.context:,} tokens, batch {self.batch}, "
            f"prefill chunk {min(self.chunk, self.context):,}",
            f"per rank (rank 0 of {self.tp}; every rank holds the same):",
        ]
        rows = [["weights", human_bytes(self.weights_total), gib(self.weights_total), "checkpoint dtypes; INT4 experts packed"]]
        for comp, b in sorted(self.weights.items(), key=lambda kv: -kv[1]):
            rows.append([f"  {comp}", human_bytes(b), gib(b), ""])
        rows.append(["KV cache", human_bytes(self.kv_cache), gib(self.kv_cache),
                     f"{self.batch} × {self.context:,} tokens × {cfg.num_hidden_layers} layers × "
                     f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} values × 2 B, replicated on every rank"])
        act = self.activations
        rows.append(["activations (est.)", human_bytes(act["peak"]), gib(act["peak"]),
                     "hidden + max(" + ", ".join(f"{k} {human_bytes(v)}" for k, v in act.items()
                                                 if k not in ("peak", "hidden states")) + ")"])
        rows.append(["runtime overhead", human_bytes(self.overhead), gib(self.overhead), "assumed"])
        rows.append(["total", human_bytes(self.total), gib(self.total), ""])
        lines.append(table(rows, ["", "bytes", "", "what"], right={1, 2}))
        lines.append(f"KV cache per token: {kv_tok:,} B ({kv_tok / 1024:.1f} KiB) for all {cfg.num_hidden_layers} layers")
        lines.append("")
        for gpu, capacity in GPUS.items():
            spare = capacity - self.total
            longest = max_context(cfg, self.tp, self.batch, self.chunk, capacity)
            verdict = f"fits, {gib(spare)} spare" if spare >= 0 else f"does NOT fit: {gib(-spare)} short"
            lines.append(f"{self.tp} × {gpu} ({gib(capacity)} each): {verdict}; longest context at batch "
                         f"{self.batch}: {longest:,} tokens" if longest > 0 else
                         f"{self.tp} × {gpu} ({gib(capacity)} each): {verdict}; the weights alone do not fit")
        return "\n".join(lines)


def plan(config: KimiConfig, tp: int, context: int, batch: int = 1, chunk: int = 1024) -> MemoryPlan:
    """The per-rank memory plan for ``config`` under TP = ``tp``."""
    validate_tp(config, tp)
    for name, value in (("context", context), ("batch", batch), ("chunk", chunk)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, found {value}")
    if context > config.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds max_position_embeddings {config.max_position_embeddings}")
    p = MemoryPlan(config, tp, context, batch, chunk, weight_bytes(config, tp),
                   batch * context * kv_bytes_per_token(config), _activations(config, tp, context, batch, chunk))
    p.fits = {gpu: cap - p.total for gpu, cap in GPUS.items()}
    return p


def max_context(config: KimiConfig, tp: int, batch: int, chunk: int, capacity: int) -> int:
    """The longest context (≤ max_position_embeddings) whose plan fits in ``capacity`` bytes per rank; 0 if none."""
    weights = sum(weight_bytes(config, tp).values()) + OVERHEAD

    def need(ctx: int) -> int:
        return weights + batch * ctx * kv_bytes_per_token(config) + _activations(config, tp, ctx, batch, chunk)["peak"]

    lo, hi = 0, config.max_position_embeddings
    if need(1) > capacity:
        return 0
    while lo < hi:  # need() grows with the context: binary search the last one that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= capacity else (lo, mid - 1)
    return lo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.memory_plan", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="checkpoint directory (its config.json is read)")
    parser.add_argument("--config", help="a config.json instead of a directory")
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size (default 8)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default max_position_embeddings)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens (default 1024)")
    args = parser.parse_args(argv)
    if (args.dir is None) == (args.config is None):
        parser.error("give either a checkpoint DIR or --config FILE")
    try:
        config = load_config(Path(args.config or args.dir))
        context = args.context if args.context is not None else config.max_position_embeddings
        print(plan(config, args.tp, context, args.batch, args.chunk).report())
    except (ConfigError, TPError, ValueError, OSError) as e:
        return fail("memory_plan", e, USAGE)
    except KeyboardInterrupt:
        return fail("memory_plan", "stopped", INTERRUPTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
