"""One-shot chat end to end: ``python -m kimi_ref.chat --prompt ...`` from process start to exit, on CPU.

    python benchmarks/bench_chat_start.py [--rounds 7] [--threads 1 2] [--prompt "What is 17*23?"] [--out FILE.md]
    # each run: python -m kimi_ref.chat --prompt PROMPT --temperature 0 --threads T

Each round runs every ``--threads`` setting once, interleaved (1, 2, 1, 2, ...), so a busy spell on a
shared machine lands on all settings alike; the table reports medians (and the range) of:

* **CPU s** — user + system time of the whole process (torch's import included), from ``getrusage``:
  what the run costs, whatever else the machine is doing;
* **first token s** — wall time from spawning the process to the first byte it prints (the chat flushes
  every token): what a user waits before anything appears;
* **total s** — wall time to exit.

A baseline row times ``python -c "import torch"`` the same way: the floor any torch program pays.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def run_once(cmd: list[str]) -> dict[str, float]:
    """Spawn ``cmd``; wall time to its first stdout byte and to exit, and its CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - start
    rest = proc.stdout.read()
    code = proc.wait()
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}: {(first + rest).decode()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "first": first_at if first else float("nan"), "total": total, "output": (first + rest).decode()}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", default="What is 17*23?")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    settings = {"import torch": [sys.executable, "-c", "import torch"]}
    for t in args.threads:
        settings[f"chat, --threads {t}"] = [sys.executable, "-m", "kimi_ref.chat", "--prompt", args.prompt,
                                            "--temperature", "0", "--threads", str(t)]
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, cmd in settings.items():
            results[name].append(run_once(cmd))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    load = os.getloadavg()
    lines = [f"Command: `python benchmarks/bench_chat_start.py --rounds {args.rounds}` ({env_note}); prompt "
             f"{args.prompt!r}, kimi-nano, greedy (--temperature 0). Machine: {os.cpu_count()}-core "
             f"{platform.machine()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) "
             f"at the end. Medians of {args.rounds} interleaved runs, (min–max).", "",
             "| run | CPU s | first token s | total s |", "|---|---|---|---|"]
    for name, runs in results.items():
        first = "—" if name == "import torch" else summary([r["first"] for r in runs])
        lines.append(f"| {name} | {summary([r['cpu'] for r in runs])} | {first} | {summary([r['total'] for r in runs])} |")
    last = results[f"chat, --threads {args.threads[0]}"][-1]["output"]
    lines += ["", "What the chat printed (last run):", "", "```text", last.rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
