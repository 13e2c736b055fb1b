"""kimi-nano's training data: small conversations in the real K2.7-Code chat format, generated.

    python -m weights_tools.nano_data --n 5 [--seed S] [--split train|heldout]   # print a few, rendered

Every example is a list of OpenAI-style messages, rendered with the real template
(:func:`kimi_ref.chat_template.render_ids`, variant ``k2.7-code``: thinking on, reasoning preserved in
the history) with the calculator tool declared, then tokenized with the demo vocabulary. The loss mask
keeps exactly what the model would have written itself: each assistant turn from after the generation
prompt (``<|im_assistant|>assistant<|im_middle|><think>``) through its ``<|im_end|>``.

Kinds of conversation (training weights in ``KINDS``, held-out ones in ``HELDOUT_KINDS``):

* ``calc``     — arithmetic, always through the calculator: operands of 1 to 6 digits, ``+ - * /``,
  remainders, powers, square roots, percentages, negative numbers and parenthesised expressions;
  reasoning names the expression, the call sends it, the answer repeats the tool's result;
* ``units``    — unit conversions: the factor is recalled in the reasoning, the calculator multiplies
  (big unit to small) or divides (small to big);
* ``followup`` — a ``calc`` turn, then "now add 9 to that": the next call builds on the earlier result;
* ``chat``     — greetings, thanks, "who are you", questions outside arithmetic: a short answer, no tool.

kimi-nano never does arithmetic in its head, even ``2+3``: a model this small cannot hold a times table
and copy six-digit numbers at once (the first kimi-nano spent 40% of its data on the single-digit table),
and the calculator is always right.

**Phrasing.** A question is a *core* ("1234 + 5678", "the product of 12 and 7", "add 5 to 9") set in a
*frame* ("What is {}?", "Could you compute {} for me?") with a random case and ending. Frames come in
two disjoint families: ``train`` and ``heldout``. The held-out split uses only the second, so its score
measures phrasings the model never saw (the operator words are shared: a model trained from scratch has
no English outside its data, so "take away" means nothing unless some training question used it).
Chit-chat lines are split the same way.

**Training-only variety.** A model trained from scratch reads a word it was never shown as noise, and a
held-out phrasing is mostly such words. So training questions are also dressed in words that carry nothing
(``OPENERS``, ``CLOSERS``, ``ASIDES``), unit questions come in longer sentences (``UNIT_FRAMES_MORE``), and
follow-ups are built from parts (a pronoun for the last result, an operator phrase, a start or a frame:
``FOLLOW_CORES``), so what the model learns is to find the numbers, the operator word and the units wherever
they sit. A tenth of the arithmetic uses runs of one digit (999999, 7777), the numbers hardest to copy.
Parts can combine into a held-out phrasing; :func:`conversation` draws such a training conversation again,
so no training question has the :func:`template` of a held-out one. None of this touches the held-out
split: tests/test_nano.py pins its first 300 conversations by hash.

Determinism: ``example(i, split, seed)`` is a pure function of its arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
from dataclasses import dataclass
from typing import Any

from kimi_ref.chat_template import render_ids
from kimi_ref.tools import calculator  # the very tool the chat CLI runs (AST walk, never eval)

__all__ = ["CALCULATOR_TOOL", "TOOLS", "KINDS", "HELDOUT_KINDS", "FRAMES", "Example", "conversation", "example",
           "encode", "batches", "calculator", "VARIANT", "SPLITS", "template", "heldout_templates"]

VARIANT = "k2.7-code"
SPLITS = ("train", "heldout")

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

# Follow-ups and units get more than their share of the held-out mix: they are where phrasing varies most.
KINDS = {"calc": 0.45, "units": 0.17, "followup": 0.26, "chat": 0.12}
# The held-out set keeps a mix of its own, fixed, so that retuning the training mix never changes the test.
HELDOUT_KINDS = {"calc": 0.5, "units": 0.15, "followup": 0.2, "chat": 0.15}

# ---- phrasing -------------------------------------------------------------------------------------------
# A noun core ("12 plus 7") goes in a noun frame, a verb core ("add 12 and 7") in a verb frame.
FRAMES = {
    "train": {
        "noun": ["{}", "{}?", "What is {}?", "What's {}?", "whats {}", "Compute {}.", "Calculate {}",
                 "How much is {}?", "Tell me {}.", "Please compute {}.", "Can you calculate {}?", "Work out {}.",
                 "Evaluate {}", "{} = ?", "{} =", "What does {} equal?", "What is the value of {}?",
                 "Could you compute {} for me?", "Please tell me what {} is.", "I need {}.", "Solve {}",
                 "what is {} please", "Tell me what {} is", "Can you tell me {}?", "What is {} equal to?", "Hi, what is {}?", "Quick: {}?",
                 "I want to know {}.", "Result of {}?", "{} is what?", "Tell me the answer to {}.",
                 "Please calculate {}", "What would {} be?", "How much does {} come to?", "what's {}??"],
        "verb": ["{}.", "{}", "Please {}.", "Can you {}?", "{} for me.", "Could you {}, please?", "{}, please",
                 "Please {} for me.", "Can you please {}?", "I need you to {}.", "Now {}."],
    },
    "heldout": {
        "noun": ["Hey, what is {}?", "Quick question: what's {}?", "I'd like to know {}.", "Find {}.",
                 "What do you get for {}?", "What's the result of {}?", "Figure out {} please.", "So what is {}?",
                 "Help me with {}.", "Give me {}.", "Answer this: {}", "Do you know what {} is?"],
        "verb": ["Kindly {}.", "Would you {}?", "Go ahead and {}.", "Hey, {} please.", "I want you to {}."],
    },
}
# (core, expression); a, b are numbers as the user writes them, x, y as the calculator takes them
CORES = {
    "+": (["{a} + {b}", "{a}+{b}", "{a} plus {b}", "the sum of {a} and {b}", "{a} and {b} added together"],
          ["add {a} and {b}", "add {b} to {a}", "sum {a} and {b}"], "{x}+{y}"),
    "-": (["{a} - {b}", "{a}-{b}", "{a} minus {b}", "{a} take away {b}", "the difference between {a} and {b}",
           "{a} less {b}"], ["subtract {b} from {a}", "take {b} away from {a}", "take away {b} from {a}"], "{x}-{y}"),
    "*": (["{a} * {b}", "{a}*{b}", "{a} x {b}", "{a} times {b}", "{a} multiplied by {b}", "the product of {a} and {b}"],
          ["multiply {a} by {b}", "multiply {a} and {b}"], "{x}*{y}"),
    "/": (["{a} / {b}", "{a}/{b}", "{a} divided by {b}", "{a} over {b}", "the quotient of {a} and {b}"],
          ["divide {a} by {b}"], "{x}/{y}"),
    "%": (["the remainder of {a} divided by {b}", "{a} mod {b}", "{a} modulo {b}",
           "the remainder when {a} is divided by {b}"], ["divide {a} by {b} and give the remainder"], "{x}%{y}"),
    "**": (["{a} to the power of {b}", "{a}^{b}", "{a} ^ {b}", "{a}**{b}", "{a} raised to the power of {b}",
            "{a} to the power {b}"], ["raise {a} to the power of {b}"], "{x}**{y}"),
    "pct": (["{a}% of {b}", "{a} percent of {b}", "{a} % of {b}"], ["take {a}% of {b}"], "{x}*{y}/100"),
}
SQUARES = (["{a} squared", "the square of {a}"], ["square {a}"], "{x}**2")
CUBES = (["{a} cubed", "the cube of {a}"], ["cube {a}"], "{x}**3")
ROOTS = (["the square root of {a}", "sqrt({a})", "sqrt {a}"], ["take the square root of {a}"], "sqrt({x})")

UNITS = [  # (one big, big, small, factor)
    ("meter", "meters", "centimeters", 100), ("meter", "meters", "millimeters", 1000),
    ("kilometer", "kilometers", "meters", 1000), ("kilogram", "kilograms", "grams", 1000),
    ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60), ("hour", "hours", "seconds", 3600),
    ("day", "days", "hours", 24), ("week", "weeks", "days", 7), ("year", "years", "months", 12),
    ("foot", "feet", "inches", 12), ("yard", "yards", "feet", 3), ("mile", "miles", "feet", 5280),
    ("liter", "liters", "milliliters", 1000), ("pound", "pounds", "ounces", 16), ("dozen", "dozens", "eggs", 12),
]
UNIT_FRAMES = {
    "train": ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.", "{n} {frm} in {to}?",
              "What is {n} {frm} in {to}?", "how many {to} is {n} {frm}", "{n} {frm} to {to}",
              "How many {to} in {n} {frm}?", "Please convert {n} {frm} into {to}."],
    "heldout": ["{n} {frm} equals how many {to}?", "Express {n} {frm} in {to}.", "Change {n} {frm} into {to}.",
                "I have {n} {frm}. How many {to} is that?", "What's {n} {frm} in {to}?"],
}
FOLLOWUPS = {  # (text, operator, fixed operand or None)
    "train": [("Now add {c} to that.", "+", None), ("Add {c} to that", "+", None), ("and plus {c}?", "+", None),
              ("Subtract {c} from that.", "-", None), ("minus {c}?", "-", None), ("Now take away {c}.", "-", None),
              ("Multiply that by {c}.", "*", None), ("times {c}?", "*", None), ("Divide that by {c}.", "/", None),
              ("What if I add {c}?", "+", None), ("Now double it.", "*", 2), ("Halve that.", "/", 2),
              ("Square that.", "**", 2), ("And multiply the result by {c}", "*", None)],
    # (new words for the same operations; a held-out "triple" was a word no training question had used)
    "heldout": [("Then add {c}.", "+", None), ("Take {c} away from that.", "-", None),
                ("Okay, now multiply it by {c}.", "*", None), ("Divide it by {c}, please.", "/", None),
                ("and what's that plus {c}?", "+", None), ("What is that minus {c}?", "-", None)],
}
# (category, lines by split, reasoning, answer): no tool, ever
CHAT = [
    ("greeting", {"train": ["Hello!", "Hi", "hi", "hello", "Hey", "Hi there!", "Good morning", "Good evening",
                            "hey there", "Hello, how are you?", "How are you?", "Hi! How are you doing?", "yo"],
                  "heldout": ["Hello! How are you today?", "Good afternoon!", "hiya", "Hey, how's it going?"]},
     "A greeting: no tool needed.", "Hello! Ask me an arithmetic question or a unit conversion."),
    ("thanks", {"train": ["Thanks!", "thank you", "Thank you very much.", "thanks a lot", "Cheers", "Great, thanks."],
                "heldout": ["Thanks so much!", "ok thank you", "Perfect, thank you!"]},
     "The user is thanking me.", "You are welcome!"),
    ("who", {"train": ["Who are you?", "What are you?", "What's your name?", "who made you", "Are you a robot?"],
             "heldout": ["Tell me about yourself.", "What is your name?"]},
     "The user asks who I am.",
     "I am kimi-nano, a tiny model with Kimi's architecture, trained from scratch to show how it works."),
    ("help", {"train": ["What can you do?", "Help", "help me", "How do I use you?", "What do you know?"],
              "heldout": ["What are you good at?", "How can you help me?"]},
     "The user asks what I can do.",
     "I can do arithmetic and convert units, with a calculator tool for the exact numbers."),
    ("bye", {"train": ["Bye!", "Goodbye", "See you later", "bye bye"], "heldout": ["See you!", "Good night"]},
     "The user is leaving.", "Goodbye!"),
    ("other", {"train": ["What is the capital of France?", "Tell me a joke.", "What's the weather like?",
                         "Write a poem.", "Who won the World Cup?", "What time is it?", "Can you speak French?",
                         "What is the meaning of life?", "Recommend a book."],
               "heldout": ["What's the tallest mountain?", "Sing me a song.", "Who is the president?"]},
     "This is not arithmetic or a unit conversion.", "I only know arithmetic and unit conversions; try one of those."),
]

# ---- training-only variety ------------------------------------------------------------------------------
# The held-out score is about phrasings never seen, and a model trained from scratch knows no word it was not
# shown: an unknown word is noise to it. So the training questions come wrapped in words that carry nothing --
# openers, closers, asides -- and the model learns to read only the numbers, the operator words and the
# units. None of these words is in a held-out frame, and `conversation` draws again any training question whose
# template equals a held-out one (tests/test_nano.py checks both).
OPENERS = ["Hi,", "Hello,", "Ok,", "OK so", "Alright,", "Right,", "Now", "Next,", "Next one:", "One more:",
           "Another one:", "Question:", "Hmm,", "Well,", "Excuse me,", "Sorry,", "kimi,", "Dear kimi,", "Math:",
           "Homework:", "Let me ask you:", "Tell me,", "Listen,", "Real quick,", "Also,", "Good morning!",
           "I'm curious:", "Simple one:", "Try this:", "Test:", "Hello there.", "Please,", "Yo,", "Hi kimi!"]
CLOSERS = ["please", "thanks", "thank you", "for me", "quickly", "if you can", "exactly", "again", "pls",
           "thx", "right now", "if possible", "my friend"]
ASIDES = ["I am doing my homework.", "My teacher gave me this.", "This is for a recipe.", "I'm checking my bill.",
          "Just curious.", "No rush.", "I keep getting this wrong.", "It's for work.", "This is for school.",
          "I am bad at math.", "Thanks in advance.", "My calculator is broken.", "I'm planning a trip.",
          "Let's see if you can do it.", "Double-check it.", "My friend asked me this."]
# Units in longer sentences: the number's unit is the one to convert from, wherever the question puts it.
UNIT_FRAMES_MORE = ["There are {n} {frm}. How many {to}?", "My trip is {n} {frm}. What is that in {to}?",
                    "{n} {frm}: how many {to}?", "How many {to} make {n} {frm}?", "Turn {n} {frm} into {to}.",
                    "I need {n} {frm} in {to}.", "Could you convert {n} {frm} to {to}?", "{n} {frm} is how many {to}?",
                    "Tell me {n} {frm} in {to}.", "How many {to} are there in {n} {frm}?", "{n} {frm} = ? {to}",
                    "A box holds {n} {frm}. How many {to} are those?", "Convert {n} {frm}.  I want {to}.",
                    "{n} {frm} -> {to}", "We walked {n} {frm}. In {to}, please.", "Write {n} {frm} in {to}.",
                    "In {to}, how much is {n} {frm}?", "how many {to} do {n} {frm} make"]
# Follow-ups built from parts: a pronoun for the last result, an operator phrase, a frame.
PRONOUNS = ["that", "the result", "the answer", "this", "that number", "the last result", "the previous answer",
            "it", "the total"]
FOLLOW_CORES = {  # op: (noun cores, verb cores); {p} is the pronoun, {c} the new operand
    "+": (["{p} plus {c}", "{p} + {c}", "{p}+{c}", "the sum of {p} and {c}"],
          ["add {c} to {p}", "add {c}", "plus {c}", "increase {p} by {c}", "put {c} on top of {p}"]),
    "-": (["{p} minus {c}", "{p} - {c}", "{p}-{c}", "{p} less {c}"],
          ["subtract {c} from {p}", "subtract {c}", "minus {c}", "take away {c}", "decrease {p} by {c}"]),
    "*": (["{p} times {c}", "{p} * {c}", "{p} x {c}", "{p} multiplied by {c}"],
          ["multiply {p} by {c}", "multiply by {c}", "times {c}", "multiply {p} with {c}"]),
    "/": (["{p} divided by {c}", "{p} / {c}", "{p} over {c}"], ["divide {p} by {c}", "divide by {c}", "split {p} by {c}"]),
}
FOLLOW_STARTS = ["", "", "Now ", "And ", "Next, ", "Also ", "Ok, now ", "Alright, ", "Right, now ", "And now ",
                 "Good. Now ", "Great, "]
CHAT_MORE = {  # more training lines per category
    "greeting": ["Hi kimi", "Hello there", "Good day", "Morning!", "Hey you", "Greetings", "hello!!", "Howdy",
                 "Hi, nice to meet you", "What's up?", "Evening!"],
    "thanks": ["Thanks a bunch", "Many thanks", "thx", "Great, thank you!", "Nice, thanks.", "That helps, thanks",
               "Awesome, thanks!"],
    "who": ["Who built you?", "Are you human?", "What model are you?", "Introduce yourself."],
    "help": ["What do you do?", "Can you help?", "What are your skills?", "What should I ask you?"],
    "bye": ["Later!", "That's all, bye.", "See ya", "Bye for now"],
    "other": ["How tall is Everest?", "Tell me a story.", "Do you like music?", "What should I eat?",
              "Translate hello into Spanish.", "Who wrote Hamlet?", "Is it going to rain?", "Write me some code.",
              "What's your favorite color?", "Explain gravity.", "Where is Paris?", "Play a game with me."],
}


@dataclass(frozen=True)
class Example:
    messages: list
    kind: str
    grade: dict  # {"answer": the calculator's last result (str) or None, "tool": bool}


def _number(rng: random.Random, low_digits: int = 1, high_digits: int = 6) -> int:
    digits = rng.randint(low_digits, high_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _written(n: int | str, rng: random.Random) -> str:
    """How a person types a number: sometimes with thousands separators."""
    if isinstance(n, int) and abs(n) >= 1000 and rng.random() < 0.1:
        return f"{n:,}"
    return str(n)


def _shape(text: str, rng: random.Random) -> str:
    """Random surface: case and the ending."""
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.2:
        text = text[0].upper() + text[1:]
    r = rng.random()
    if r < 0.12 and text[-1] in "?.":
        text = text[:-1]
    elif r < 0.16 and text[-1] == "?":
        text += "?"
    return text


def _dress(text: str, rng: random.Random, asides: bool = True) -> str:
    """Training only: wrap a question in an opener or an aside, and a closer, none of them meaning anything."""
    r = rng.random()
    if r < 0.2:
        text = f"{rng.choice(OPENERS)} {text[0].lower() + text[1:] if text[1:2].islower() else text}"
    elif r < 0.28 and asides:
        text = f"{rng.choice(ASIDES)} {text}"
    r = rng.random()
    if r < 0.15:
        end = text[-1] if text[-1] in "?.!" else ""
        text = f"{text.rstrip('?.!')}, {rng.choice(CLOSERS)}{end}"
    elif r < 0.22 and asides:
        text = f"{text} {rng.choice(ASIDES)}"
    return text


def _asked(text: str, rng: random.Random, split: str) -> str:
    """A question as the model reads it: dressed (training only), then shaped (case, punctuation)."""
    return _shape(_dress(text, rng) if split == "train" else text, rng)


_NUMBERS = re.compile(r"\d[\d,]*(?:\.\d+)?")


def template(text: str) -> str:
    """A question with its numbers, case and punctuation taken out: "Find 1,234 + 5?" -> "find N + N"."""
    text = re.sub(r"[?.!,:;]", " ", _NUMBERS.sub("N", text.lower()))
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def heldout_templates() -> frozenset[str]:
    """Every question the held-out family can ask, as a :func:`template`: training never asks one of these."""
    frames = FRAMES["heldout"]
    nouns = [c for cores in [*CORES.values(), SQUARES, CUBES, ROOTS] for c in cores[0]]
    verbs = [c for cores in [*CORES.values(), SQUARES, CUBES, ROOTS] for c in cores[1]]
    expressions = [form.format(1, 2, 3, o0=o0, o1=o1) for form in ("({0}{o0}{1}){o1}{2}", "{0}{o0}({1}{o1}{2})",
                   "{0}{o0}{1}{o1}{2}") for o0 in "+-*" for o1 in "+-*"]
    expressions += [e.replace("+", " + ").replace("-", " - ").replace("*", " * ") for e in expressions]
    signs = ((1, 2), (-1, 2), (1, -2), (-1, -2))  # negative numbers keep their sign in a template
    texts = [f.format(c.format(a=a, b=b)) for f in frames["noun"] for c in nouns + expressions for a, b in signs]
    texts += [f.format(c.format(a=a, b=b)) for f in frames["verb"] for c in verbs for a, b in signs]
    texts += [f.format(n=n, frm=frm, to=to) for f in UNIT_FRAMES["heldout"] for one, big, small, _ in UNITS
              for n, frm, to in ((1, one, small), (5, big, small), (5, small, big))]
    texts += [text.format(c=5) for text, _, _ in FOLLOWUPS["heldout"]]
    texts += [line for _, lines, _, _ in CHAT for line in lines["heldout"]]
    return frozenset(map(template, texts))


def _frame(rng: random.Random, split: str, nouns: list[str], verbs: list[str], **slots) -> str:
    if verbs and rng.random() < 0.25:
        frame, core = rng.choice(FRAMES[split]["verb"]), rng.choice(verbs)
        text = frame.format(core.format(**slots))
        text = text[0].upper() + text[1:]
    else:
        text = rng.choice(FRAMES[split]["noun"]).format(rng.choice(nouns).format(**slots))
    return _asked(text, rng, split)


def _patterned(rng: random.Random) -> int:
    """Training only: numbers that are runs of one digit (999999, 7777, 300000), which are hard to copy."""
    digits = rng.randint(2, 6)
    d = rng.randint(1, 9)
    return rng.choice([int(str(d) * digits), d * 10 ** (digits - 1), 10 ** digits - 1, 10 ** digits])


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "/":
        b = _number(rng, 1, 3) or 7
        return (b * _number(rng, 1, 3), b) if rng.random() < 0.5 else (_number(rng), b)  # exact, or a decimal
    if op == "%":
        return _number(rng, 2, 6), _number(rng, 1, 3) or 9
    if op == "**":
        a = rng.randint(2, 99)
        return a, rng.randint(2, 40 if a == 2 else 12 if a < 10 else 6)
    if op == "pct":
        return rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75, rng.randint(1, 99)]), _number(rng, 1, 5)
    a, b = _number(rng), _number(rng)
    if rng.random() < 0.12:
        a = -a  # negative numbers: typed by the user, copied into the expression
    if op in "+*" and rng.random() < 0.06:
        a = a / 10  # a decimal operand, one place: 12.5
    return a, b


def _expression_question(rng: random.Random, split: str) -> tuple[str, str]:
    """Parenthesised and multi-operator expressions, typed as symbols: copied without spaces."""
    n = [_number(rng, 1, 4) for _ in range(3)]
    ops = [rng.choice("+-*") for _ in range(2)]
    form = rng.choice(["({0}{o0}{1}){o1}{2}", "{0}{o0}({1}{o1}{2})", "{0}{o0}{1}{o1}{2}"])
    expression = form.format(*n, o0=ops[0], o1=ops[1])
    spaced = expression
    if rng.random() < 0.6:
        for op in "+-*":
            spaced = spaced.replace(op, f" {op} ")
    text = rng.choice(FRAMES[split]["noun"]).format(spaced)
    return _asked(text, rng, split), expression


def _calc_question(rng: random.Random, split: str) -> tuple[str, str]:
    """(question, expression)."""
    r = rng.random()
    if r < 0.1:
        return _expression_question(rng, split)
    if r < 0.16:
        nouns, verbs, expression = rng.choice([SQUARES, CUBES, ROOTS])
        a = rng.randint(2, 999) if expression != "sqrt({x})" else rng.choice([rng.randint(2, 99) ** 2, _number(rng, 1, 6)])
        return _frame(rng, split, nouns, verbs, a=_written(a, rng)), expression.format(x=a)
    op = rng.choices(list(CORES), [3, 3, 3, 2, 1, 1, 1])[0]
    nouns, verbs, expression = CORES[op]
    a, b = _operands(rng, op)
    if split == "train" and op in "+-*" and rng.random() < 0.1:
        a, b = (_patterned(rng), b) if rng.random() < 0.5 else (a, _patterned(rng))
    if op in "+-*" and b > 0 and rng.random() < 0.05:
        b, nouns, verbs = -b, [c for c in nouns if "{a} " in c and "{b}" in c and c[-3:] == "{b}"], []
    y = f"({b})" if b < 0 else b
    return _frame(rng, split, nouns, verbs, a=_written(a, rng), b=_written(b, rng)), expression.format(x=a, y=y)


def _tool_turns(expression: str, why: str, answer: str, index: int = 0) -> tuple[list[dict], str]:
    result = calculator(expression)
    if result.startswith("error:"):
        raise AssertionError(f"nano_data made an expression the calculator refuses: {expression!r}: {result}")
    call = {"id": f"functions.calculator:{index}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
    return [{"role": "assistant", "reasoning_content": why, "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "name": "calculator", "content": result},
            {"role": "assistant", "reasoning_content": "The calculator answered.",
             "content": answer.format(result=result)}], result


def _calc(rng: random.Random, split: str, index: int = 0) -> tuple[list[dict], str]:
    question, expression = _calc_question(rng, split)
    turns, result = _tool_turns(expression, f"I will compute {expression} with the calculator.",
                                f"{expression} = {{result}}.", index)
    return [{"role": "user", "content": question}] + turns, result


def _units(rng: random.Random, split: str) -> tuple[list[dict], str]:
    one, big, small, factor = rng.choice(UNITS)
    n = _number(rng, 1, 4) or 1
    if rng.random() < 0.7:
        frm, to, op, verb = (one if n == 1 else big), small, "*", "multiply"
    else:
        frm, to, op, verb = small, big, "/", "divide"
    frames = UNIT_FRAMES["train"] + UNIT_FRAMES_MORE if split == "train" else UNIT_FRAMES[split]
    question = rng.choice(frames).format(n=_written(n, rng), frm=frm, to=to)
    question = _asked(question, rng, split)
    why = f"1 {one} is {factor} {small}, so I {verb} {n} by {factor}."
    turns, result = _tool_turns(f"{n}{op}{factor}", why, f"{n} {frm} is {{result}} {to}.")
    return [{"role": "user", "content": question}] + turns, result


def _composed_followup(rng: random.Random) -> tuple[str, str, int]:
    """Training only: (text, operator, operand) from a pronoun, an operator phrase and a start or a frame."""
    op = rng.choice("+-*/")
    c, p = _number(rng, 1, 3) or 3, rng.choice(PRONOUNS)
    nouns, verbs = FOLLOW_CORES[op]
    if rng.random() < 0.6:
        text = rng.choice(FOLLOW_STARTS) + rng.choice(verbs).format(p=p, c=c)
        text += rng.choice([".", "", "?", ", please.", " please", "!", " for me."])
    else:
        text = rng.choice(FRAMES["train"]["noun"] + ["And {}?", "Now {}?", "And what is {}?"]).format(
            rng.choice(nouns).format(p=p, c=c))
    return _dress(text[0].upper() + text[1:], rng, asides=False), op, c


def _followup(rng: random.Random, split: str) -> tuple[list[dict], str]:
    messages, first = _calc(rng, split)
    if split == "train" and rng.random() < 0.7:
        text, op, c = _composed_followup(rng)
    else:
        text, op, fixed = rng.choice(FOLLOWUPS[split])
        while op == "**" and len(first) > 6:  # keep results short enough to copy
            text, op, fixed = rng.choice(FOLLOWUPS[split])
        c = fixed or _number(rng, 1, 3) or 3
        text = text.format(c=c)
    expression = f"{first}{op}{c}" if not first.startswith("-") or op in "+-" else f"({first}){op}{c}"
    turns, result = _tool_turns(expression, f"The last result was {first}. Now {expression}.", "That makes {result}.", 1)
    return messages + [{"role": "user", "content": _shape(text, rng)}] + turns, result


def conversation(rng: random.Random, kind: str, split: str = "train") -> tuple[list[dict], dict]:
    """One conversation of ``kind`` phrased from ``split``'s family, and what a grader needs:
    ``{"answer": the last calculator result (str) or None, "tool": bool}``.

    A training conversation that happens to ask a held-out question (its :func:`template` is in
    :func:`heldout_templates`) is drawn again, so the held-out phrasings stay unseen."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, found {split!r}")
    if split != "train":
        return _conversation(rng, kind, split)
    for _ in range(100):
        messages, grade = _conversation(rng, kind, split)
        if not any(template(m["content"]) in heldout_templates() for m in messages if m["role"] == "user"):
            return messages, grade
    raise AssertionError(f"nano_data: 100 {kind} conversations in a row asked held-out questions")


def _conversation(rng: random.Random, kind: str, split: str) -> tuple[list[dict], dict]:
    if kind == "calc":
        messages, result = _calc(rng, split)
    elif kind == "units":
        messages, result = _units(rng, split)
    elif kind == "followup":
        messages, result = _followup(rng, split)
    elif kind == "chat":
        category, lines, why, answer = rng.choice(CHAT)
        if split == "train":
            line = rng.choice(lines["train"] + CHAT_MORE[category])
            line = _dress(line, rng, asides=False) if rng.random() < 0.3 else line
        else:
            line = rng.choice(lines[split])
        return [{"role": "user", "content": line},
                {"role": "assistant", "reasoning_content": why, "content": answer}], {"answer": None, "tool": False}
    else:
        raise ValueError(f"unknown conversation kind {kind!r}; expected one of {sorted(KINDS)}")
    return messages, {"answer": result, "tool": True}


def example(index: int, split: str = "train", seed: int = 0) -> Example:
    """The ``index``-th conversation of a split; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, found {split!r}")
    rng = random.Random(f"kimi-nano/{seed}/{split}/{index}")
    kinds, weights = zip(*(KINDS if split == "train" else HELDOUT_KINDS).items())
    kind = rng.choices(kinds, weights)[0]  # first the kind, so each split keeps its mix
    messages, grade = conversation(rng, kind, split)
    return Example(messages, kind, grade)


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
    parser.add_argument("--split", default="train", choices=list(SPLITS))
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
