"""What is in a checkpoint, from its index and headers only: ``python -m weights_tools.inspect DIR``.

Prints the layout, layers and experts, the dtypes, the bytes per component (routed experts, attention,
embeddings, …) and what each shard holds. It never reads tensor data, so it takes a second on the
595 GB checkpoint. Problems found on the way are counted (exit status 1); ``weights_tools.verify`` lists them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from kimi_ref.checkpoint import ITEMSIZE, Checkpoint, CheckpointError, component, flat_name, is_mtp
from kimi_ref.config import ConfigError

from ._cli import FAILURE, INTERRUPTED, OK, USAGE, fail
from ._format import human_bytes, ranges, table

__all__ = ["summary", "main"]

_ORDER = ("routed_experts", "shared_experts", "router", "dense_mlp", "attention", "norms", "embed_tokens", "lm_head",
          "vision_tower", "mm_projector", "mtp")


def summary(path: str | Path) -> str:
    """The report ``inspect`` prints."""
    return _report(Checkpoint.open(path))


def _report(ckpt: Checkpoint) -> str:
    cfg = ckpt.config
    lines = [f"checkpoint {ckpt.path}"]
    lines.append(f"  config: {cfg.layout} layout (model_type {cfg.model_type!r}, text {cfg.text_model_type!r}), "
                 f"dtype {cfg.dtype}; tensor names {'language_model.model.* / language_model.lm_head' if cfg.layout == 'kimi_k25' else 'model.* / lm_head'}")
    moe = [layer for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)]
    dense = [layer for layer in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(layer)]
    lines.append(f"  layers: {cfg.num_hidden_layers} (dense MLP: {ranges(dense) or 'none'}; MoE: {ranges(moe) or 'none'}), "
                 f"d = {cfg.hidden_size}, vocabulary {cfg.vocab_size}")
    lines.append(f"  experts per MoE layer: {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, width "
                 f"{cfg.moe_intermediate_size}) + {cfg.n_shared_experts} shared")
    q = cfg.quantization
    lines.append("  quantization: none" if q is None else
                 f"  quantization: {q.quant_method} {q.format}, {q.num_bits}-bit {q.type} symmetric, group {q.group_size}; "
                 f"ignore {list(q.ignore)}")
    if cfg.vision is not None:
        v = cfg.vision
        lines.append(f"  vision: MoonViT {v.num_hidden_layers} blocks × {v.hidden_size} wide, patch {v.patch_size}, "
                     f"projector {v.mm_projector_type} → {v.text_hidden_size}")

    # Everything below comes from the headers: what the files really hold.
    per_component: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    packed_modules = 0
    shard_rows = []
    for file in ckpt.shard_files:
        header = ckpt.headers[file]
        comps: Counter[str] = Counter()
        layers: set[int] = set()
        size = 0
        for name, info in header.entries.items():
            nbytes = math.prod(info["shape"]) * ITEMSIZE[info["dtype"]]
            key = flat_name(name, cfg)
            comp = "mtp" if is_mtp(name, cfg) else component(key)
            per_component[comp][0] += 1
            per_component[comp][1] += nbytes
            per_dtype[info["dtype"]][0] += 1
            per_dtype[info["dtype"]][1] += nbytes
            packed_modules += name.endswith(".weight_packed")
            comps[comp] += 1
            if key.startswith("model.layers."):
                layers.add(int(key.split(".")[2]))
            size += nbytes
        what = ", ".join(c for c in _ORDER if comps[c])
        where = f"layers {ranges(sorted(layers))}: " if layers else ""
        shard_rows.append([file, str(len(header.entries)), human_bytes(size), where + what])

    total_tensors = sum(c for c, _ in per_component.values())
    total_bytes = sum(b for _, b in per_component.values())
    index_total = (ckpt.index or {}).get("metadata", {}).get("total_size")
    lines.append(f"  {len(ckpt.shard_files)} shard(s), {total_tensors} tensors, {human_bytes(total_bytes)} of tensor data"
                 + (f" (index total_size {human_bytes(index_total)})" if index_total is not None else ""))
    lines.append(f"  INT4 Linear modules (weight_packed): {packed_modules}")
    if ckpt.mtp:
        lines.append(f"  multi-token-prediction tensors (not used): {len(ckpt.mtp)}")
    lines.append("")
    lines.append(table([[d, str(c), human_bytes(b)] for d, (c, b) in sorted(per_dtype.items())],
                       ["dtype", "tensors", "bytes"], right={1, 2}))
    lines.append("")
    rows = [[c, str(per_component[c][0]), human_bytes(per_component[c][1]), f"{100 * per_component[c][1] / max(total_bytes, 1):.1f}%"]
            for c in _ORDER if c in per_component]
    lines.append(table(rows, ["component", "tensors", "bytes", "share"], right={1, 2, 3}))
    lines.append("")
    lines.append(table(shard_rows, ["shard", "tensors", "bytes", "holds"], right={1, 2}))
    if ckpt.problems:
        lines.append("")
        lines.append(f"{len(ckpt.problems)} problem(s) found in the index/headers: run python -m weights_tools.verify {ckpt.path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="checkpoint directory (config.json + safetensors)")
    args = parser.parse_args(argv)
    try:
        ckpt = Checkpoint.open(args.dir)
        print(_report(ckpt))
    except (CheckpointError, ConfigError, OSError) as e:
        return fail("inspect", e, USAGE)
    except KeyboardInterrupt:
        return fail("inspect", "stopped", INTERRUPTED)
    return FAILURE if ckpt.problems else OK


if __name__ == "__main__":
    sys.exit(main())
