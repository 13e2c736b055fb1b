"""Check a checkpoint against its config: ``python -m weights_tools.verify DIR``.

Every tensor the config implies (``kimi_ref.checkpoint.expected_tensors``) must be in the index, in the
shard the index names, with the right shape and dtype; no shard may be missing or truncated; nothing
unexpected may be there (multi-token-prediction layers excepted); every INT4 ``weight_shape`` must hold
the config's (out, in). Then what the chat relies on (:func:`kimi_ref.checkpoint_chat.chat_setup`, the same check the chat runs at
load time): the chat template variant the checkpoint's files name, its special-token ids against
kimi_ref's table, ``generation_config.json``, and -- when the checkpoint ships a chat template and jinja2
is installed -- kimi_ref's template rendered against it byte for byte on the built-in suite.
All problems are listed, not just the first. Exit status 0 = sound, 1 = problems,
2 = not a checkpoint it can open, 130 = interrupted.
Reads the headers and the tiny ``weight_shape`` tensors only -- unless ``--scan``, which also reads every
value and names each floating-point tensor holding NaN or Inf (slow on the real 595 GB: all of it is read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kimi_ref.checkpoint import Checkpoint, CheckpointError
from kimi_ref.config import ConfigError

from ._cli import FAILURE, INTERRUPTED, OK, USAGE, fail

__all__ = ["problems", "chat_check", "scan", "unindexed_shards", "main"]


def problems(path: str | Path) -> tuple[Checkpoint, list[str]]:
    """(the opened checkpoint, every problem found)."""
    ckpt = Checkpoint.open(path)
    return ckpt, ckpt.problems + ckpt.check_weight_shapes()


def chat_check(ckpt: Checkpoint, variant: str | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of the chat setup: what ``python -m kimi_ref.chat --ckpt DIR`` would decide or refuse."""
    from kimi_ref.checkpoint_chat import ChatSetupError, VariantUnknown, chat_setup

    names = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")
    if not any((ckpt.path / name).is_file() for name in names):
        return [], [f"no {', '.join(names)}: the chat-template checks were skipped"]
    try:
        setup = chat_setup(ckpt.path, variant, layout=ckpt.config.layout)
    except VariantUnknown as e:
        return [], [f"{e} (verify --variant V checks it as V)"]
    except ChatSetupError as e:
        return [str(e) + "".join(f"\n      {line}" for line in e.details.splitlines())], []
    return [], setup.describe().splitlines() + list(setup.notes)


# Safetensors files a checkpoint may hold beside its shards (train_nano's experts before INT4).
NOT_SHARDS = ("dense_experts.safetensors",)


def unindexed_shards(ckpt: Checkpoint) -> list[str]:
    """``*.safetensors`` files in the directory that the index does not name (stale, or someone else's)."""
    if ckpt.index is None:
        return []
    named = set(ckpt.weight_map.values())
    return sorted(p.name for p in ckpt.path.glob("*.safetensors") if p.name not in named and p.name not in NOT_SHARDS)


def scan(ckpt: Checkpoint) -> list[str]:
    """Every floating-point tensor of the (readable) shards that holds NaN or Inf, by name, with counts."""
    found = []
    for file in ckpt.shard_files:
        for name, info in sorted(ckpt.headers[file].entries.items()):
            if info["dtype"] not in ("BF16", "F16", "F32", "F64"):
                continue  # integers (INT4 packs, shapes) cannot hold NaN
            try:
                t = ckpt.read(name)
            except Exception as e:  # noqa: BLE001 - a shard that breaks mid-read is a problem to list, not a crash
                found.append(f"tensor {name!r} in {ckpt.path / file}: cannot be read ({type(e).__name__}: {e})")
                continue
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or inf:
                found.append(f"tensor {name!r} in {ckpt.path / file}: {nan} NaN and {inf} Inf of {t.numel()} values")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.verify", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--scan", action="store_true", help="also read every value: name tensors with NaN or Inf")
    parser.add_argument("--variant", default=None,
                        help="check the chat template as this variant (default: the one the checkpoint names)")
    args = parser.parse_args(argv)
    try:
        ckpt, found = problems(args.dir)
        if args.scan:
            found += scan(ckpt)
        chat_problems, chat_notes = chat_check(ckpt, args.variant)
        found += chat_problems
    except (CheckpointError, ConfigError, OSError) as e:
        return fail("verify", e, USAGE)
    except KeyboardInterrupt:
        return fail("verify", "stopped before the check was complete", INTERRUPTED)
    if found:
        print(f"{ckpt.path}: {len(found)} problem(s):")
        for p in found:
            print(f"  - {p}")
        return FAILURE
    for stray in unindexed_shards(ckpt):
        print(f"note: {ckpt.path / stray} is on disk but not in the index: nothing loads it "
              "(left over from another checkpoint?)")
    mtp = f"; {len(ckpt.mtp)} multi-token-prediction tensors skipped" if ckpt.mtp else ""
    values = ", every value finite" if args.scan else ""
    print(f"{ckpt.path}: OK: all {len(ckpt.expected)} tensors match {ckpt.config.source} in "
          f"{len(ckpt.shard_files)} shard(s){mtp}{values}")
    for note in chat_notes:
        print(f"chat: {note}")
    return OK


if __name__ == "__main__":
    sys.exit(main())
