"""Grade kimi-nano on the held-out conversations: greedy decoding, the real tool loop, exact answers.

    python -m weights_tools.nano_eval [CKPT] [--n 100] [--dtype bfloat16] [--dense]   # --dense: experts before INT4

For each held-out conversation of :mod:`weights_tools.nano_data` the model plays every assistant turn
itself: the prompt is rendered with the real template from the history so far (its *own* earlier
answers and reasoning, not the reference ones), it generates greedily up to ``<|im_end|>``, the output
is parsed with :func:`kimi_ref.tool_parsing.parse`, a calculator call is executed and its result fed
back as a tool message, until it answers without a call (at most ``MAX_STEPS`` calls per user turn).

Scores (fractions of the conversations that have them):

* ``arithmetic`` — the last answer contains the right number (every kind with a number to find);
* ``well_formed`` — on the kinds that need the calculator: the model called it, and every call is well
  formed (one call, named ``calculator``, JSON arguments with an ``expression`` the calculator evaluates);
* ``tool_call``  — the same, and every call asks for the right value;
* ``uses_result`` — among those, the final answer contains the number the tool returned.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from kimi_ref.chat_template import render_ids
from kimi_ref.generate import generate
from kimi_ref.tool_parsing import parse
from weights_tools import nano_data

__all__ = ["play", "evaluate", "dense_twin", "MAX_STEPS"]

MAX_STEPS = 3
MAX_NEW_TOKENS = 96


def _contains_number(text: str, number: int) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(str(number))}(?![\d]|\.\d)", text or "") is not None


def play(model, tokenizer, user_turns: list[str]) -> tuple[list[dict], list[dict]]:
    """Run the conversation; returns (messages, calls) where calls = [{"ok", "expression", "result"}]."""
    im_end = tokenizer.special_id("<|im_end|>")
    history: list[dict] = []
    calls: list[dict] = []
    for text in user_turns:
        history.append({"role": "user", "content": text})
        for _ in range(MAX_STEPS + 1):
            prompt = render_ids(history, tokenizer, tools=nano_data.TOOLS, variant=nano_data.VARIANT)
            out = generate(model, prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop_ids=[im_end])
            tokens = [t for t in out.tokens if t != im_end]
            parsed = parse(tokens, tokenizer)
            message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
            if parsed["reasoning_content"]:
                message["reasoning_content"] = parsed["reasoning_content"]
            if not parsed["tool_calls"]:
                history.append(message)
                break
            message["tool_calls"] = [{k: c[k] for k in ("id", "type", "function")} for c in parsed["tool_calls"]]
            history.append(message)
            for call in parsed["tool_calls"]:
                record = {"ok": False, "expression": None, "result": None}
                try:
                    args = json.loads(call["function"]["arguments"])
                    record["expression"] = args["expression"]
                    content = nano_data.calculator(args["expression"])  # "error: ..." for what it cannot evaluate
                    evaluated = not content.startswith("error:")
                    record["result"] = content if evaluated else None
                    record["ok"] = (evaluated and call["function"]["name"] == "calculator"
                                    and len(parsed["tool_calls"]) == 1)
                except (ValueError, KeyError, TypeError) as e:
                    content = f"error: {e}"
                calls.append(record)
                history.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                "content": content})
    return history, calls


def _expected_results(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


@torch.inference_mode()
def evaluate(model, tokenizer, n: int = 100, seed: int = 0, progress=None) -> dict:
    """Play ``n`` held-out conversations; return the three scores and the failures (for reading)."""
    graded = {"arithmetic": [], "well_formed": [], "tool_call": [], "uses_result": []}
    by_kind: dict[str, list[bool]] = {}
    failures = []
    for i in range(n):
        ex = nano_data.example(i, "heldout", seed)
        users = [m["content"] for m in ex.messages if m["role"] == "user"]
        history, calls = play(model, tokenizer, users)
        final = history[-1]["content"] if history[-1]["role"] == "assistant" else ""
        ok_answer = ex.grade["answer"] is None or _contains_number(final, ex.grade["answer"])
        if ex.grade["answer"] is not None:
            graded["arithmetic"].append(ok_answer)
        if ex.grade["tool"]:
            want = _expected_results(ex.messages)
            graded["well_formed"].append(bool(calls) and all(c["ok"] for c in calls))
            ok_calls = len(calls) == len(want) and all(c["ok"] and c["result"] == w for c, w in zip(calls, want))
            graded["tool_call"].append(ok_calls)
            if calls and calls[-1]["ok"]:
                graded["uses_result"].append(_contains_number(final, int(float(calls[-1]["result"]))))
        if not ok_answer or (ex.grade["tool"] and not graded["tool_call"][-1]):
            failures.append({"kind": ex.kind, "expected": ex.grade["answer"], "conversation": history})
        by_kind.setdefault(ex.kind, []).append(ok_answer)
        if progress:
            progress(i, ex.kind, ok_answer)
    scores = {k: (sum(v) / len(v) if v else float("nan")) for k, v in graded.items()}
    kinds = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return {"scores": scores, "counts": {k: len(v) for k, v in graded.items()}, "by_kind": kinds,
            "failures": failures}


def dense_twin(path: str | Path, int4_model) -> torch.nn.Module:
    """``int4_model`` with the bf16 experts its INT4 ones were quantized from (``dense_experts.safetensors``
    beside the checkpoint, written by ``train_nano``): the same model before quantization."""
    from safetensors.torch import load_file

    from kimi_ref.config import load_config
    from kimi_ref.model import KimiForCausalLM
    from weights_tools.train_nano import DENSE_EXPERTS_FILE

    dense_file = Path(path) / DENSE_EXPERTS_FILE
    if not dense_file.is_file():
        raise FileNotFoundError(f"{dense_file}: not found; only checkpoints written by weights_tools.train_nano "
                                "keep their experts before quantization")
    config = load_config(path).replace(quantization=None)
    dtype = next(int4_model.parameters()).dtype
    model = KimiForCausalLM(config, dtype=dtype)
    state = {k: v for k, v in int4_model.state_dict().items() if ".mlp.experts." not in k}
    state.update({k: v.to(dtype) for k, v in load_file(str(dense_file)).items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    import kimi_ref
    from kimi_ref.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m weights_tools.nano_eval", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?", help="checkpoint directory (default: the shipped kimi-nano)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--dense", action="store_true",
                        help="grade the model before INT4: its experts from dense_experts.safetensors")
    args = parser.parse_args(argv)
    from kimi_ref.chat import ChatError, default_checkpoint
    from kimi_ref.checkpoint import CheckpointError
    from kimi_ref.config import ConfigError
    from kimi_ref.tokenizer import TokenizerError
    from weights_tools._cli import INTERRUPTED, USAGE, fail

    if args.n < 1:
        return fail("nano_eval", f"--n must be at least 1, found {args.n}", USAGE)
    try:
        path = Path(args.ckpt) if args.ckpt else default_checkpoint()
        model = kimi_ref.load_model(path, dtype=getattr(torch, args.dtype), progress=False)
        if args.dense:
            model = dense_twin(path, model)
        tok = Tokenizer.from_pretrained(path)
    except (ChatError, CheckpointError, ConfigError, TokenizerError, OSError) as e:
        return fail("nano_eval", e, USAGE)
    try:
        result = evaluate(model, tok, n=args.n)
    except KeyboardInterrupt:
        return fail("nano_eval", "stopped before the evaluation was complete", INTERRUPTED)
    print(json.dumps({"checkpoint": str(path), "experts": "bf16" if args.dense else "as stored", **result["scores"],
                      "counts": result["counts"], "answer_rate_by_kind": result["by_kind"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
