"""The chat template: OpenAI-style messages -> the exact prompt text (and ids) Kimi was trained on.

Place in the pipeline: ``messages -> render() -> prompt str -> ids [T] -> model``; the model's output ids
go back through :mod:`kimi_ref.tool_parsing`. Facts: sources §9 (templates), §8 (special tokens).

One K2.5 conversation, rendered (no newlines between messages; ``⟨...⟩`` are single special tokens)::

    ⟨im_system⟩tool_declare⟨im_middle⟩# Tools ... namespace functions { ... }⟨im_end⟩     only with tools
    ⟨im_system⟩system⟨im_middle⟩You are Kimi.⟨im_end⟩
    ⟨im_user⟩user⟨im_middle⟩Weather in Paris?⟨im_end⟩
    ⟨im_assistant⟩assistant⟨im_middle⟩<think>I should call the tool</think>
        ⟨tool_calls_section_begin⟩⟨tool_call_begin⟩functions.get_weather:0⟨tool_call_argument_begin⟩
        {"city": "Paris"}⟨tool_call_end⟩⟨tool_calls_section_end⟩⟨im_end⟩
    ⟨im_system⟩get_weather⟨im_middle⟩## Return of functions.get_weather:0\\n{"sky": "clear"}⟨im_end⟩
    ⟨im_assistant⟩assistant⟨im_middle⟩<think>                                       generation prompt

The rule that shapes everything: **history drops reasoning.** The messages up to and including the last
assistant message *without* tool calls are history, and every assistant there is shown as
``<think></think>`` + content. Only the suffix after it -- the turn still in progress, tool calls and
their results -- keeps ``<think>{reasoning}</think>``. K2.6's ``preserve_thinking`` skips the split
(everything is suffix), and K2.7-Code always preserves: a coding agent's earlier reasoning is context.

Variants (``render(..., variant=...)``):

=============  =================  ==============  ==============  ==============  =========================
variant        tool declarations  default system  thinking flag   history split   generation prompt ends
=============  =================  ==============  ==============  ==============  =========================
k2.5           TypeScript         none            yes             yes             ``<think>`` (or ``<think></think>``)
k2.6           TypeScript         none            yes             unless preserve as k2.5
k2.7-code      TypeScript         none            forced on       never           ``<think>``
k2-thinking    JSON               "You are Kimi…" no              yes             ``⟨im_middle⟩`` (model writes <think>)
k2-instruct    JSON               "You are a …"   no              no think at all ``⟨im_middle⟩``
=============  =================  ==============  ==============  ==============  =========================

This file is plain Python written from the genuine jinja templates (``shared/reference``); the tests
render those templates with jinja2 and demand byte equality on generated conversations (K2.6 and
K2.7-Code have no public template: they are tested against sources §9's description of K2.6 applied to the
K2.5 file). Deliberate differences, all where jinja would write a prompt nobody meant: a ``None``
reasoning value counts as absent (jinja prints the word ``None``); an unknown content-part type, a video
for the older templates, and tool calls or ``None`` content for k2-instruct raise ChatTemplateError
(jinja drops them or prints nothing).

For a checkpoint, :func:`kimi_ref.checkpoint_chat.chat_setup` decides the variant from the checkpoint's own
files (and says why), proves this file against the checkpoint's ``chat_template.jinja`` when it ships one
(:mod:`kimi_ref.template_proof`), and its ``render`` / ``render_ids`` render with the chosen variant.

Prompt as ids: :func:`render_ids` emits each template control token as its id and encodes the text
between them with special tokens *disallowed*, so message text can never forge a control token.
:func:`render_segments` gives the same prompt as tagged pieces (used to colour prompts by role).

The TypeScript-style tool declarations of K2.5+ are :mod:`kimi_ref.tool_declarations`
(:func:`encode_tools_ts` is re-exported here).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from kimi_ref.tokenizer import (CALL_ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, END_THINK, IM_ASSISTANT, IM_END, IM_MIDDLE,
                                IM_SYSTEM, IM_USER, MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_END, MEDIA_PAD, SECTION_BEGIN,
                                SECTION_END, THINK)
from kimi_ref.tool_declarations import ToolDeclarationError, deep_sort, encode_tools_ts

__all__ = [
    "VARIANTS",
    "CONTROL_TOKENS",
    "ChatTemplateError",
    "Segment",
    "render",
    "render_segments",
    "render_ids",
    "encode_tools_ts",
    "deep_sort",
]


class ChatTemplateError(ValueError):
    """A message, tool or option the template cannot render (named, with what was expected)."""


# The special tokens the templates emit (their strings and ids: kimi_ref.tokenizer, sources §8). They are
# control tokens: render_ids emits their ids directly, and message text is never allowed to produce them.
CONTROL_TOKENS = frozenset({
    IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_MIDDLE, IM_END, THINK, END_THINK, SECTION_BEGIN, SECTION_END,
    CALL_BEGIN, CALL_ARGUMENT_BEGIN, CALL_END, MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END,
})

# Not tokens, although they look like them (so they are rendered, and tokenized, as plain text):
# the K2-Thinking/K2-Instruct templates write "<|media_start|>", which no Kimi vocabulary has; and K2.5's
# video marker is text that the K2.5 processor later replaces by the video's frames.
OLD_MEDIA_START = "<|media_start|>"
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"

ROLES = ("system", "user", "assistant", "tool")
TEXT_PART_TYPES = ("text",)
IMAGE_PART_TYPES = ("image", "image_url")
VIDEO_PART_TYPES = ("video", "video_url")
PART_TYPES = TEXT_PART_TYPES + IMAGE_PART_TYPES + VIDEO_PART_TYPES


@dataclass(frozen=True)
class _Variant:
    """What distinguishes one family member's template from another."""

    name: str
    typescript_tools: bool          # K2.5+: `# Tools ... namespace functions {...}`; older: JSON
    default_system: str | None      # injected when the conversation does not start with a system message
    thinking_switch: bool           # the `thinking` flag exists (K2.5+)
    preserve_switch: bool           # the `preserve_thinking` flag exists (K2.6+)
    prefer_reasoning_key: bool      # K2.6+: message["reasoning"] wins over message["reasoning_content"]
    think_prefill: bool             # the generation prompt opens (or closes) the think block
    image_marker: str               # first piece of an image part
    video: bool                     # video parts are understood


_VARIANTS = {
    "k2.5": _Variant("k2.5", True, None, True, False, False, True, MEDIA_BEGIN, True),
    "k2.6": _Variant("k2.6", True, None, True, True, True, True, MEDIA_BEGIN, True),
    # K2.7-Code = the K2.6 template with thinking and preserve_thinking forced on (model card; TINKER's
    # kimi_k27_code renderer: "historical thinking is preserved by default and cannot be disabled").
    "k2.7-code": _Variant("k2.7-code", True, None, True, True, True, True, MEDIA_BEGIN, True),
    "k2-thinking": _Variant("k2-thinking", False, "You are Kimi, an AI assistant created by Moonshot AI.",
                            False, False, False, False, OLD_MEDIA_START, False),
    "k2-instruct": _Variant("k2-instruct", False, "You are a helpful assistant",
                            False, False, False, False, OLD_MEDIA_START, False),
}
VARIANTS = tuple(_VARIANTS)


class Segment(NamedTuple):
    """One piece of a rendered prompt: a control token (``is_control``) or text, and whose it is.

    ``role`` names the part of the prompt the piece belongs to: ``"tool_declare"``, the message's role
    (``"system"``, ``"user"``, ``"assistant"``, ``"tool"``) or ``"generation"`` for the generation prompt.
    """

    text: str
    is_control: bool
    role: str


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def render(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
           variant: str = "k2.7-code", thinking: bool = True, preserve_thinking: bool | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt string for ``messages`` (and ``tools``), exactly as the model's own template writes it.

    ``thinking=False`` (K2.5/K2.6) shows suffix reasoning as ``<think></think>`` and pre-closes the think
    block in the generation prompt. ``preserve_thinking`` (K2.6, default False; K2.7-Code, always True)
    keeps every assistant's reasoning. Variants without a switch refuse a request to flip it.
    """
    return "".join(segment.text for segment in render_segments(
        messages, tools, variant=variant, thinking=thinking, preserve_thinking=preserve_thinking,
        add_generation_prompt=add_generation_prompt))


def render_ids(messages: Sequence[Mapping[str, Any]], tokenizer: Any,
               tools: Sequence[Mapping[str, Any]] | None = None, variant: str = "k2.7-code",
               thinking: bool = True, preserve_thinking: bool | None = None,
               add_generation_prompt: bool = True) -> list[int]:
    """The prompt as token ids: control tokens become their ids, everything else is encoded as text.

    Text is encoded with special tokens *disallowed* (``tokenizer.encode(text)``), so a user who types
    ``<|im_end|>`` gets the characters, not the end of their turn. Neighbouring text segments are joined
    before encoding, so on benign text the ids equal HF's whole-prompt encoding with specials allowed.
    """
    ids: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            ids.extend(tokenizer.encode("".join(pending)))
            pending.clear()

    specials = tokenizer.special_tokens
    for segment in render_segments(messages, tools, variant=variant, thinking=thinking,
                                   preserve_thinking=preserve_thinking,
                                   add_generation_prompt=add_generation_prompt):
        if not segment.is_control:
            pending.append(segment.text)
            continue
        flush()
        if segment.text not in specials:
            raise ChatTemplateError(
                f"render_ids: the tokenizer has no special token {segment.text!r}, which the {variant} "
                f"template needs (its special tokens: {len(specials)}; is it a Kimi tokenizer?)")
        ids.append(specials[segment.text])
    flush()
    return ids


def render_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    variant: str = "k2.7-code", thinking: bool = True, preserve_thinking: bool | None = None,
                    add_generation_prompt: bool = True) -> list[Segment]:
    """The prompt as a list of :class:`Segment` (what :func:`render` joins and :func:`render_ids` encodes)."""
    spec = _variant(variant)
    thinking, preserve = _switches(spec, thinking, preserve_thinking)
    messages = _check_messages(messages, spec)
    out = _Writer()

    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list of tool definitions or None, found {type(tools).__name__}")
    if tools:
        out.message_header(IM_SYSTEM, "tool_declare", "tool_declare")
        out.text(_tool_declarations(list(tools), spec))
        out.control(IM_END)

    if spec.name == "k2-instruct":
        _render_k2_instruct(out, messages)
    else:
        _render_thinking_family(out, messages, spec, thinking, preserve)

    if add_generation_prompt:
        out.message_header(IM_ASSISTANT, "assistant", "generation")
        if spec.think_prefill:
            out.control(THINK)
            if not thinking:
                out.control(END_THINK)
    return out.segments


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
class _Writer:
    """Collects segments; ``role`` is the part of the prompt being written."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.role = ""

    def control(self, token: str) -> None:
        assert token in CONTROL_TOKENS, token
        self.segments.append(Segment(token, True, self.role))

    def text(self, text: str) -> None:
        if text:
            self.segments.append(Segment(text, False, self.role))

    def message_header(self, token: str, name: str, role: str) -> None:
        self.role = role
        self.control(token)
        self.text(name)
        self.control(IM_MIDDLE)


def _render_thinking_family(out: _Writer, messages: list[dict], spec: _Variant, thinking: bool,
                            preserve: bool) -> None:
    """K2-Thinking, K2.5, K2.6, K2.7-Code: names in headers, think blocks, tool calls, tool results."""
    if spec.default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.message_header(IM_SYSTEM, "system", "system")
        out.text(spec.default_system)
        out.control(IM_END)

    last_history = -1 if preserve else _last_assistant_without_tool_calls(messages)
    for index, message in enumerate(messages):
        role = message["role"]
        header = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
        out.message_header(header, message.get("name") or role, role)
        if role == "assistant":
            # History shows no reasoning; so does the suffix when thinking is off (unless preserved).
            hide_reasoning = index <= last_history or (not thinking and not preserve)
            out.control(THINK)
            if not hide_reasoning:
                out.text(_reasoning(message, spec))
            out.control(END_THINK)
            _render_content(out, message["content"], spec)
            if message.get("tool_calls"):
                _render_tool_calls(out, message["tool_calls"])
        elif role == "tool":
            out.text(f"## Return of {message['tool_call_id']}\n")
            _render_content(out, message["content"], spec)
        else:
            _render_content(out, message["content"], spec)
        out.control(IM_END)


def _render_k2_instruct(out: _Writer, messages: list[dict]) -> None:
    """The July 2025 K2-Instruct template: fixed role names, no names, no think, no tool-call syntax."""
    for index, message in enumerate(messages):
        # Quirk: the default system prompt is injected inside the loop, so an empty conversation gets none.
        if index == 0 and message["role"] != "system":
            out.message_header(IM_SYSTEM, "system", "system")
            out.text("You are a helpful assistant")
            out.control(IM_END)
        role = message["role"]
        header = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
        out.message_header(header, role, role)  # the tool role is `<|im_system|>tool`, no "## Return of"
        _render_content(out, message["content"], _VARIANTS["k2-instruct"])
        out.control(IM_END)


def _render_content(out: _Writer, content: str | list | None, spec: _Variant) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.text(content)
        return
    for part in content:
        kind = part["type"]
        if kind in IMAGE_PART_TYPES:
            if spec.image_marker == MEDIA_BEGIN:
                out.control(MEDIA_BEGIN)
                out.text("image")
                for token in (MEDIA_CONTENT, MEDIA_PAD, MEDIA_END):
                    out.control(token)
                out.text("\n")  # the template's line break after the media block is part of the prompt
            else:
                out.text(OLD_MEDIA_START + "image")
                for token in (MEDIA_CONTENT, MEDIA_PAD, MEDIA_END):
                    out.control(token)
                if spec.name == "k2-thinking":  # K2-Thinking's template has the line break, K2-Instruct's not
                    out.text("\n")
        elif kind in VIDEO_PART_TYPES:
            out.text(VIDEO_PLACEHOLDER + "\n")
        else:
            out.text(part["text"])


def _render_tool_calls(out: _Writer, tool_calls: list[dict]) -> None:
    out.control(SECTION_BEGIN)
    for call in tool_calls:
        out.control(CALL_BEGIN)
        out.text(call["id"])  # verbatim, e.g. "functions.get_weather:0"; the function name is not shown
        out.control(CALL_ARGUMENT_BEGIN)
        out.text(call["function"]["arguments"])
        out.control(CALL_END)
    out.control(SECTION_END)


def _last_assistant_without_tool_calls(messages: list[dict]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant" and not messages[index].get("tool_calls"):
            return index
    return -1


def _reasoning(message: Mapping[str, Any], spec: _Variant) -> str:
    """The reasoning text: K2.6+ read ``reasoning`` first; K2.5 and K2-Thinking only ``reasoning_content``."""
    keys = ("reasoning", "reasoning_content") if spec.prefer_reasoning_key else ("reasoning_content",)
    for key in keys:
        value = message.get(key)
        if value is not None:  # jinja would print "None"; a missing value is what None means
            return value
    return ""


def _tool_declarations(tools: list, spec: _Variant) -> str:
    tools = deep_sort(tools)  # the tokenizer sorts tools before the template sees them
    if spec.typescript_tools:
        try:
            declarations = encode_tools_ts(tools)
        except ToolDeclarationError as error:
            # HF's K2.5 tokenizer catches the encoder's error and lets the template fall back to JSON;
            # we do the same, but say so.
            warnings.warn(f"tools: {error}; declaring the tools as JSON, as Kimi's tokenizer does", stacklevel=4)
            declarations = ""
        # An empty declaration (no function tools) also falls back to compact JSON in the template.
        return declarations or _json(tools, separators=(",", ":"), what="tools")
    return _json(tools, separators=None, what="tools")


def _json(value: Any, separators: tuple[str, str] | None, what: str) -> str:
    """The templates' ``tojson``: ``json.dumps(ensure_ascii=False)``, default separators ', ' and ': '."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=separators)
    except (TypeError, ValueError) as error:
        raise ChatTemplateError(f"{what} cannot be written as JSON: {error}") from error


# ---------------------------------------------------------------------------------------------------
# Options and input checks: every bad input is a ChatTemplateError naming the message and field
# ---------------------------------------------------------------------------------------------------
def _variant(name: str) -> _Variant:
    if name not in _VARIANTS:
        raise ChatTemplateError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return _VARIANTS[name]


def _switches(spec: _Variant, thinking: Any, preserve_thinking: Any) -> tuple[bool, bool]:
    """Validate ``thinking`` / ``preserve_thinking`` for the variant; return the effective values."""
    if not isinstance(thinking, bool):
        raise ChatTemplateError(f"thinking must be True or False, found {thinking!r}")
    if preserve_thinking is not None and not isinstance(preserve_thinking, bool):
        raise ChatTemplateError(f"preserve_thinking must be True, False or None, found {preserve_thinking!r}")
    if spec.name == "k2.7-code":
        if not thinking:
            raise ChatTemplateError("k2.7-code always thinks: thinking=False is not available "
                                    "(use variant 'k2.6' for a non-thinking prompt)")
        if preserve_thinking is False:
            raise ChatTemplateError("k2.7-code always preserves earlier reasoning: preserve_thinking=False is "
                                    "not available (use variant 'k2.6')")
        return True, True
    if not spec.thinking_switch and not thinking and spec.name != "k2-instruct":
        raise ChatTemplateError(f"{spec.name}'s template has no thinking switch (it always thinks); "
                                "thinking=False is not available")
    if not spec.preserve_switch and preserve_thinking:
        raise ChatTemplateError(f"{spec.name}'s template has no preserve_thinking flag; use variant 'k2.6' "
                                "or 'k2.7-code' to keep earlier reasoning")
    return thinking, bool(preserve_thinking)


def _check_messages(messages: Any, spec: _Variant) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, found {type(messages).__name__}")
    return [_check_message(message, f"messages[{i}]", spec) for i, message in enumerate(messages)]


def _check_message(message: Any, where: str, spec: _Variant) -> dict:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"{where} must be a dict with a 'role', found {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ChatTemplateError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    for key in ("name", "reasoning_content", "reasoning"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise ChatTemplateError(f"{where}.{key} must be a string, found {type(message[key]).__name__}")
    checked = dict(message)
    checked["content"] = _check_content(message.get("content"), f"{where}.content", spec)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ChatTemplateError(f"{where}: a tool message needs 'tool_call_id' (the id of the call it "
                                    f"answers, e.g. 'functions.get_weather:0'), found {call_id!r}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise ChatTemplateError(f"{where}: only assistant messages have tool_calls (this one is {role!r})")
        if not isinstance(tool_calls, (list, tuple)):
            raise ChatTemplateError(f"{where}.tool_calls must be a list, found {type(tool_calls).__name__}")
        if tool_calls and spec.name == "k2-instruct":
            raise ChatTemplateError(f"{where}: the k2-instruct template (July 2025) has no syntax for "
                                    "tool_calls and would drop them; use a later variant")
        checked["tool_calls"] = [_check_tool_call(call, f"{where}.tool_calls[{j}]")
                                 for j, call in enumerate(tool_calls)]
    return checked


def _check_content(content: Any, where: str, spec: _Variant) -> str | list | None:
    if content is None:
        if spec.name == "k2-instruct":
            raise ChatTemplateError(f"{where} is None; the k2-instruct template needs a string or a list of parts")
        return None
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ChatTemplateError(f"{where} must be a string, a list of parts or None, found {type(content).__name__}")
    for k, part in enumerate(content):
        part_where = f"{where}[{k}]"
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"{part_where} must be a dict with a 'type', found {type(part).__name__}")
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise ChatTemplateError(f"{part_where}: unknown content part type {kind!r}; expected one of "
                                    f"{', '.join(PART_TYPES)}")
        if kind in VIDEO_PART_TYPES and not spec.video:
            raise ChatTemplateError(f"{part_where}: the {spec.name} template has no video support")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{part_where}: a text part needs a string 'text', found {part.get('text')!r}")
    return list(content)


def _check_tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise ChatTemplateError(f"{where} must be a dict with 'id' and 'function', found {type(call).__name__}")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise ChatTemplateError(f"{where}: a tool call needs an 'id' (the template writes it verbatim, e.g. "
                                f"'functions.get_weather:0'), found {call_id!r}")
    function = call.get("function")
    if not isinstance(function, Mapping) or "arguments" not in function:
        raise ChatTemplateError(f"{where}.function must be a dict with 'arguments', found {function!r}")
    arguments = function["arguments"]
    if not isinstance(arguments, str):  # a dict (or any JSON value) is written with tojson
        arguments = _json(arguments, separators=None, what=f"{where}.function.arguments")
    return {"id": call_id, "function": {**function, "arguments": arguments}}
