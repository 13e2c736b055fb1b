"""Tensor parallelism: every ``torch.distributed`` call in kimi_ref lives in this file.

The layout is the one production engines use for DeepSeek-V3-style models (N ranks, r = this rank):

=====================================  ===========================  =========================================
tensor                                 split                        why
=====================================  ===========================  =========================================
embed_tokens.weight [V, d]             rows (vocab-parallel)        each rank looks up its own V/N ids; all-reduce
q_a_proj, kv_a_proj_with_mqa, norms    replicated                   small; every head needs the same latent
q_b_proj.weight [h·192, q_lora]        rows, by head                rank r owns heads [r·h/N, (r+1)·h/N)
kv_b_proj.weight [h·(128+128), 512]    rows, by head                the same heads
o_proj.weight [d, h·128]               columns, by head             partial sums → one all-reduce
mlp.gate.* (router)                    replicated                   every rank routes every token the same way
experts.E.*                            whole experts                rank r owns experts [r·E/N, (r+1)·E/N)
shared_experts / dense mlp gate, up    rows                         column-parallel SwiGLU
shared_experts / dense mlp down        columns                      row-parallel; joins the routed all-reduce
lm_head.weight [V, d]                  rows (vocab-parallel)        logits all-gathered along the vocabulary
=====================================  ===========================  =========================================

Per decoder layer that is two all-reduces (after o_proj, after the MLP/MoE), as in Megatron.
With ``world_size == 1`` every collective is a no-op and no process group is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TP", "SINGLE", "TPError", "shard_dim", "all_reduce", "all_gather", "broadcast", "validate_tp",
           "init_process_group", "destroy_process_group", "new_group"]


class TPError(ValueError):
    """A tensor-parallel size that does not divide the model, or a collective misused."""


@dataclass(frozen=True)
class TP:
    """Where this process sits: ``rank`` of ``world_size``, and the process group (``None`` = default)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def split(self, total: int, what: str) -> tuple[int, int]:
        """This rank's ``(start, size)`` of ``total`` items, which must divide evenly."""
        if total % self.world_size:
            raise TPError(f"{what} = {total} is not divisible by the tensor-parallel size {self.world_size}")
        size = total // self.world_size
        return self.rank * size, size

    def local(self, total: int, what: str) -> int:
        return self.split(total, what)[1]


SINGLE = TP()

# Which dimension of a weight is split across ranks, by the end of its (prefix-free) name.
# Routed experts are never split: a rank holds whole experts (see ``TP.split`` on n_routed_experts).
_SHARD_RULES: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"(^|\.)embed_tokens\.weight$"), 0),
    (re.compile(r"(^|\.)lm_head\.weight$"), 0),
    (re.compile(r"\.self_attn\.q_proj\.weight$"), 0),
    (re.compile(r"\.self_attn\.q_b_proj\.weight$"), 0),
    (re.compile(r"\.self_attn\.kv_b_proj\.weight$"), 0),
    (re.compile(r"\.self_attn\.o_proj\.weight$"), 1),
    (re.compile(r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$"), 0),
    (re.compile(r"\.mlp\.(shared_experts\.)?down_proj\.weight$"), 1),
)


def shard_dim(name: str) -> int | None:
    """The dimension of tensor ``name`` split across ranks, or ``None`` if every rank holds all of it."""
    if ".experts." in name and ".shared_experts." not in name:
        return None
    for pattern, dim in _SHARD_RULES:
        if pattern.search(name):
            return dim
    return None


def validate_tp(config: Any, world_size: int) -> None:
    """Refuse a TP size that does not divide heads, experts, vocabulary or MLP widths — before loading."""
    if world_size < 1:
        raise TPError(f"tensor-parallel size must be at least 1, found {world_size}")
    widths = {
        "num_attention_heads": config.num_attention_heads,
        "n_routed_experts": config.n_routed_experts,
        "vocab_size": config.vocab_size,
        "intermediate_size (dense MLP)": config.intermediate_size,
        "moe_intermediate_size × n_shared_experts (shared expert)": config.moe_intermediate_size * config.n_shared_experts,
    }
    bad = [f"{name} = {value}" for name, value in widths.items() if value and value % world_size]
    if bad:
        raise TPError(
            f"--tp {world_size} does not divide the model: " + ", ".join(bad)
            + f". Choose a size that divides all of them (for this config: "
            f"{', '.join(str(n) for n in range(1, 17) if all(not v or v % n == 0 for v in widths.values()))})"
        )


# ---- collectives: no-ops on a single rank --------------------------------------------------------------


def all_reduce(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Sum ``x`` over ranks in place and return it."""
    if tp.world_size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TP, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    if tp.world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor, tp: TP, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s value (e.g. the sampled token)."""
    if tp.world_size == 1:
        return x
    import torch.distributed as dist

    dist.broadcast(x, src=src, group=tp.group)
    return x


# ---- process groups (kimi_ref/launch.py starts the workers; the torch.distributed calls live here) ----------


def init_process_group(rank: int, world_size: int, device: str = "cpu", init_method: str = "env://",
                       timeout_s: float = 1800.0) -> TP:
    """Join the default process group as ``rank`` of ``world_size``; gloo on CPU, NCCL on CUDA."""
    import datetime

    import torch.distributed as dist

    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TP(rank=rank, world_size=world_size, group=None)


def destroy_process_group() -> None:
    """Leave the default process group (if any), so a later launch in this process can make a new one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def new_group(ranks: list[int]) -> Any:
    """A process group of the given global ranks. Every rank of the default group must call it, members or not."""
    import torch.distributed as dist

    return dist.new_group(ranks=list(ranks))
