"""What rank 0 tells the other ranks, and how it gets there: one protocol for chat.py, generate.py (and serve).

Rank 0 alone reads the user, samples and prints; every other rank follows. Whatever it decides
reaches the others through :func:`kimi_ref.parallel.share`: a broadcast inside stage 0's TP group,
then TP rank t of each stage to TP rank t of the next (send/recv). Three messages, each a small tensor:

    command   int64 [what, max_new_tokens]                    a chat session: GENERATE a reply, or EXIT
    ids       int64 [n], then int64 [n]                       a prompt's ids; which images it shows
    step      float64 [verdict, token, u, temperature, top_p]  once per token, the step's control

**A step.** Rank 0 holds the token the last step produced and decides the verdict: a stop id, Ctrl-C
(interrupted), the token budget (length), or go on. When it goes on, rank 0 also draws the uniform ``u``
for the next token from its seeded generator, so the sampling stream is rank 0's alone, exactly as in
one process. The step travels to every stage; each computes its layers; the last stage's ranks pick the
next token from their (identical, all-gathered) logits with that ``u`` (``generate.pick_token``), and
with several stages TP rank 0 of the last stage sends it back to rank 0 (:func:`token_home`), which
closes the ring:

    rank 0 ──step──▶ stage 0 ──step, residual──▶ stage 1 … ──▶ last stage: logits → token
       ▲                                                                          │
       └──────────────────────────── token (int64, to rank 0) ◀───────────────────┘

A float64 holds every token id exactly (ids < 2^53), so one tensor carries the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kimi_ref import parallel
from kimi_ref.parallel import ONE_STAGE, PP, TP

__all__ = ["GENERATE", "EXIT", "GO", "STOP", "INTERRUPTED", "LENGTH", "FINISH_REASONS", "Step", "share_step",
           "token_home", "command", "send_ids", "receive_ids"]

# Commands of a chat session.
EXIT, GENERATE = 0, 1

# A step's verdict: go on, or why the generation ends (with the token the step carries).
GO, STOP, INTERRUPTED, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", INTERRUPTED: "interrupted", LENGTH: "length"}


@dataclass(frozen=True)
class Step:
    """One step's control: the token to feed (-1 for the prefill) and what to do with it.

    ``u`` is the uniform draw for the token this step will produce (NaN: greedy, or no next token).
    """

    verdict: int
    token: int
    u: float
    temperature: float
    top_p: float

    def tensor(self, device: torch.device | str) -> torch.Tensor:
        return torch.tensor([self.verdict, self.token, self.u, self.temperature, self.top_p], dtype=torch.float64,
                            device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Step":
        verdict, token, u, temperature, top_p = t.tolist()
        return cls(int(verdict), int(token), u, temperature, top_p)

    @property
    def goes_on(self) -> bool:
        return self.verdict == GO

    @property
    def greedy(self) -> bool:
        return math.isnan(self.u)


def share_step(step: Step | None, tp: TP, pp: PP = ONE_STAGE, device: torch.device | str = "cpu") -> Step:
    """Rank 0 passes its ``step``; every rank (of every stage) returns it."""
    buf = step.tensor(device) if step is not None else torch.zeros(5, dtype=torch.float64, device=device)
    return Step.from_tensor(parallel.share(buf, tp, pp))


def token_home(token: int | None, pp: PP, device: torch.device | str = "cpu") -> int | None:
    """The last stage's picked ``token`` back to rank 0, the only rank that decides with it (from TP rank 0
    of the last stage); None on every other rank. With one stage the token is already home: returned as it is.
    """
    if pp.stages == 1:
        return token
    if pp.tp_rank != 0:
        return None
    if pp.last:
        parallel.send(torch.tensor([token], dtype=torch.long, device=device), pp.peer(0), pp)
        return None
    if pp.first:
        return int(parallel.recv(torch.empty(1, dtype=torch.long, device=device), pp.peer(pp.stages - 1), pp)[0])
    return None


def command(tp: TP, pp: PP, device: torch.device | str, what: int, argument: int = 0) -> tuple[int, int]:
    """Rank 0 says what comes next, ``(GENERATE, max_new_tokens)`` or ``(EXIT, 0)``; every rank returns it."""
    message = torch.tensor([what, argument], dtype=torch.long, device=device)
    parallel.share(message, tp, pp)
    return int(message[0]), int(message[1])


def send_ids(ids: Sequence[int] | None, tp: TP, device: torch.device | str = "cpu", pp: PP = ONE_STAGE) -> list[int]:
    """Rank 0 passes ``ids``; every rank returns them. Length first, then the ids."""
    if tp.world_size == 1 and pp.stages == 1:
        return list(ids or [])
    root = pp.first and tp.rank == 0
    n = torch.tensor([len(ids) if root else 0], dtype=torch.long, device=device)
    parallel.share(n, tp, pp)
    buf = (torch.tensor(list(ids), dtype=torch.long, device=device) if root
           else torch.empty(int(n.item()), dtype=torch.long, device=device))
    if int(n.item()):
        parallel.share(buf, tp, pp)
    return buf.tolist()


receive_ids = send_ids  # the followers' side of the same call reads better under this name
