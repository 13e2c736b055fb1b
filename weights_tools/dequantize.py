"""One routed expert to bf16, for study: ``python -m weights_tools.dequantize DIR --layer L --expert E``.

Reads only that expert's nine tensors (``…experts.E.{gate,up,down}_proj.weight_{packed,scale,shape}``),
dequantizes ``W = q · scale`` with ``kimi_ref.int4`` and prints shapes and statistics; with
``--out FILE`` it also writes ``{gate,up,down}_proj.weight`` (bf16) to a safetensors file (a new file
outside the checkpoint; ``--force`` replaces an existing one; see :mod:`weights_tools.safe_write`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kimi_ref import int4
from kimi_ref.checkpoint import INT4_PARTS, Checkpoint, CheckpointError, checkpoint_name, is_quantized
from kimi_ref.config import ConfigError

from ._cli import FAILURE, INTERRUPTED, USAGE, fail
from ._format import human_bytes
from .safe_write import OutputError, check_file, write_file

__all__ = ["dequantize_expert", "main"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def dequantize_expert(path: str | Path, layer: int, expert: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """{"gate_proj.weight": [w, d], "up_proj.weight": [w, d], "down_proj.weight": [d, w]} of one routed expert."""
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    if not 0 <= layer < cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
        moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        raise CheckpointError(f"--layer {layer} has no routed experts; MoE layers are {moe[0]}..{moe[-1]}" if moe
                              else f"--layer {layer}: this model has no MoE layers", str(ckpt.path))
    if not 0 <= expert < cfg.n_routed_experts:
        raise CheckpointError(f"--expert {expert} is outside 0..{cfg.n_routed_experts - 1}", str(ckpt.path))
    out: dict[str, torch.Tensor] = {}
    for proj in PROJECTIONS:
        module = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
        if not is_quantized(cfg, module):  # a dense expert (quantization_config says so): copy it as is
            out[f"{proj}.weight"] = ckpt.read(checkpoint_name(module + ".weight", cfg)).to(dtype)
            continue
        names = {part: checkpoint_name(f"{module}.{part}", cfg) for part in INT4_PARTS}
        bad = [p for n, p in ckpt.issues if n in names.values()]
        if bad:
            raise CheckpointError(bad, str(ckpt.path))
        packed, scale, shape = (ckpt.read(names[p]) for p in INT4_PARTS)
        dense_shape = int4.read_weight_shape(shape, names["weight_shape"])
        out[f"{proj}.weight"] = int4.dequantize(packed, scale, dense_shape, dtype, cfg.quantization.group_size)  # type: ignore[union-attr]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.dequantize", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="checkpoint directory")
    parser.add_argument("--layer", type=int, required=True, help="decoder layer (a MoE layer)")
    parser.add_argument("--expert", type=int, required=True, help="routed expert index")
    parser.add_argument("--out", help="write the bf16 weights to this safetensors file (never inside DIR)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.out:
            check_file(args.out, force=args.force, protect=[args.dir], what="--out")
        weights = dequantize_expert(args.dir, args.layer, args.expert)
    except (CheckpointError, ConfigError, int4.Int4Error, OSError, OutputError) as e:
        return fail("dequantize", e, USAGE)
    except KeyboardInterrupt:
        return fail("dequantize", "before anything was written", INTERRUPTED)
    packed_total = 0
    for name, w in weights.items():
        out_f, in_f = w.shape
        packed_total += int4.packed_bytes(out_f, in_f)
        wf = w.float()
        print(f"layer {args.layer} expert {args.expert} {name}: {list(w.shape)} {w.dtype}, "
              f"|w|max {wf.abs().max():.4g}, std {wf.std():.4g}, "
              f"{len(torch.unique(wf))} distinct values")
    dense_total = sum(w.numel() * 2 for w in weights.values())
    print(f"INT4 storage {human_bytes(packed_total)} vs bf16 {human_bytes(dense_total)} "
          f"({dense_total / packed_total:.2f}× smaller)")
    if args.out:
        tensors = {k: v.contiguous() for k, v in weights.items()}
        try:
            write_file(args.out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                       force=args.force, protect=[args.dir], what="--out")
        except OutputError as e:
            return fail("dequantize", e, FAILURE)
        except KeyboardInterrupt:
            return fail("dequantize", f"{args.out} was not written", INTERRUPTED)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
