"""Run under torchrun by tests/test_multinode.py, on every rank of two localhost "nodes" of 2 ranks:

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank R ... tests/torchrun_worker.py CKPT OUT

``kimi_ref.launch`` takes torchrun's RANK / WORLD_SIZE / LOCAL_RANK; every rank then computes the
prompt's logits, a greedy and a seeded continuation at TP 2 × PP 2 (a stage per node) and TP 4 × PP 1
(one TP group across both nodes). Rank 0 saves what it gathered to OUT.
"""

import sys

import torch

from kimi_ref.launch import launch
from test_parallel import PROMPT, _layout_results

LAYOUTS = [(2, 2), (4, 1)]


def _rank(world, device, ckpt: str, out: str) -> None:
    results = {layout: _layout_results(world, device, ckpt, PROMPT, *layout) for layout in LAYOUTS}
    if world.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    launch(_rank, 4, "cpu", sys.argv[1], sys.argv[2], timeout_s=120)
