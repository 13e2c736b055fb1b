"""Two torchrun "nodes" on localhost (2 × 2 ranks, gloo): the multi-node path, end to end on the CPU.

Each node is its own ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank R``
with a static rendezvous on 127.0.0.1, exactly as two machines would be started (docs/full_weight_run.md):

* TP 2 × PP 2 (a pipeline stage per node) and TP 4 × PP 1 (one TP group spanning both) give the
  logits of TP 1 (float32 tolerance) and the same greedy and seeded tokens (tests/torchrun_worker.py);
* ``kimi_ref.chat --tp 2 --pp 2`` across the two nodes: rank 0 alone reads stdin and prints, and its
  greedy answer is the TP 1 answer; when node 1 dies, node 0 stops with an error naming the dead
  stage and node, within a bounded time (no hang).

Every process started here is killed (by id, with its children) whatever happens.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kimi_ref import parallel
from kimi_ref.launch import free_port
from test_parallel import PROMPT, _rank_results, write_tiny
from tolerances import assert_close

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers and theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _node(rank: int, port: int, args: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny_multinode"))


def test_two_torchrun_nodes_match_tp1(tiny, tmp_path):
    out = tmp_path / "results.pt"
    port = free_port()
    nodes = [_node(r, port, [str(TESTS / "torchrun_worker.py"), str(tiny), str(out)],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        logs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            _kill_tree(n)
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    results = torch.load(out)
    single = _rank_results(parallel.SINGLE, "cpu", str(tiny), PROMPT)
    for (t, p), (logits, greedy, sampled, reason, held) in results.items():
        assert_close(logits, single[0], torch.float32, what=f"two-node TP {t} × PP {p} logits vs TP 1")
        assert (greedy, sampled, reason) == single[1:], f"two-node TP {t} × PP {p} tokens differ from TP 1"
        assert held == list(parallel.stage_layers(3, p)[0])


def _lines(stream) -> queue.Queue:
    """Lines of ``stream`` as they come, read on a thread, so every wait below has a deadline."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _read_until(q: queue.Queue, marker: str, deadline: float) -> list[str]:
    seen = []
    while True:
        line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            raise AssertionError("the chat ended before printing " + repr(marker) + ":\n" + "".join(seen))
        seen.append(line)
        if line.startswith(marker):
            return seen


def test_chat_across_two_nodes_then_node_1_dies(capsys):
    from kimi_ref import chat

    prompt = "What is 17*23?"
    flags = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6", "--temperature", "0"]
    assert chat.main(["--prompt", prompt, "--no-timings", *flags]) == 0
    reference = [line for line in capsys.readouterr().out.splitlines() if line.strip()]

    port = free_port()
    args = ["-m", "kimi_ref.chat", "--tp", "2", "--pp", "2", *flags]
    node1 = _node(1, port, args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node0 = _node(0, port, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, errors = _lines(node0.stdout), _lines(node0.stderr)
        node0.stdin.write(prompt + "\n")
        node0.stdin.flush()
        turn = _read_until(out, "──", time.monotonic() + 180)  # the answer, then its timing line
        answer = [line.rstrip("\n") for line in turn if line.strip() and not line.startswith(("you>", "──"))]
        assert answer == reference, (answer, reference)  # rank 0 alone printed it, the TP 1 greedy answer
        _kill_tree(node1)  # the whole second node: its torchrun agent and both workers
        started = time.monotonic()
        try:
            node0.stdin.write("And 2+2?\n")
            node0.stdin.close()
        except BrokenPipeError:  # node 0 noticed already and ended: what it said is checked below
            pass
        node0.wait(timeout=120)
        waited = time.monotonic() - started
        err = "".join(iter(lambda: errors.get(timeout=30), None))
    finally:
        _kill_tree(node0)
        _kill_tree(node1)
    assert node0.returncode != 0
    assert waited < 100
    said = [line for line in err.splitlines() if line.startswith("kimi_ref.chat: error:")]
    assert any("(stage 1 of 2" in line and "node 1)" in line and "died or stopped answering" in line
               for line in said), err[-3000:]
