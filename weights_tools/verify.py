"""Check a checkpoint against its config: ``python -m weights_tools.verify DIR``.

Every tensor the config implies (``kimi_ref.checkpoint.expected_tensors``) must be in the index, in the
shard the index names, with the right shape and dtype; no shard may be missing or truncated; nothing
unexpected may be there (multi-token-prediction layers excepted); every INT4 ``weight_shape`` must hold
the config's (out, in). All problems are listed, not just the first. Exit status 0 = sound, 1 = problems.
Reads the headers and the tiny ``weight_shape`` tensors only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_ref.checkpoint import Checkpoint, CheckpointError
from kimi_ref.config import ConfigError

__all__ = ["problems", "main"]


def problems(path: str | Path) -> tuple[Checkpoint, list[str]]:
    """(the opened checkpoint, every problem found)."""
    ckpt = Checkpoint.open(path)
    return ckpt, ckpt.problems + ckpt.check_weight_shapes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.verify", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="checkpoint directory (config.json + safetensors)")
    args = parser.parse_args(argv)
    try:
        ckpt, found = problems(args.dir)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 2
    if found:
        print(f"{ckpt.path}: {len(found)} problem(s):")
        for p in found:
            print(f"  - {p}")
        return 1
    mtp = f"; {len(ckpt.mtp)} multi-token-prediction tensors skipped" if ckpt.mtp else ""
    print(f"{ckpt.path}: OK: all {len(ckpt.expected)} tensors match {ckpt.config.source} in "
          f"{len(ckpt.shard_files)} shard(s){mtp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
