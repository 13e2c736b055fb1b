"""kimi-nano's held-out accuracy as it trains: grade the fp32 model saved every few hundred steps.

    python benchmarks/bench_nano_curve.py SNAPSHOTS [--steps 2400] [--every 240] [--n 40] [--out FILE.json]
                                          [--reference CKPT]   # e.g. the kimi-nano trained on the old data
    python benchmarks/bench_nano_curve.py --finished CKPT [CKPT ...] [--n 40] [--out FILE.json]

If ``SNAPSHOTS`` holds no ``step_N.pt`` yet, trains with :func:`weights_tools.train_nano.train` (the
script's defaults, one thread) and saves the fp32 state every ``--every`` steps there (``after_step``:
``torch.save`` only, so the run and its weights are those of ``python -m weights_tools.train_nano``).
Then grades each snapshot greedily with the real tool loop (:func:`weights_tools.nano_eval.evaluate`) on
the first ``--n`` held-out conversations, in fp32 with the experts before INT4, and writes
``{"steps": [...], "scores": {score: [...]}, "n": N}`` as JSON (chapter 13 plots it). ``--reference``
grades a finished checkpoint (as stored: INT4 experts) on the same questions, kept as ``"old_model"``
with the step count of its ``train_log.json``. (results/nano_curve.json was made with ``--steps 1700
--every 170`` on the data of the second kimi-nano, before the training-only variety of nano_data;
results/nano_curve_shipped.json with the defaults, on the shipped data: its last snapshot's experts are
the shipped ``dense_experts.safetensors``, bit for bit.)

``--finished`` grades whole runs instead of one run's snapshots: each checkpoint as stored (INT4 experts),
with the step count of its ``train_log.json``, written as ``{"n": N, "finished": [{"checkpoint", "steps",
"scores"}]}``: runs of different lengths, each with its own learning-rate schedule run to the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from kimi_ref.model import KimiForCausalLM
from kimi_ref.tokenizer import Tokenizer
from weights_tools import nano_eval, train_nano


def snapshots(directory: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in directory.glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", type=Path, nargs="?")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--every", type=int, default=240)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reference", type=Path, help="a finished checkpoint to grade on the same questions")
    parser.add_argument("--finished", type=Path, nargs="+", help="finished checkpoints to grade, one point each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.finished:
        return grade_finished(args.finished, args.n, args.out)
    if args.snapshots is None:
        parser.error("give SNAPSHOTS (a folder for the run's snapshots) or --finished CKPT ...")
    config = train_nano.nano_config()
    if not snapshots(args.snapshots):
        args.snapshots.mkdir(parents=True, exist_ok=True)

        def save(step: int, model) -> None:
            if (step + 1) % args.every == 0:
                torch.save(model.state_dict(), args.snapshots / f"step_{step + 1}.pt")

        train_nano.train(config, steps=args.steps, batch_size=16, after_step=save)
    tokenizer = Tokenizer.demo()
    model = KimiForCausalLM(config.replace(quantization=None), dtype=torch.float32).eval()
    result: dict = {"n": args.n, "steps": [], "scores": {}}
    if args.reference:
        steps, scores = grade_checkpoint(args.reference, args.n)
        result["old_model"] = {"steps": steps, "scores": scores}
        print(f"reference {args.reference} ({steps} steps): {result['old_model']['scores']}", flush=True)
    for step, path in snapshots(args.snapshots):
        model.load_state_dict(torch.load(path, weights_only=True))
        scores = nano_eval.evaluate(model, tokenizer, n=args.n)["scores"]
        result["steps"].append(step)
        for key, value in scores.items():
            result["scores"].setdefault(key, []).append(round(value, 4))
        print(f"step {step:5d}  " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
        if args.out:  # after every snapshot: a long grading stopped halfway still leaves its points
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def grade_checkpoint(path: Path, n: int) -> tuple[int, dict[str, float]]:
    """A finished checkpoint as stored (INT4 experts): its step count and held-out scores."""
    import kimi_ref

    model = kimi_ref.load_model(path, dtype=torch.bfloat16, progress=False)
    steps = json.loads((path / "train_log.json").read_text())["config"]["steps"]
    scores = nano_eval.evaluate(model, Tokenizer.from_pretrained(path), n=n)["scores"]
    return steps, {k: round(v, 4) for k, v in scores.items()}


def grade_finished(checkpoints: list[Path], n: int, out: Path | None) -> int:
    result: dict = {"n": n, "finished": []}
    for path in checkpoints:
        steps, scores = grade_checkpoint(path, n)
        result["finished"].append({"checkpoint": path.name, "steps": steps, "scores": scores})
        print(f"{path} ({steps} steps): {result['finished'][-1]['scores']}", flush=True)
        if out:
            out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
