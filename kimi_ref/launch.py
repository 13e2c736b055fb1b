"""Start N tensor-parallel ranks: our own worker processes, or the ones torchrun started.

    launch(fn, world_size, device, *args) -> fn(tp, device, *args) as rank 0 returned it

* **On our own** (``python -m kimi_ref.chat --tp 4``): this process becomes rank 0 and spawns ranks
  1..N-1 with ``torch.multiprocessing`` (the "spawn" start method: CUDA cannot survive a fork). Rank 0
  stays in the user's process so it keeps the terminal: stdin, Ctrl-C and the printed answer are its
  alone. The workers ignore Ctrl-C; rank 0 turns it into a "stop" flag that travels with the next
  broadcast token (see ``generate.py``), so no rank is ever left waiting inside a collective.
* **Under torchrun** (``torchrun --nproc-per-node 8 -m kimi_ref.chat --tp 8``): RANK, WORLD_SIZE and
  LOCAL_RANK are in the environment; every process runs ``fn`` for its own rank and no one spawns.

Processes meet through a TCP rendezvous on 127.0.0.1 (our own) or torchrun's ``env://``. The backend
is gloo on the CPU and NCCL on CUDA, where rank r drives ``cuda:LOCAL_RANK``. With ``world_size == 1``
nothing is spawned and no process group is made (every collective in ``parallel.py`` is then a no-op).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable

import torch

from kimi_ref import parallel
from kimi_ref.parallel import SINGLE, TP, TPError

__all__ = ["LaunchError", "sub_tp", "torchrun_env", "rank_device", "check_device", "free_port", "launch"]


class LaunchError(RuntimeError):
    """The ranks cannot be started: no such device, too few GPUs, a torchrun size that disagrees, a dead worker."""


def sub_tp(tp: TP, world_size: int) -> TP | None:
    """Ranks 0..world_size-1 of ``tp`` as a smaller tensor-parallel group (None on the ranks outside it).

    Collective: every rank of ``tp`` must call it, in the same order. Lets one launch try several TP
    sizes (the tests, the benchmark) instead of starting processes for each.
    """
    if world_size == tp.world_size:
        return tp
    if not 1 <= world_size <= tp.world_size:
        raise TPError(f"a sub-group of {world_size} ranks does not fit in {tp.world_size}")
    if world_size == 1:
        return TP() if tp.rank == 0 else None
    group = parallel.new_group(list(range(world_size)))
    return TP(rank=tp.rank, world_size=world_size, group=group) if tp.rank < world_size else None


# ---- where each rank runs ---------------------------------------------------------------------------------

def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun (or any env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise LaunchError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, found {os.environ.get('RANK')!r} / "
                          f"{os.environ.get('WORLD_SIZE')!r} / {os.environ.get('LOCAL_RANK')!r}") from None
    return rank, world, local


def check_device(device: str, world_size: int) -> None:
    """Refuse a device this machine does not have, before anything is loaded or spawned."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise LaunchError(f"--device {device!r} is not a device torch knows (use 'cpu' or 'cuda')") from None
    if kind == "cpu":
        return
    if kind != "cuda":
        raise LaunchError(f"--device {device!r}: only 'cpu' and 'cuda' are supported")
    if not torch.cuda.is_available():
        raise LaunchError(f"--device {device} was asked for, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Use --device cpu.")
    if torch.device(device).index is not None and world_size > 1:
        raise LaunchError(f"--device {device}: with --tp {world_size} give plain 'cuda'; rank r uses cuda:r")
    env = torchrun_env()
    if env is not None and env[1] > 1:  # torchrun (maybe several nodes): this process needs GPU LOCAL_RANK
        if torch.cuda.device_count() <= env[2]:
            raise LaunchError(f"LOCAL_RANK {env[2]} needs GPU cuda:{env[2]}; this machine has "
                              f"{torch.cuda.device_count()}")
    elif torch.cuda.device_count() < world_size:
        raise LaunchError(f"--tp {world_size} needs {world_size} GPUs (one per rank); "
                          f"this machine has {torch.cuda.device_count()}")


def rank_device(device: str, local_rank: int) -> str:
    """The device rank ``local_rank`` computes on: the CPU, or its own GPU."""
    if torch.device(device).type == "cuda":
        index = torch.device(device).index
        return f"cuda:{local_rank if index is None else index}"
    return "cpu"


def free_port() -> int:
    """A TCP port that was free a moment ago (the rendezvous for our own workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(world_size: int) -> int:
    # N ranks on one CPU share its cores; OMP_NUM_THREADS, when set, is the user's word.
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // world_size)


def _run_rank(rank: int, world_size: int, local_rank: int, device: str, init_method: str, timeout_s: float,
              fn: Callable[..., Any], args: tuple) -> Any:
    device = rank_device(device, local_rank)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(_threads_per_rank(world_size))
    tp = parallel.init_process_group(rank, world_size, device=device, init_method=init_method, timeout_s=timeout_s)
    try:
        return fn(tp, device, *args)
    finally:
        parallel.destroy_process_group()


def _worker(rank: int, world_size: int, device: str, init_method: str, timeout_s: float,
            fn: Callable[..., Any], args: tuple) -> None:
    """Entry point of a spawned rank (1..N-1): Ctrl-C belongs to rank 0, which stops us via a broadcast."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _run_rank(rank, world_size, rank, device, init_method, timeout_s, fn, args)
    # Done and disconnected: skip the interpreter's slow teardown of torch (rank 0 is waiting on us).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], world_size: int, device: str = "cpu", *args: Any,
           timeout_s: float = 1800.0, flags: str = "--tp") -> Any:
    """Run ``fn(tp, device, *args)`` on every rank of a ``world_size``-way tensor-parallel group.

    Returns what ``fn`` returned on this process's rank (rank 0 when we spawned the others). ``fn``
    must be importable by name (a module-level function) so spawned workers can find it.
    ``timeout_s`` bounds how long a collective waits for a rank that died or hangs. ``flags``: the
    command-line flags that asked for ``world_size`` ranks, for the message when torchrun disagrees.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise TPError(f"--tp must be a positive integer, found {world_size!r}")
    check_device(device, world_size)
    env = torchrun_env()
    if env is not None and env[1] > 1:
        rank, world, local = env
        if world != world_size:
            raise LaunchError(f"torchrun started {world} processes (WORLD_SIZE), but {flags} is {world_size}; "
                              "they must be equal")
        return _run_rank(rank, world, local, device, "env://", timeout_s, fn, args)
    if world_size == 1:
        device = rank_device(device, 0)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(device)
        return fn(SINGLE, device, *args)

    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, name=f"kimi_ref-rank{r}", daemon=True,
                               args=(r, world_size, device, init_method, timeout_s, fn, args))
               for r in range(1, world_size)]
    for w in workers:
        w.start()
    try:
        result = _run_rank(0, world_size, 0, device, init_method, timeout_s, fn, args)
    except BaseException:
        for w in workers:  # they may be blocked in a collective rank 0 will never join
            w.terminate()
        raise
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.terminate()
                w.join()
    dead = [f"rank {r} exited with code {w.exitcode}" for r, w in enumerate(workers, start=1) if w.exitcode]
    if dead:
        raise LaunchError("tensor-parallel worker(s) failed: " + "; ".join(dead))
    return result
