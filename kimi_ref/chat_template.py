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

The second half of the file is :func:`encode_tools_ts`, the TypeScript-style tool declarations of K2.5+.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

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


# ---------------------------------------------------------------------------------------------------
# The special tokens the templates emit (sources §8). They are control tokens: render_ids emits their ids
# directly, and message text is never allowed to produce them.
# ---------------------------------------------------------------------------------------------------
IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END = (
    "<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")

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
        except ChatTemplateError as error:
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


# ===================================================================================================
# Tool declarations: JSON Schema -> TypeScript-style text (K2.5 and later)
# ===================================================================================================
#
#   # Tools
#
#   ## functions
#   namespace functions {
#   // Get the weather.                         <- the function's description, one `//` per line
#   type get_weather = (_: {
#     // The city.                               <- a property's description ...
#     // maxLength: 80                           <- ... and its constraints, sorted by key
#     city: string,                              <- required properties first, each group sorted by name
#     // Default: "celsius"
#     unit?: "celsius" | "fahrenheit"            <- optional ones get `?`; enums are unions of literals
#   }) => any;
#   }
#
# The rules are those of HF's `tool_declaration_ts.py` (Kimi-K2.5 repository), which the tokenizer runs on
# the deep-sorted tools. What it rejects (oneOf, tuple `items`, an unknown `$ref`, ...) raises
# ChatTemplateError here; `render` then declares the tools as JSON, as the tokenizer does.

_INDENT = "  "
_CONSTRAINT_KEYS = {  # which JSON Schema keywords are shown as a `// key: value` comment, by type
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
    "array": ("maxItems", "minItems"),
}
_UNION_MEMBER_TS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
                    "null": "null", "object": "{}", "array": "Array<any>"}


def deep_sort(value: Any) -> Any:
    """Every dict's keys sorted, recursively (HF's ``deep_sort_dict``), so that the same tools in another
    key order give the same prompt bytes (and the same prefix-cache hit)."""
    if isinstance(value, Mapping):
        return {key: deep_sort(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [deep_sort(item) for item in value]
    return value


def encode_tools_ts(tools: Sequence[Mapping[str, Any]] | None) -> str:
    """The TypeScript-style declaration of OpenAI-format ``tools``, as Kimi K2.5+ sees them.

    Tools whose ``type`` is not ``"function"`` (Moonshot's built-ins) are not declared; with no function
    tools at all the result is ``""``. Raises :class:`ChatTemplateError` for a schema the format cannot
    express.
    """
    if not tools:
        return ""
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list of tool definitions, found {type(tools).__name__}")
    declarations = []
    for i, tool in enumerate(deep_sort(list(tools))):
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"tools[{i}] must be a dict like {{'type': 'function', 'function': {{...}}}}, "
                                    f"found {type(tool).__name__}")
        function = tool.get("function")
        if tool.get("type") != "function" or not function:
            continue
        if not isinstance(function, dict):
            raise ChatTemplateError(f"tools[{i}].function must be a dict, found {type(function).__name__}")
        declarations.append(_declare_function(function, f"tools[{i}].function"))
    if not declarations:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(declarations) + "\n}\n"


class _Definitions:
    """The ``$defs`` seen so far (in the order first seen) and whether the parameters refer to themselves."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.self_reference = False

    def resolve(self, ref: Any, where: str) -> None:
        if ref == "#":
            self.self_reference = True
        elif isinstance(ref, str) and ref.startswith("#/$defs/"):
            if ref.split("/")[-1] not in self.schemas:
                raise ChatTemplateError(f"{where}: $ref {ref!r} names no definition in $defs seen so far")
        else:
            raise ChatTemplateError(f"{where}: unsupported $ref {ref!r}; only '#' and '#/$defs/NAME' are understood")


def _declare_function(function: dict, where: str) -> str:
    name = function.get("name", "function")
    if not isinstance(name, str):
        raise ChatTemplateError(f"{where}.name must be a string, found {name!r}")
    where = f"{where}({name})"
    parameters = function.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ChatTemplateError(f"{where}.parameters must be a JSON Schema object, found {parameters!r}")

    # Pass 1: walk the schema in the encoder's order, collecting $defs and checking every $ref
    # (a $ref may only name a definition registered before it).
    definitions = _Definitions()
    _walk_object(parameters, definitions, f"{where}.parameters")

    blocks = []
    # Decided by the parameters alone, before the definitions are walked: a `$ref: "#"` met only inside a
    # definition does not turn the signature into `parameters` (the encoder checks at this point too).
    self_reference = definitions.self_reference
    if self_reference:  # `$ref: "#"` -> the parameters become `interface parameters`,
        # with fields in key order (no required-first sorting) and no additionalProperties line.
        properties, required = _properties(parameters, f"{where}.parameters")
        fields = [_field_ts(key, schema, key not in required, _INDENT, f"{where}.parameters.properties.{key}")
                  for key, schema in properties.items()]
        body = "\n" + ",\n".join(fields) + "\n" if fields else ""
        blocks.append("interface parameters {" + body + "}")
    for def_name, schema in list(definitions.schemas.items()):
        def_where = f"{where}.$defs.{def_name}"
        _walk(schema, definitions, def_where)
        description = schema.get("description", "") if isinstance(schema, dict) else ""
        prefix = _comment_lines(description, "", def_where) + "\n" if description else ""
        blocks.append(f"{prefix}interface {def_name} {_type_ts(schema, '', def_where)}")

    description = function.get("description")
    if description:
        blocks.append(_comment_lines(description, "", where))
    signature = "parameters" if self_reference else _object_ts(parameters, "", f"{where}.parameters")
    blocks.append(f"type {name} = (_: {signature}) => any;")
    return "\n".join(block for block in blocks if block)


def _kind(schema: Any, where: str) -> str:
    """Which TypeScript form a schema takes; the order of the tests is the encoder's."""
    if isinstance(schema, bool):
        return "any" if schema else "null"  # `true` accepts anything; `false` is shown as null
    if not isinstance(schema, dict):
        raise ChatTemplateError(f"{where} must be a JSON Schema object, found {type(schema).__name__}")
    if "$ref" in schema:
        return "ref"
    if "anyOf" in schema:
        return "anyOf"
    if "enum" in schema:
        return "enum"
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return "union"
        if not isinstance(kind, str):
            raise ChatTemplateError(f"{where}.type must be a string or a list, found {kind!r}")
        return kind if kind in ("object", "array") else "scalar"
    if not schema:
        return "any"
    raise ChatTemplateError(f"{where}: the declaration format understands type, enum, anyOf and $ref, "
                            f"not {sorted(schema)} (oneOf/allOf are not part of it)")


def _walk(schema: Any, definitions: _Definitions, where: str) -> None:
    kind = _kind(schema, where)
    if kind == "ref":
        definitions.resolve(schema["$ref"], where)
    elif kind == "anyOf":
        options = schema["anyOf"]
        if not isinstance(options, list):
            raise ChatTemplateError(f"{where}.anyOf must be a list of schemas, found {options!r}")
        for k, option in enumerate(options):
            _walk(option, definitions, f"{where}.anyOf[{k}]")
    elif kind == "enum":
        _check_enum(schema, where)
    elif kind == "union":
        for member in schema["type"]:
            if member not in _UNION_MEMBER_TS:
                raise ChatTemplateError(f"{where}.type: {member!r} cannot be part of a type list; expected "
                                        f"{', '.join(_UNION_MEMBER_TS)}")
    elif kind == "object":
        _walk_object(schema, definitions, where)
    elif kind == "array" and schema.get("items"):
        _walk(schema["items"], definitions, f"{where}.items")


def _walk_object(schema: dict, definitions: _Definitions, where: str) -> None:
    if not schema:
        return
    defs = schema.get("$defs")
    if defs:
        if not isinstance(defs, dict):
            raise ChatTemplateError(f"{where}.$defs must be an object of named schemas, found {defs!r}")
        definitions.schemas.update(defs)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _walk(extra, definitions, f"{where}.additionalProperties")
    elif extra is not None and not isinstance(extra, bool):
        raise ChatTemplateError(f"{where}.additionalProperties must be a boolean or a schema, found {extra!r}")
    properties, _ = _properties(schema, where)
    for key, prop in properties.items():
        _walk(prop, definitions, f"{where}.properties.{key}")


def _properties(schema: dict, where: str) -> tuple[dict, set]:
    properties = schema.get("properties", {}) if schema else {}
    required = schema.get("required", []) if schema else []
    if not isinstance(properties, dict):
        raise ChatTemplateError(f"{where}.properties must be an object, found {properties!r}")
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        raise ChatTemplateError(f"{where}.required must be a list of property names, found {required!r}")
    return properties, set(required)


def _check_enum(schema: dict, where: str) -> None:
    """Enum values must match a declared type (a type list may be one type plus "null")."""
    values = schema["enum"]
    if not isinstance(values, list):
        raise ChatTemplateError(f"{where}.enum must be a list, found {values!r}")
    declared = schema.get("type")
    if declared is None:
        return
    if isinstance(declared, list):
        if len(declared) == 1:
            declared = declared[0]
        elif len(declared) == 2 and "null" in declared:
            declared = declared[0] if declared[0] != "null" else declared[1]
        else:
            raise ChatTemplateError(f"{where}: enum with type {declared!r} is not supported "
                                    "(one type, or one type and 'null')")
    # bool is an int in Python, and the encoder accepts it for number/integer: kept.
    expected = {"string": str, "number": (int, float), "integer": int, "boolean": bool}.get(declared)
    for value in values:
        if expected is not None and value is not None and not isinstance(value, expected):
            raise ChatTemplateError(f"{where}: enum value {value!r} is not a {declared}")


def _type_ts(schema: Any, indent: str, where: str) -> str:
    """The TypeScript type of a schema written at ``indent`` (objects span lines, closing at ``indent``)."""
    kind = _kind(schema, where)
    if kind in ("any", "null"):
        return kind
    if kind == "ref":
        return "parameters" if schema["$ref"] == "#" else schema["$ref"].split("/")[-1]
    if kind == "anyOf":
        return " | ".join(_type_ts(option, indent, f"{where}.anyOf[{k}]")
                          for k, option in enumerate(schema["anyOf"]))
    if kind == "enum":
        # Python's str(): strings are quoted as they are (no escaping), True/None print as Python spells them.
        return " | ".join(f'"{value}"' if isinstance(value, str) else str(value) for value in schema["enum"])
    if kind == "union":
        return " | ".join(_UNION_MEMBER_TS[member] for member in schema["type"])
    if kind == "object":
        return _object_ts(schema, indent, where)
    if kind == "array":
        item = schema.get("items") or {}
        inner = indent + _INDENT
        item_comments = _comments(item, inner, f"{where}.items")
        if item_comments:  # a described item gets its own lines
            return f"Array<\n{item_comments}{inner}{_type_ts(item, inner, f'{where}.items')}\n{indent}>"
        return f"Array<{_type_ts(item, indent, f'{where}.items')}>"
    return "number" if schema["type"] == "integer" else schema["type"]


def _object_ts(schema: dict, indent: str, where: str) -> str:
    properties, required = _properties(schema, where)
    inner = indent + _INDENT
    order = sorted(key for key in properties if key in required) + sorted(key for key in properties
                                                                          if key not in required)
    fields = [_field_ts(key, properties[key], key not in required, inner, f"{where}.properties.{key}")
              for key in order]
    extra = schema.get("additionalProperties") if schema else None
    if extra is not None:
        extra_ts = ("any" if extra is True else "never" if extra is False
                    else _type_ts(extra, inner, f"{where}.additionalProperties"))
        fields.append(f"{inner}[k: string]: {extra_ts}")
    if not fields:
        return "{}"
    return "{\n" + ",\n".join(fields) + f"\n{indent}}}"


def _field_ts(name: str, schema: Any, optional: bool, indent: str, where: str) -> str:
    """``// comments`` + ``name?: type`` for one property."""
    text = _comments(schema, indent, where)
    default = schema.get("default") if isinstance(schema, dict) else None
    if default is not None:
        # Numbers and booleans as Python prints them (True, 1.5); everything else as JSON.
        shown = repr(default) if isinstance(default, (int, float)) else json.dumps(default, ensure_ascii=False)
        text += f"{indent}// Default: {shown}\n"
    return f"{text}{indent}{name}{'?' if optional else ''}: {_type_ts(schema, indent, where)}"


def _comments(schema: Any, indent: str, where: str) -> str:
    """The description lines and the constraint line shown above a type (each ending in a newline)."""
    if not isinstance(schema, dict):
        return ""
    lines = []
    description = schema.get("description", "")
    if description:
        lines.append(_comment_lines(description, indent, where))
    kind = _kind(schema, where)
    type_name = schema["type"] if kind in ("scalar", "array") else None
    shown = {key: schema[key] for key in _CONSTRAINT_KEYS.get(type_name, ()) if key in schema}
    if shown:
        lines.append(indent + "// " + ", ".join(f"{key}: {shown[key]}" for key in sorted(shown)))
    return "".join(line + "\n" for line in lines)


def _comment_lines(description: Any, indent: str, where: str) -> str:
    """A description as ``// line`` comments; an empty line stays empty (no ``//``)."""
    if not isinstance(description, str):
        raise ChatTemplateError(f"{where}.description must be a string, found {description!r}")
    return "\n".join(f"{indent}// {line}" if line else "" for line in description.split("\n"))
