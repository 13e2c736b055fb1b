"""kimi-nano's training data: small conversations in the real K2.7-Code chat format, generated.

    python -m weights_tools.nano_data --n 5 [--seed S] [--split train|heldout]   # print a few, rendered

Every example is a list of OpenAI-style messages, rendered with the real template
(:func:`kimi_ref.chat_template.render_ids`, variant ``k2.7-code``: thinking on, reasoning preserved in
the history) with the calculator tool declared, then tokenized with the demo vocabulary. The loss mask
keeps exactly what the model would have written itself: each assistant turn from after the generation
prompt (``<|im_assistant|>assistant<|im_middle|><think>``) through its ``<|im_end|>``.

Kinds of conversation (training weights in ``KINDS``, held-out ones in ``HELDOUT_KINDS``):

* ``mental``   — single-digit arithmetic answered with short reasoning, no tool;
* ``calc``     — multi-digit arithmetic: reasoning, a ``calculator`` tool call, the tool's result, the answer;
* ``units``    — unit conversions: the factor is recalled in the reasoning, the product goes to the calculator;
* ``followup`` — a ``calc`` turn, then "now add 9 to that": the next call builds on the earlier result;
* ``chat``     — greetings, thanks, "who are you".

Determinism: ``example(i, split, seed)`` is a pure function of its arguments. The held-out split draws
from its own stream, and every question text of the tool-using kinds belongs to exactly one split (a
hash partition), so no held-out calculator, unit or follow-up question is ever trained on. The
single-digit ``mental`` table (a few hundred facts) and ``chat`` lines are small closed sets shared by
both splits: the held-out set tests them for recall, not for generalization.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

from kimi_ref.chat import calculator  # the very tool the chat CLI runs (AST walk, never eval)
from kimi_ref.chat_template import render_ids

__all__ = ["CALCULATOR_TOOL", "TOOLS", "KINDS", "HELDOUT_KINDS", "Example", "conversation", "example", "encode", "batches",
           "calculator", "VARIANT"]

VARIANT = "k2.7-code"

# The tool kimi-nano is trained with; `python -m kimi_ref.chat` declares the same one by default.
CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example 17*23"}},
            "required": ["expression"],
        },
    },
}
TOOLS = [CALCULATOR_TOOL]

# The mix is set by what is hard for a model this small. The tool kinds only need numbers *copied* (into
# the call, out of the result), learned once for all numbers; the single-digit table has to be *memorized*,
# fact by fact, so `mental` gets the largest share (trained at 0.15, a kimi-nano got 38% of those right; at
# 0.4 94%). The six chat lines are learned almost at once.
KINDS = {"mental": 0.4, "calc": 0.25, "units": 0.1, "followup": 0.17, "chat": 0.08}
# The held-out set keeps a mix of its own, fixed, so that retuning the training mix never changes the test;
# it leans towards the tool kinds, which the grader scores most finely.
HELDOUT_KINDS = {"mental": 0.15, "calc": 0.35, "units": 0.15, "followup": 0.2, "chat": 0.15}
OPS = {"+": ("plus", "add", "the sum of"), "-": ("minus", "subtract", "the difference of"),
       "*": ("times", "multiply", "the product of")}
UNITS = [  # (one, from, to, factor)
    ("meter", "meters", "centimeters", 100), ("kilometer", "kilometers", "meters", 1000),
    ("kilogram", "kilograms", "grams", 1000), ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24), ("week", "weeks", "days", 7),
    ("foot", "feet", "inches", 12), ("liter", "liters", "milliliters", 1000), ("dozen", "dozens", "items", 12),
]
QUESTION_FORMS = ["What is {a}{op}{b}?", "What is {a} {op} {b}?", "Compute {a}{op}{b}.", "Calculate {a} {op} {b}",
                  "what's {a}{op}{b}", "How much is {a} {word} {b}?", "Please work out {a}{op}{b}."]
UNIT_FORMS = ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "{n} {frm} is how many {to}?"]
FOLLOWUPS = [("Now add {c} to that.", "+"), ("Subtract {c} from that.", "-"), ("Multiply that by {c}.", "*"),
             ("And plus {c}?", "+")]
CHAT = [
    ("Hello!", "The user is greeting me.", "Hello! Ask me an arithmetic question and I will work it out."),
    ("Hi", "A greeting.", "Hi! I can help with arithmetic and unit conversions."),
    ("Thanks!", "The user is thanking me.", "You are welcome!"),
    ("Who are you?", "The user asks who I am.",
     "I am kimi-nano, a tiny model with Kimi's architecture, trained from scratch to show how it works."),
    ("What can you do?", "The user asks what I can do.",
     "I can do arithmetic, convert units, and use a calculator tool for big numbers."),
    ("Good morning", "A greeting.", "Good morning! What shall we calculate?"),
]


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def _call(index: int, expression: str) -> dict:
    return {"id": f"functions.calculator:{index}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}


def _tool_turn(index: int, expression: str, why: str) -> list[dict]:
    result = calculator(expression)
    return [
        {"role": "assistant", "reasoning_content": why, "content": "", "tool_calls": [_call(index, expression)]},
        {"role": "tool", "tool_call_id": f"functions.calculator:{index}", "name": "calculator", "content": result},
    ]


def _operands(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("+-*")
    if op == "*":
        return rng.randint(2, 99), op, rng.randint(2, 99)
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)  # results stay positive


def _calc_turns(rng: random.Random, call_index: int) -> tuple[list[dict], int]:
    a, op, b = _operands(rng)
    form = rng.choice(QUESTION_FORMS)
    question = form.format(a=a, b=b, op=op, word=OPS[op][0])
    expression = f"{a}{op}{b}"
    result = _apply(a, op, b)
    messages = [{"role": "user", "content": question}]
    messages += _tool_turn(call_index, expression, f"The user wants {a} {OPS[op][0]} {b}. I will use the calculator.")
    messages.append({"role": "assistant", "reasoning_content": f"The calculator says {result}.",
                     "content": f"{a} {op} {b} = {result}."})
    return messages, result


def conversation(rng: random.Random, kind: str) -> tuple[list[dict], dict]:
    """One conversation of ``kind`` and what a grader needs: ``{"answer": int | None, "tool": bool}``."""
    if kind == "mental":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+*") if a < b else rng.choice("+-*")
        result = _apply(a, op, b)
        question = rng.choice(QUESTION_FORMS).format(a=a, b=b, op=op, word=OPS[op][0])
        return [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": f"{a} {OPS[op][0]} {b} is {result}. Small enough to do in my head.",
                 "content": f"{a} {op} {b} = {result}."}], {"answer": result, "tool": False}
    if kind == "calc":
        messages, result = _calc_turns(rng, 0)
        return messages, {"answer": result, "tool": True}
    if kind == "units":
        one, frm, to, factor = rng.choice(UNITS)
        n = rng.randint(2, 99)
        question = rng.choice(UNIT_FORMS).format(n=n, frm=frm, to=to)
        result = n * factor
        messages = [{"role": "user", "content": question}]
        messages += _tool_turn(0, f"{n}*{factor}", f"1 {one} is {factor} {to}, so I multiply {n} by {factor}.")
        messages.append({"role": "assistant", "reasoning_content": f"The calculator says {result}.",
                         "content": f"{n} {frm} is {result} {to}."})
        return messages, {"answer": result, "tool": True}
    if kind == "followup":
        messages, first = _calc_turns(rng, 0)
        text, op = rng.choice(FOLLOWUPS)
        c = rng.randint(2, 99)
        if op == "-" and c > first:
            text, op = FOLLOWUPS[0]
        result = _apply(first, op, c)
        messages.append({"role": "user", "content": text.format(c=c)})
        messages += _tool_turn(1, f"{first}{op}{c}",
                               f"The previous result was {first}. Now {first} {OPS[op][0]} {c}.")
        messages.append({"role": "assistant", "reasoning_content": f"The calculator says {result}.",
                         "content": f"That makes {result}."})
        return messages, {"answer": result, "tool": True}
    if kind == "chat":
        question, why, answer = rng.choice(CHAT)
        return [{"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": why, "content": answer}], {"answer": None, "tool": False}
    raise ValueError(f"unknown conversation kind {kind!r}; expected one of {sorted(KINDS)}")


def _question_key(messages: list[dict]) -> str:
    return messages[0]["content"]


@dataclass(frozen=True)
class Example:
    messages: list
    kind: str
    grade: dict


def example(index: int, split: str = "train", seed: int = 0) -> Example:
    """The ``index``-th conversation of a split; a pure function of its arguments.

    The held-out split draws from a different stream, and its questions are kept disjoint from the
    training split's by a hash partition of the question text: a question text belongs to exactly
    one split, so no held-out question can appear in training whatever the training length.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', found {split!r}")
    rng = random.Random(f"kimi-nano/{seed}/{split}/{index}")
    kinds, weights = zip(*(KINDS if split == "train" else HELDOUT_KINDS).items())
    kind = rng.choices(kinds, weights)[0]  # first the kind, so each split keeps its mix
    while True:
        messages, grade = conversation(rng, kind)
        if kind in ("mental", "chat") or _in_split(_question_key(messages), split):
            return Example(messages, kind, grade)


def _in_split(question: str, split: str) -> bool:
    bucket = hashlib.sha256(question.encode()).digest()[0] % 10
    return (bucket == 0) == (split == "heldout")  # 10% of question texts are held out


def encode(messages: list[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, mask): mask[i] = 1 where ids[i] was written by an assistant (the loss positions)."""
    ids = render_ids(messages, tokenizer, tools=TOOLS, variant=VARIANT, add_generation_prompt=False)
    mask = [0] * len(ids)
    im_end = tokenizer.special_id("<|im_end|>")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_ids(messages[:i], tokenizer, tools=TOOLS, variant=VARIANT, add_generation_prompt=True)
        if ids[: len(prefix)] != prefix:
            raise AssertionError(f"message {i}: the generation prompt is not a prefix of the rendered conversation")
        end = ids.index(im_end, len(prefix))
        for j in range(len(prefix), end + 1):
            mask[j] = 1
    return ids, mask


def batches(tokenizer: Any, batch_size: int, steps: int, seed: int = 0, start: int = 0):
    """Yield ``steps`` lists of ``batch_size`` (ids, mask) pairs from the training split, in order."""
    index = start
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            batch.append(encode(example(index, "train", seed).messages, tokenizer))
            index += 1
        yield batch


def main(argv: list[str] | None = None) -> int:
    from kimi_ref.chat_template import render
    from kimi_ref.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m weights_tools.nano_data", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    args = parser.parse_args(argv)
    tok = Tokenizer.demo()
    for i in range(args.n):
        ex = example(i, args.split, args.seed)
        ids, mask = encode(ex.messages, tok)
        print(f"--- {ex.kind}: {len(ids)} tokens, {sum(mask)} trained")
        print(render(ex.messages, tools=TOOLS, variant=VARIANT, add_generation_prompt=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
