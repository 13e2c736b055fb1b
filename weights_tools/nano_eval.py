"""Grade kimi-nano: greedy decoding, the real tool loop, exact answers, on any list of questions.

    python -m weights_tools.nano_eval [CKPT] [--n 100] [--dtype bfloat16] [--dense]   # --dense: experts before INT4

For each conversation the model plays every assistant turn itself: the prompt is rendered with the real
template from the history so far (its *own* earlier answers and reasoning, not the reference ones), it
generates greedily up to ``<|im_end|>``, the output is parsed with :func:`kimi_ref.tool_parsing.parse`, a
calculator call is executed and its result fed back as a tool message, until it answers without a call
(at most ``MAX_STEPS`` calls per user turn). :func:`grade` scores one conversation against what was
expected; :func:`evaluate` runs the held-out split of :mod:`weights_tools.nano_data` (phrasings never
trained on) and :func:`score` any list of :class:`Question` (tests/nano_questions.py: written by hand).

Scores (fractions of the conversations that have them):

* ``answer``      — the last number of the final answer equals the expected value (every question with one);
* ``tool_call``   — on questions that need the calculator: one call per user turn, each well formed (named
  ``calculator``, JSON arguments with an ``expression`` it evaluates) and giving the expected value;
* ``well_formed`` — every output of the conversation parses with no ``problems``: reasoning closed once,
  ended by ``<|im_end|>``, calls in the kimi_k2 grammar, and no marker left in the reasoning or answer;
* ``no_tool``     — on chit-chat: answered in words, without calling anything;
* ``uses_result`` — on questions whose last call worked: the final answer ends with the tool's result.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from kimi_ref.chat_template import render_ids
from kimi_ref.generate import generate
from kimi_ref.tool_parsing import parse
from weights_tools import nano_data

__all__ = ["Question", "play", "grade", "score", "evaluate", "heldout_questions", "dense_twin", "same_number",
           "MAX_STEPS"]

MAX_STEPS = 3
MAX_NEW_TOKENS = 96
# Marker text that must never reach the user: the special tokens, and the think tags typed as text.
_MARKERS = re.compile(r"<\|[a-z_]+\|>|</?think>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Question:
    """A conversation to play: the user's turns, the expected final value (None for chit-chat), and the
    values the calculator must return, one per call (empty: no tool may be called)."""

    turns: tuple[str, ...]
    answer: str | None
    results: tuple[str, ...] = ()


def same_number(a: str, b: str) -> bool:
    """Equal as decimals ("36" and "36.0" are; "1,234" is not a number here)."""
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text or "")
    return numbers[-1] if numbers else None


def play(model, tokenizer, user_turns: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """Run the conversation; returns (messages, calls, problems) where calls = [{"ok", "expression", "result"}]
    and problems lists every format fault of every output (empty: all well formed)."""
    im_end = tokenizer.special_id("<|im_end|>")
    history: list[dict] = []
    calls: list[dict] = []
    problems: list[str] = []
    for text in user_turns:
        history.append({"role": "user", "content": text})
        for _ in range(MAX_STEPS + 1):
            prompt = render_ids(history, tokenizer, tools=nano_data.TOOLS, variant=nano_data.VARIANT)
            out = generate(model, prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop_ids=[im_end])
            tokens = [t for t in out.tokens if t != im_end]
            parsed = parse(tokens, tokenizer)
            problems += parsed["problems"]
            if out.finish_reason != "stop":
                problems.append(f"no <|im_end|> within {MAX_NEW_TOKENS} tokens")
            for field in ("reasoning_content", "content"):
                if _MARKERS.search(parsed[field] or ""):
                    problems.append(f"a marker in the {field}: {parsed[field]!r}")
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
    return history, calls, problems


def grade(model, tokenizer, question: Question) -> dict:
    """Play ``question``; its scores (None where a score does not apply) and the conversation."""
    history, calls, problems = play(model, tokenizer, list(question.turns))
    final = history[-1]["content"] if history[-1]["role"] == "assistant" else ""
    last = _last_number(final)
    out: dict[str, Any] = {"answer": None, "tool_call": None, "well_formed": not problems, "no_tool": None,
                           "uses_result": None, "conversation": history, "problems": problems}
    if question.answer is not None:
        out["answer"] = last is not None and same_number(last, question.answer)
    if question.results:
        out["tool_call"] = len(calls) == len(question.results) and all(
            c["ok"] and same_number(c["result"], want) for c, want in zip(calls, question.results))
        if calls and calls[-1]["ok"]:
            out["uses_result"] = last is not None and same_number(last, calls[-1]["result"])
    else:
        out["no_tool"] = not calls
    return out


SCORES = ("answer", "tool_call", "well_formed", "no_tool", "uses_result")


@torch.inference_mode()
def score(model, tokenizer, questions: list[Question], kinds: list[str] | None = None, progress=None) -> dict:
    """Grade every question: {"scores", "counts", "by_kind" (answer or no_tool rate), "failures"}."""
    graded: dict[str, list[bool]] = {k: [] for k in SCORES}
    by_kind: dict[str, list[bool]] = {}
    failures = []
    for i, question in enumerate(questions):
        result = grade(model, tokenizer, question)
        for key in SCORES:
            if result[key] is not None:
                graded[key].append(result[key])
        ok = all(result[k] is not False for k in SCORES)
        kind = kinds[i] if kinds else "all"
        by_kind.setdefault(kind, []).append(ok)
        if not ok:
            failures.append({"kind": kind, "question": question, "problems": result["problems"],
                             "conversation": result["conversation"]})
        if progress:
            progress(i, kind, ok)
    return {"scores": {k: (sum(v) / len(v) if v else float("nan")) for k, v in graded.items()},
            "counts": {k: len(v) for k, v in graded.items()},
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, "failures": failures}


def heldout_questions(n: int, seed: int = 0) -> tuple[list[Question], list[str]]:
    """The first ``n`` held-out conversations of nano_data as questions, and their kinds."""
    questions, kinds = [], []
    for i in range(n):
        ex = nano_data.example(i, "heldout", seed)
        turns = tuple(m["content"] for m in ex.messages if m["role"] == "user")
        results = tuple(m["content"] for m in ex.messages if m["role"] == "tool")
        questions.append(Question(turns, ex.grade["answer"], results))
        kinds.append(ex.kind)
    return questions, kinds


def evaluate(model, tokenizer, n: int = 100, seed: int = 0, progress=None) -> dict:
    """:func:`score` on the first ``n`` held-out conversations (``by_kind``: all scores right, per kind)."""
    questions, kinds = heldout_questions(n, seed)
    return score(model, tokenizer, questions, kinds, progress)


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
    scores = {k: (None if v != v else v) for k, v in result["scores"].items()}  # NaN (no such question): null
    print(json.dumps({"checkpoint": str(path), "experts": "bf16" if args.dense else "as stored", **scores,
                      "counts": result["counts"], "all_right_by_kind": result["by_kind"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
