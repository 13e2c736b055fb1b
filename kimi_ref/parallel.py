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

**Pipeline stages** (``--pp P`` beside ``--tp T``, world = T × P). Global rank g sits in stage
s = g // T at TP rank t = g % T, so under torchrun with T GPUs per node a stage is a node:

    stage s holds the contiguous layers stage_layers(L, P)[s]    61 = 31 + 30 for P = 2
    stage 0: + embed_tokens (and the vision tower)               last stage: + final norm + lm_head
    each stage is one TP group (its own all-reduces, inside the node)
    between stages: send/recv of the residual stream [B,T,d], TP rank t to TP rank t of the next stage

Everything rank 0 decides (a command, a prompt, each step's token) reaches the others with
:func:`share`: a broadcast inside stage 0, then stage to stage, so only point-to-point messages cross
the slow link between nodes. A peer that died or stopped answering is a :class:`PeerError` naming its
stage, rank and node.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TP", "SINGLE", "TPError", "shard_dim", "all_reduce", "all_gather", "broadcast", "validate_tp",
           "init_process_group", "destroy_process_group", "new_group", "PP", "ONE_STAGE", "PeerError", "stage_layers",
           "validate_layout", "make_layout", "send", "recv", "share", "all_gather_object"]


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


class PeerError(RuntimeError):
    """A rank of another stage (usually another node) died or stopped answering a send/recv."""


@dataclass(frozen=True)
class PP:
    """This process's pipeline stage: ``stage`` of ``stages``, each stage a TP group of ``tp_size`` ranks.

    ``where`` names every global rank's machine (host and torchrun node), for errors about a peer.
    """
    stage: int = 0
    stages: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    where: tuple[str, ...] = ()

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def peer(self, stage: int) -> int:
        """The global rank with this process's TP rank in ``stage``."""
        return stage * self.tp_size + self.tp_rank

    @property
    def prev(self) -> int | None:
        return None if self.first else self.peer(self.stage - 1)

    @property
    def next(self) -> int | None:
        return None if self.last else self.peer(self.stage + 1)

    def describe(self, rank: int) -> str:
        """``rank 2 (stage 1 of 2, host h, node 1)``: the words an error about global ``rank`` uses."""
        machine = f", {self.where[rank]}" if rank < len(self.where) else ""
        return f"rank {rank} (stage {rank // self.tp_size} of {self.stages}{machine})"


ONE_STAGE = PP()


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous layer blocks, the first ``num_layers % stages`` stages one layer longer: 61, 2 -> [0..30], [31..60]."""
    base, extra = divmod(num_layers, stages)
    blocks, start = [], 0
    for s in range(stages):
        size = base + (s < extra)
        blocks.append(range(start, start + size))
        start += size
    return blocks


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


def validate_layout(config: Any, tp_size: int, pp_size: int, world_size: int | None = None) -> None:
    """Refuse ``--tp T --pp P`` before anything loads: T must divide the model, every stage needs a
    layer, and T × P must be the number of processes (when ``world_size`` is known)."""
    if not isinstance(pp_size, int) or pp_size < 1:
        raise TPError(f"--pp (pipeline stages) must be a positive integer, found {pp_size!r}")
    validate_tp(config, tp_size)
    if pp_size > config.num_hidden_layers:
        raise TPError(f"--pp {pp_size} asks for more pipeline stages than the model has decoder layers "
                      f"(num_hidden_layers = {config.num_hidden_layers}); every stage needs at least one layer")
    if world_size is not None and tp_size * pp_size != world_size:
        raise TPError(f"--tp {tp_size} × --pp {pp_size} = {tp_size * pp_size} ranks, but there are {world_size} "
                      "processes; the product must equal the world size")


# ---- collectives: no-ops on a single rank --------------------------------------------------------------


def all_reduce(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Sum ``x`` over ranks in place and return it."""
    if tp.world_size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TP, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    if tp.world_size == 1:
        return x

    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor, tp: TP, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s value (e.g. the sampled token)."""
    if tp.world_size == 1:
        return x
    dist.broadcast(x, src=src, group=tp.group)
    return x


# ---- process groups (kimi_ref/launch.py starts the workers; the torch.distributed calls live here) ----------


def init_process_group(rank: int, world_size: int, device: str = "cpu", init_method: str = "env://",
                       timeout_s: float = 1800.0) -> TP:
    """Join the default process group as ``rank`` of ``world_size``; gloo on CPU, NCCL on CUDA."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TP(rank=rank, world_size=world_size, group=None)


def destroy_process_group() -> None:
    """Leave the default process group (if any), so a later launch in this process can make a new one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def new_group(ranks: list[int]) -> Any:
    """A process group of the given global ranks. Every rank of the default group must call it, members or not."""
    return dist.new_group(ranks=list(ranks))


def all_gather_object(obj: Any, world: TP) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (used once, to learn where each rank runs)."""
    if world.world_size == 1:
        return [obj]

    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj, group=world.group)
    return out


def make_layout(world: TP, tp_size: int, pp_size: int) -> tuple[TP, PP] | tuple[None, None]:
    """Split ranks 0..T·P-1 of ``world`` into P stages of T: this rank's stage TP group and its :class:`PP`.

    Collective over ``world``: every rank calls it (also ranks beyond T·P, which get ``(None, None)``),
    because every rank must take part in making each stage's group.
    """
    if tp_size * pp_size > world.world_size:
        raise TPError(f"--tp {tp_size} × --pp {pp_size} needs {tp_size * pp_size} ranks; there are {world.world_size}")
    node = os.environ.get("GROUP_RANK")  # torchrun's node rank
    where = tuple(all_gather_object(socket.gethostname() + (f", node {node}" if node is not None else ""), world))
    groups = []
    for s in range(pp_size):
        ranks = list(range(s * tp_size, (s + 1) * tp_size))
        groups.append(world.group if tp_size == world.world_size else new_group(ranks) if tp_size > 1 else None)
    if world.rank >= tp_size * pp_size:
        return None, None
    stage, tp_rank = divmod(world.rank, tp_size)
    return TP(tp_rank, tp_size, groups[stage]), PP(stage, pp_size, tp_rank, tp_size, where)


# ---- point to point: between pipeline stages ------------------------------------------------------------


def send(x: torch.Tensor, dst: int, pp: PP) -> None:
    """Send ``x`` to global rank ``dst`` (the same TP rank of another stage); blocks until it is taken."""
    try:
        dist.send(x.contiguous(), dst=dst)
    except RuntimeError as e:
        raise PeerError(f"sending to {pp.describe(dst)} failed: it died or stopped answering "
                        f"({' '.join(str(e).split())[:200]})") from None


def recv(x: torch.Tensor, src: int, pp: PP) -> torch.Tensor:
    """Fill ``x`` (shape and dtype agreed beforehand) with what global rank ``src`` sends."""
    try:
        dist.recv(x, src=src)
    except RuntimeError as e:
        raise PeerError(f"waiting for {pp.describe(src)} failed: it died or stopped answering "
                        f"({' '.join(str(e).split())[:200]})") from None
    return x


def share(x: torch.Tensor, tp: TP, pp: PP = ONE_STAGE) -> torch.Tensor:
    """Rank 0's ``x`` on every rank: broadcast inside stage 0, then passed on stage to stage.

    Only point-to-point messages cross between stages (between nodes), each TP rank to its peer.
    """
    if pp.first:
        try:
            broadcast(x, tp)
        except RuntimeError as e:  # rank 0 (or a follower of stage 0) is gone: say so instead of a gloo trace
            raise PeerError(f"the broadcast inside stage 0 (ranks 0..{tp.world_size - 1}) failed: a rank of it "
                            f"died or stopped answering ({' '.join(str(e).split())[:200]})") from None
    else:
        recv(x, pp.prev, pp)
    if not pp.last:
        send(x, pp.next, pp)
    return x
