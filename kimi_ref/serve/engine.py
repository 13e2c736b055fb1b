"""Rank 0's generation thread: a bounded queue of requests, run one at a time; the other TP ranks follow.

    HTTP handlers --submit(job)--> waiting (at most --max-queue jobs; a full queue is a 503)
    engine thread:  take the oldest job -> tell every rank to generate -> generate(), each token through
                    a Turn -> deltas, then the answer, handed to the job's ``emit`` (the handler's queue)

One generation at a time, because one KV cache and one sampling stream per run is what ``generate``
is: requests wait their turn in arrival order, never interleave. A job whose client went away
(``job.cancel``) is skipped if still waiting, and stopped after its next token if running: the stop
travels to every rank with that token (``generate``'s ``should_stop``), so no rank is left mid-collective.

The TP protocol (``--tp N``: ranks 1..N-1 run :func:`follow`). Rank 0 broadcasts a header
``[command, max_new_tokens, n_images]``: EXIT, NOOP (a heartbeat while idle, so a follower's wait never
reaches the process group's timeout), or GENERATE, followed by the prompt ids, and for images their
grids (t, h, w) and the pixel values themselves: unlike the chat CLI, whose images are known when it
starts, a server learns its images from requests, so the pixels travel from rank 0.
"""

from __future__ import annotations

import collections
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kimi_ref import parallel
from kimi_ref.generate import generate, make_generator, receive_ids, send_ids
from kimi_ref.parallel import TP
from kimi_ref.serve.prompt import Prepared
from kimi_ref.serve.requests import RequestError
from kimi_ref.serve.turn import Turn

__all__ = ["Job", "Engine", "follow", "HEARTBEAT_S"]

EXIT, GENERATE, NOOP = 0, 1, 2
HEARTBEAT_S = 60.0  # idle followers hear from rank 0 this often (the process group's timeout is 30 minutes)


@dataclass
class Job:
    """One request in the engine. ``emit`` receives Delta objects, then an Answer (or a RequestError)."""

    prepared: Prepared
    emit: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)


def _closing() -> RequestError:
    return RequestError("the server is shutting down", status=503, type="server_error", code="shutting_down")


class Engine:
    def __init__(self, model: Any, tokenizer: Any, tp: TP, device: str, max_queue: int,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.model, self.tok, self.tp, self.device = model, tokenizer, tp, device
        self.max_queue, self.heartbeat_s = max_queue, heartbeat_s
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.closed = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.heartbeats = 0  # NOOP headers sent to the followers
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="kimi_ref-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_room(self) -> None:
        """Refuse with a 503 when the queue is full or the server is closing (before any work on a request)."""
        with self._cond:
            if self.closed:
                raise _closing()
            if len(self.waiting) >= self.max_queue:
                raise RequestError(f"the server is busy: {len(self.waiting)} requests are already waiting "
                                   f"(--max-queue {self.max_queue}); try again later", status=503,
                                   type="server_error", code="queue_full")

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it as :meth:`check_room` does."""
        with self._cond:
            self.check_room()
            self.waiting.append(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return {"running": int(self.running is not None), "waiting": len(self.waiting), **self.counts}

    def close(self, timeout: float = 30.0) -> None:
        """Refuse what waits, stop what runs, tell the followers to exit; wait for the thread."""
        with self._cond:
            self.closed = True
            for job in self.waiting:
                job.emit(_closing())
            self.waiting.clear()
            if self.running is not None:
                self.running.cancel.set()
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the thread ----
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self.waiting and not self.closed:
                        self._cond.wait(self.heartbeat_s)
                    if self.closed:
                        return
                    job = self.waiting.popleft() if self.waiting else None
                    self.running = job
                if job is None:
                    self._header(NOOP)
                    self.heartbeats += self.tp.world_size > 1
                    continue
                try:
                    if job.cancel.is_set():
                        self.counts["cancelled"] += 1
                    else:
                        self._run(job)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails, the server goes on
                    traceback.print_exc(file=sys.stderr)
                    self.counts["failed"] += 1
                    job.emit(RequestError(f"the generation failed: {type(e).__name__}: {e}", status=500,
                                          type="server_error"))
                finally:
                    with self._cond:
                        self.running = None
        except BaseException:  # the thread cannot go on (a broken TP group): no request may wait for it
            traceback.print_exc(file=sys.stderr)
            self.close(timeout=0)
            raise
        finally:
            self._header(EXIT)

    def _header(self, command: int, max_new_tokens: int = 0, n_images: int = 0) -> None:
        if self.tp.world_size > 1:
            parallel.broadcast(torch.tensor([command, max_new_tokens, n_images], dtype=torch.long, device=self.device),
                               self.tp)

    def _run(self, job: Job) -> None:
        p = job.prepared
        media = None
        if p.media is not None:
            media = (p.media[0].to(self.device, torch.float32).contiguous(), p.media[1])
        self._header(GENERATE, p.max_new_tokens, 0 if media is None else len(media[1]))
        send_ids(p.ids, self.tp, self.device)
        if media is not None:
            send_ids([media[0].shape[-1]] + [v for grid in media[1] for v in grid], self.tp, self.device)
            parallel.broadcast(media[0], self.tp)
        turn = Turn(self.tok, p.prompt_tokens, p.stop, p.starts_in_reasoning, p.stop_ids)
        failure: list[BaseException] = []

        def on_token(token: int) -> None:
            # Never raise inside generate(): the other ranks would be left mid-collective. A failure here
            # stops the generation with the next token, on every rank, and is reported after it.
            if failure:
                return
            try:
                for delta in turn.feed(token):
                    job.emit(delta)
            except Exception as e:  # noqa: BLE001
                failure.append(e)

        result = generate(self.model, p.ids, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          top_p=p.top_p, generator=make_generator(p.seed), stop_ids=p.stop_ids,
                          on_token=on_token, should_stop=lambda: job.cancel.is_set() or turn.stopped or bool(failure),
                          tp=self.tp, media=media)
        if failure:
            raise failure[0]
        if job.cancel.is_set():  # the client left, or the server is closing: no one waits for an answer
            self.counts["cancelled"] += 1
            job.emit(_closing() if self.closed else RequestError("the request was cancelled", status=499,
                                                                 type="server_error", code="cancelled"))
            return
        deltas, answer = turn.finish(result.finish_reason)
        for delta in deltas:
            job.emit(delta)
        self.counts["completed"] += 1
        job.emit(answer)


def follow(model: Any, tp: TP, device: str) -> None:
    """Ranks 1..N-1: generate whatever rank 0 announces, until it says EXIT."""
    while True:
        header = torch.zeros(3, dtype=torch.long, device=device)
        parallel.broadcast(header, tp)
        command, max_new_tokens, n_images = (int(v) for v in header)
        if command == EXIT:
            return
        if command == NOOP:
            continue
        ids = receive_ids(None, tp, device)
        media = None
        if n_images:
            patch, *flat = receive_ids(None, tp, device)
            grids = [tuple(flat[3 * i:3 * i + 3]) for i in range(n_images)]
            rows = sum(t * h * w for t, h, w in grids)
            pixels = torch.empty(rows, 3, patch, patch, dtype=torch.float32, device=device)
            parallel.broadcast(pixels, tp)
            media = (pixels, grids)
        generate(model, ids, max_new_tokens=max_new_tokens, tp=tp, media=media)  # sampling: rank 0's alone
