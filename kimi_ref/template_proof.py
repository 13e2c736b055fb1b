"""The checkpoint's own ``chat_template.jinja``, rendered as HF renders it, and the proof that ours equals it.

kimi_ref writes prompts in plain Python (:mod:`kimi_ref.chat_template`). A checkpoint directory usually
ships the template its model was trained with; when it does, the load-time proof renders a built-in
suite of conversations (:data:`SUITE`: plain, a system prompt and none, thinking on and off, history
with reasoning, ``preserve_thinking``, TypeScript tool declarations, tool calls and results, images and
video) both ways and demands byte equality::

    for each conversation (and each thinking / preserve_thinking setting the variant has):
        render(messages, variant=...)   ==   checkpoint template (jinja2, sandboxed, HF's settings)

The jinja side follows HF's ``apply_chat_template``: an ``ImmutableSandboxedEnvironment`` (a template is
code from the internet: it may read what it is given, nothing else) with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``tojson`` as ``json.dumps(ensure_ascii=False)``, and
the globals ``raise_exception`` and ``strftime_now``. Kimi's tokenizer prepares the context before the
template sees it: the tools are deep-sorted and (K2.5 and later) declared as ``tools_ts_str``; we do the
same (docs/sources.md §9 for HF's settings; docs/checkpoint_format.md, "Which file decides what").

jinja2 is optional (``pip install kimi-ref[template]``): without it the proof is skipped, and
:func:`jinja_available` says so.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from kimi_ref.chat_template import ChatTemplateError, render
from kimi_ref.tool_declarations import ToolDeclarationError, deep_sort, encode_tools_ts

__all__ = ["TemplateMismatch", "Proof", "SUITE", "jinja_available", "compile_template", "render_with_template",
           "suite_cases", "prove", "describe_difference"]


class TemplateMismatch(ValueError):
    """kimi_ref's rendering and the checkpoint's template differ: the message (one line) names the first
    differing conversation and character; ``diff`` is a unified diff of the two prompts."""

    def __init__(self, message: str, diff: str = "") -> None:
        super().__init__(message)
        self.diff = diff


def jinja_available() -> bool:
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return False
    return True


def _require_jinja() -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("rendering the checkpoint's chat template needs jinja2, an optional extra: "
                                "pip install 'kimi-ref[template]' (or pip install jinja2)") from None
    return jinja2, ImmutableSandboxedEnvironment


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates are not HTML, and HF does not escape.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str, where: str = "chat template") -> Any:
    """A jinja2 template object for ``source``, in a sandbox set up the way HF sets it up."""
    jinja2, sandbox = _require_jinja()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}: not a valid jinja template (line {e.lineno}: {e.message})") from None


def render_with_template(template: Any, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None, *, thinking: bool = True,
                         preserve_thinking: bool | None = None, add_generation_prompt: bool = True,
                         where: str = "chat template") -> str:
    """What HF's ``apply_chat_template(tokenize=False)`` with Kimi's tokenizer returns for ``template``.

    ``template`` is :func:`compile_template`'s result (or a source string). ``thinking`` is always passed,
    as Kimi's tokenizer does; ``preserve_thinking`` only when it is not None.
    """
    if isinstance(template, str):
        template = compile_template(template, where)
    jinja2, _ = _require_jinja()
    context: dict[str, Any] = {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt,
                               "thinking": thinking}
    if preserve_thinking is not None:
        context["preserve_thinking"] = preserve_thinking
    if tools:
        context["tools"] = deep_sort(list(tools))
        try:  # Kimi's tokenizer: an encoder error leaves tools_ts_str unset, and the template falls back to JSON
            context["tools_ts_str"] = encode_tools_ts(context["tools"])
        except ToolDeclarationError:
            context["tools_ts_str"] = None
    try:
        return template.render(**context)
    except (jinja2.exceptions.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as e:
        # The template is someone else's program: whatever it raises (a jinja error, or Python's own from an
        # expression such as 1/0) is its failure, named as such.
        raise ChatTemplateError(f"{where}: rendering failed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------
# The suite: small conversations that between them reach every branch of every Kimi template
# ---------------------------------------------------------------------------------------------------
_WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
_CALL = {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
_DICT_CALL = {"id": "functions.get_weather:1", "type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}}
_IMAGE = {"type": "image_url", "image_url": {"url": "file:///cat.png"}}
_VIDEO = {"type": "video_url", "video_url": {"url": "file:///clip.mp4"}}


@dataclass(frozen=True)
class Case:
    """One conversation of the suite; ``needs`` names what a variant must support to render it."""

    name: str
    messages: tuple
    tools: tuple | None = None
    add_generation_prompt: bool = True
    needs: frozenset = frozenset()   # {"tool_calls", "video", "none_content"}


SUITE: tuple[Case, ...] = (
    Case("plain", ({"role": "user", "content": "Hello!"},)),
    Case("no messages", ()),
    Case("a system prompt", ({"role": "system", "content": "You are Kimi."}, {"role": "user", "content": "Hi"})),
    Case("names", ({"role": "system", "content": "Be brief.", "name": "rules"},
                   {"role": "user", "content": "Hi", "name": "bob"})),
    Case("history with reasoning", (
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3+3?"})),
    Case("history, no generation prompt", (
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "again"}), add_generation_prompt=False),
    Case("the reasoning key", ({"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "reasoning": "new", "reasoning_content": "old"},
                               {"role": "user", "content": "q2"})),
    Case("tool declarations", ({"role": "user", "content": "Weather in Paris?"},), tools=tuple(_WEATHER)),
    # Nothing the TypeScript encoder declares (a built-in tool): K2.5+ fall back to compact JSON.
    Case("tools declared as JSON", ({"role": "user", "content": "Search the web."},),
         tools=({"type": "builtin_function", "function": {"name": "$web_search"}},)),
    Case("tool calls and results", (
        {"role": "system", "content": "You are Kimi."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "call the tool", "tool_calls": [_CALL, _DICT_CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": '{"sky": "rain"}'},
        {"role": "assistant", "content": "Sunny in Paris, rain in Rome.", "reasoning_content": "done"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": None, "reasoning_content": "once more", "tool_calls": [_CALL]}),
        tools=tuple(_WEATHER), needs=frozenset({"tool_calls", "none_content"})),
    Case("a tool result without calls", (
        {"role": "user", "content": "go"}, {"role": "tool", "tool_call_id": "functions.x:0", "content": "42"})),
    Case("an image", ({"role": "user", "content": [{"type": "text", "text": "What is this?"}, _IMAGE]},)),
    Case("a video", ({"role": "user", "content": [_VIDEO, {"type": "text", "text": "What happens?"}]},),
         needs=frozenset({"video"})),
)

# What each variant can render (k2-instruct has no tool-call syntax and no None content; only K2.5+ video),
# and the thinking / preserve_thinking settings it has: (thinking, preserve_thinking) pairs.
_SUPPORTS = {"k2.5": {"tool_calls", "video", "none_content"}, "k2.6": {"tool_calls", "video", "none_content"},
             "k2.7-code": {"tool_calls", "video", "none_content"}, "k2-thinking": {"tool_calls", "none_content"},
             "k2-instruct": set()}
_SETTINGS = {"k2.5": [(True, None), (False, None)],
             "k2.6": [(True, False), (False, False), (True, True), (False, True)],
             "k2.7-code": [(True, True)], "k2-thinking": [(True, None)], "k2-instruct": [(True, None)]}


def suite_cases(variant: str) -> list[tuple[Case, bool, bool | None]]:
    """Every (case, thinking, preserve_thinking) the proof renders for ``variant``."""
    if variant not in _SETTINGS:
        raise ChatTemplateError(f"unknown variant {variant!r}; expected one of {', '.join(_SETTINGS)}")
    return [(case, thinking, preserve) for case in SUITE if case.needs <= _SUPPORTS[variant]
            for thinking, preserve in _SETTINGS[variant]]


@dataclass(frozen=True)
class Proof:
    """The outcome of :func:`prove`: how many renderings were compared (all equal, or it raised)."""

    variant: str
    renderings: int

    def __str__(self) -> str:
        return f"kimi_ref's {self.variant} template equals the checkpoint's on {self.renderings} renderings"


def prove(source: str, variant: str, where: str = "chat_template.jinja") -> Proof:
    """Render :data:`SUITE` with kimi_ref's ``variant`` and with the template ``source``; raise
    :class:`TemplateMismatch` at the first difference (naming the conversation and showing a diff)."""
    template = compile_template(source, where)
    cases = suite_cases(variant)
    for case, thinking, preserve in cases:
        label = (f"'{case.name}' (thinking={thinking}"
                 + ("" if preserve is None else f", preserve_thinking={preserve}")
                 + f", add_generation_prompt={case.add_generation_prompt})")
        theirs = render_with_template(template, case.messages, case.tools, thinking=thinking,
                                      preserve_thinking=preserve, add_generation_prompt=case.add_generation_prompt,
                                      where=where)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = render(list(case.messages), list(case.tools) if case.tools else None, variant=variant,
                          thinking=thinking, preserve_thinking=preserve,
                          add_generation_prompt=case.add_generation_prompt)
        if ours != theirs:
            head, diff = describe_difference(ours, theirs).split("\n", 1)
            raise TemplateMismatch(f"{where}: kimi_ref's {variant} template and the checkpoint's differ on the "
                                   f"conversation {label}: {head}", diff)
    return Proof(variant, len(cases))


# Control tokens and line breaks start a new line of the diff, so a prompt (which has few newlines) diffs readably.
_PIECE = re.compile(r"(<\|[a-z_]+\|>|</?think>|\n)")


def _lines(text: str) -> list[str]:
    out, current = [], ""
    for piece in _PIECE.split(text):
        if _PIECE.fullmatch(piece) and piece != "\n":
            if current:
                out.append(current)
            current = piece
        elif piece == "\n":
            out.append(current + "\\n")
            current = ""
        else:
            current += piece
    if current:
        out.append(current)
    return out


def describe_difference(ours: str, theirs: str, context: int = 2,
                        names: tuple[str, str] = ("kimi_ref", "checkpoint template")) -> str:
    """Where two prompts first differ (character offset, both sides' text there), then a unified diff
    (one line per control token) of ``ours`` (named ``names[0]``) against ``theirs``."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo = max(0, at - 30)
    head = (f"first difference at character {at}: {names[0]} has {ours[lo:at + 30]!r}, "
            f"{names[1]} has {theirs[lo:at + 30]!r}")
    diff = difflib.unified_diff(_lines(ours), _lines(theirs), names[0], names[1], n=context, lineterm="")
    return head + "\n" + "\n".join(diff)
