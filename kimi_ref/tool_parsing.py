"""The model's output -> reasoning, content and tool calls (the ``kimi_k2`` grammar), whole or streamed.

Place in the pipeline: ``prompt ids -> model -> output ids -> parse() -> message`` and back through
:func:`kimi_ref.chat_template.render` for the next turn. Facts: sources §10 (grammar), §9 (the prompt's end).

What a K2.5+ model writes after a prompt that ends in ``<think>`` (``⟨...⟩`` are single special tokens)::

    I should look this up.</think>Let me check.
    ⟨tool_calls_section_begin⟩
      ⟨tool_call_begin⟩functions.get_weather:0⟨tool_call_argument_begin⟩{"city": "Paris"}⟨tool_call_end⟩
      ⟨tool_call_begin⟩functions.get_time:1⟨tool_call_argument_begin⟩{"tz": "CET"}⟨tool_call_end⟩
    ⟨tool_calls_section_end⟩⟨im_end⟩

    -> {"reasoning_content": "I should look this up.", "content": "Let me check.",
        "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}, ...}, ...]}

The grammar (sources §10; ``SB`` = ``<|tool_calls_section_begin|>``, ``CB ID AB ARGS CE`` = one call)::

    output  := [<think>] reasoning ( </think> content )? section? content? ( <|im_end|> ignored )?
    section := SB ( CB ID AB ARGS CE )* SE

The rules (as a state machine over "marker" and "text" pieces, so streaming and whole-output parsing are
one code path and agree for every way of cutting the stream):

* The output starts **inside the reasoning** (``starts_in_reasoning=True``, K2.5+ with thinking on). A
  ``<think>`` as the very first piece is dropped (K2-Thinking writes it itself; with
  ``starts_in_reasoning=False`` it opens the reasoning). ``</think>`` ends the reasoning. No ``</think>`` at
  all: everything is reasoning and the result is flagged ``truncated`` -- unless a tool-call section starts,
  which ends the reasoning there (the model skipped ``</think>`` to call a tool).
* Content is the text after ``</think>``; text after the tool section is appended to it.
* ``ID`` is stripped of surrounding whitespace and kept verbatim; the function **name** is the id minus
  one leading ``functions.``, cut at the last ``:digits`` (``functions.web.search-v2:3`` -> ``web.search-v2``).
* ``ARGS`` is stripped and returned as the raw string; ``valid_json`` says whether it parses as JSON
  (any JSON value; an object is what tools expect). A ``⟨tool_call_begin⟩`` before ``⟨tool_call_end⟩``
  closes the open call (as vLLM's regex does), with a problem noted.
* ``<|im_end|>`` ends the message (and ``[EOS]`` on ids); anything after it is reported, not parsed.
* On **ids**, only real special-token ids are markers: a ``<|tool_call_end|>`` typed inside a JSON string
  arrives as ordinary text tokens and stays text. On **text**, the marker strings are all we have.
  TINKER's singular ``<|tool_call_section_begin|>``/``…_end|>`` spelling is accepted in text.

Nothing is dropped silently: every irregularity is a line in ``result["problems"]``. A marker where the
grammar gives it no meaning (a second ``</think>``, a ``<|tool_call_end|>`` in the content) is kept as
text, listed in ``problems``, and its delta carries ``"marker": True`` so a display can show it marked.
:meth:`StreamParser.malformed_calls` names the calls that must not be run (cut off, unclosed, bad JSON).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Iterable, Sequence

from kimi_ref.tokenizer import (CALL_ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, END_THINK, EOS, IM_END, SECTION_BEGIN,
                                SECTION_END, THINK)

__all__ = ["parse", "StreamParser", "ToolParseError", "function_name", "MARKERS"]


class ToolParseError(ValueError):
    """Input that is neither text nor token ids, or ids without the tokenizer that gives them meaning."""


# Marker strings in text, and the grammar symbol each stands for. No marker is a prefix of another and
# each contains "<" only at its start, so occurrences never overlap and the earliest match is unique.
MARKERS = {
    THINK: THINK, END_THINK: END_THINK,
    SECTION_BEGIN: SECTION_BEGIN, SECTION_END: SECTION_END,
    "<|tool_call_section_begin|>": SECTION_BEGIN, "<|tool_call_section_end|>": SECTION_END,  # TINKER's spelling
    CALL_BEGIN: CALL_BEGIN, CALL_ARGUMENT_BEGIN: CALL_ARGUMENT_BEGIN, CALL_END: CALL_END,
    IM_END: IM_END,
}
# On ids: the special tokens that are grammar markers (others, e.g. <|media_pad|>, are text: their name).
_ID_MARKERS = {THINK, END_THINK, SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARGUMENT_BEGIN, CALL_END, IM_END, EOS}
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_LONGEST_MARKER = max(map(len, MARKERS))
_INDEX_RE = re.compile(r"^(.*):([0-9]+)$", re.DOTALL)

# Parser states.
_REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS, _AFTER_SECTION, _STOPPED = (
    "reasoning", "content", "tool section", "tool call id", "tool call arguments", "after tool section", "stopped")


def function_name(call_id: str) -> str:
    """``functions.get_weather:0`` -> ``get_weather``: strip, drop one leading ``functions.``, cut at the last
    ``:digits``. Dots and hyphens inside the name are kept (``functions.a.b-c:1`` -> ``a.b-c``)."""
    name = call_id.strip()
    if name.startswith("functions."):
        name = name[len("functions."):]
    match = _INDEX_RE.match(name)
    return match.group(1) if match else name


def parse(text_or_ids: str | Sequence[int], tokenizer: Any = None, *,
          starts_in_reasoning: bool = True) -> dict[str, Any]:
    """Parse one complete model output (text, or token ids with their ``tokenizer``).

    Returns ``{"role": "assistant", "reasoning_content": str | None, "content": str,
    "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}, "valid_json"}],
    "truncated": bool, "problems": [str]}`` -- a message that :func:`kimi_ref.chat_template.render` takes back.
    ``reasoning_content`` is None only when the output never was in a think block. ``truncated``: the
    output stopped inside the reasoning or inside the tool-call section. ``starts_in_reasoning=False``
    for outputs that follow a ``<think></think>`` prompt (thinking off) or a model without thinking.
    """
    parser = StreamParser(tokenizer, starts_in_reasoning=starts_in_reasoning)
    parser.feed(text_or_ids)
    parser.finish()
    return parser.result()


class StreamParser:
    """Incremental :func:`parse`: ``feed`` chunks (text, or lists of ids), get deltas as they become certain.

    Each delta is a dict:

    * ``{"type": "reasoning", "text": ...}`` and ``{"type": "content", "text": ...}``;
    * ``{"type": "tool_call", "index": k, "id": ..., "name": ...}`` once the id is complete;
    * ``{"type": "arguments", "index": k, "text": ...}``, argument fragments (surrounding whitespace is
      held back until it is known to be inside the arguments).

    Joining the deltas of each kind gives exactly the fields of :meth:`result`, and :meth:`result` after
    :meth:`finish` equals ``parse`` of the whole stream, however it was cut. Text that might be the start
    of a marker (``"<|tool_ca"``) is held back until the next chunk decides.
    """

    def __init__(self, tokenizer: Any = None, *, starts_in_reasoning: bool = True) -> None:
        self.tokenizer = tokenizer
        self._mode: str | None = None  # "text" or "ids", fixed by the first chunk
        self._pending_text = ""  # text mode: a possible marker prefix held back
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # ids mode
        self._id_to_special: dict[int, str] | None = None
        self._started = False  # has any piece been seen (the leading <think> rule)
        self._state = _REASONING if starts_in_reasoning else _CONTENT
        # Text is kept as lists of pieces (joined on demand): a coding agent's tool call can carry a whole
        # file in tens of thousands of tokens, and `str +=` on an attribute copies every time.
        self._reasoning: list[str] | None = [] if starts_in_reasoning else None
        self._content: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._id_text: list[str] = []
        self._args_text: list[str] = []
        self._args_started = False  # leading whitespace of the arguments is behind us
        self._args_blank = ""  # trailing whitespace not yet known to be inside the arguments
        self._stray: list[str] = []  # text inside the tool section but outside any call
        self._after_stop: list[str] = []
        self._truncated = False
        self._problems: list[str] = []
        self._broken: dict[int, str] = {}  # call index -> why it must not be run
        self._finished = False
        self._deltas: list[dict[str, Any]] = []

    # ---- input ----
    def feed(self, chunk: str | Sequence[int]) -> list[dict[str, Any]]:
        """Consume one chunk; return the deltas it made certain."""
        if self._finished:
            raise ToolParseError("StreamParser.feed after finish(); start a new parser for a new output")
        if isinstance(chunk, str):
            self._set_mode("text")
            self._feed_text(chunk)
        elif isinstance(chunk, (bytes, bytearray, dict)) or not hasattr(chunk, "__iter__"):
            raise ToolParseError(f"feed takes a str or a sequence of token ids, got {type(chunk).__name__}")
        else:
            self._set_mode("ids")
            self._feed_ids(chunk)
        return self._take_deltas()

    def finish(self) -> list[dict[str, Any]]:
        """End of the stream: flush held-back text, close what is open (flagging truncation)."""
        if self._finished:
            return []
        if self._mode == "text":
            self._text(self._pending_text)
            self._pending_text = ""
        elif self._mode == "ids":
            self._text(self._utf8.decode(b"", final=True))
        self._finished = True
        state = self._state
        if state == _REASONING:
            self._truncated = True
            self._problems.append("the output ended inside the reasoning (no </think>): all of it is reasoning")
        elif state in (_SECTION, _CALL_ID, _CALL_ARGS):
            self._close_section(f"the output ended inside the tool-call section (in the {state})")
            self._truncated = True
        return self._take_deltas()

    def result(self) -> dict[str, Any]:
        """The message so far (complete after :meth:`finish`), in :func:`parse`'s format."""
        return {
            "role": "assistant",  # so that the result is a message: render([..., parse(output)]) works
            "reasoning_content": None if self._reasoning is None else "".join(self._reasoning),
            "content": "".join(self._content),
            "tool_calls": [{"id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                            "valid_json": c["valid_json"]} for c in self._calls],
            "truncated": self._truncated,
            "problems": list(self._problems),
        }

    def malformed_calls(self) -> dict[int, str]:
        """{call index: why} for the calls that are not whole: cut off, not closed, no arguments marker,
        an empty id or arguments that are not JSON. A chat reports these instead of running them."""
        return dict(self._broken)

    # ---- lexing: chunks -> marker / text pieces ----
    def _set_mode(self, mode: str) -> None:
        if self._mode is None:
            self._mode = mode
            if mode == "ids":
                if self.tokenizer is None:
                    raise ToolParseError("parsing token ids needs the tokenizer that made them: "
                                         "parse(ids, tokenizer) / StreamParser(tokenizer)")
                self._id_to_special = {i: name for name, i in self.tokenizer.special_tokens.items()}
        elif self._mode != mode:
            raise ToolParseError(f"a stream is all text or all ids; this one started as {self._mode} and "
                                 f"then got {'a str' if mode == 'text' else 'ids'}")

    def _feed_text(self, chunk: str) -> None:
        buffer = self._pending_text + chunk
        position = 0
        for match in _MARKER_RE.finditer(buffer):
            self._text(buffer[position:match.start()])
            self._marker(MARKERS[match.group()])
            position = match.end()
        rest = buffer[position:]
        # Hold back the shortest tail that could still grow into a marker.
        hold = len(rest)
        for start in range(max(0, len(rest) - _LONGEST_MARKER + 1), len(rest)):
            if rest[start] == "<" and any(marker.startswith(rest[start:]) for marker in MARKERS):
                hold = start
                break
        self._text(rest[:hold])
        self._pending_text = rest[hold:]

    def _feed_ids(self, ids: Iterable[int]) -> None:
        assert self._id_to_special is not None
        run: list[int] = []
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise ToolParseError(f"ids[{position}] of this chunk is {token!r}, not an integer token id")
            token = int(token)
            name = self._id_to_special.get(token)
            if name is None:
                run.append(token)
                continue
            self._text(self._utf8.decode(self.tokenizer.decode_bytes(run)) if run else "")
            run = []
            if name in _ID_MARKERS:
                self._text(self._utf8.decode(b"", final=True))  # a marker ends any partial character
                self._marker(name)
            else:  # another special (<|media_pad|>, a reserved slot): its name, as text
                self._text(self._utf8.decode(name.encode("utf-8")))
        if run:
            self._text(self._utf8.decode(self.tokenizer.decode_bytes(run)))

    # ---- the grammar ----
    def _text(self, text: str, marker: bool = False) -> None:
        if not text:
            return
        self._started = True
        state = self._state
        flag = {"marker": True} if marker else {}
        if state == _REASONING:
            self._reasoning.append(text)  # type: ignore[union-attr]
            self._deltas.append({"type": "reasoning", "text": text, **flag})
        elif state in (_CONTENT, _AFTER_SECTION):
            self._content.append(text)
            self._deltas.append({"type": "content", "text": text, **flag})
        elif state == _SECTION:
            self._stray.append(text)
        elif state == _CALL_ID:
            self._id_text.append(text)
        elif state == _CALL_ARGS:
            self._arguments(text)
        else:
            self._after_stop.append(text)

    def _misplaced(self, symbol: str) -> None:
        """A marker the grammar gives no meaning here: kept as text (nothing lost), and reported."""
        where = self._state if self._state not in (_CALL_ID, _CALL_ARGS) else f"{self._state} of call {len(self._calls)}"
        self._problems.append(f"{symbol} in the {where}, where it means nothing: kept as text")
        if self._state == _CALL_ID:
            self._id_text.append(symbol)
        elif self._state == _CALL_ARGS:
            self._arguments(symbol)
        else:
            self._text(symbol, marker=True)

    def _marker(self, symbol: str) -> None:
        first = not self._started
        self._started = True
        state = self._state
        if state == _STOPPED:
            self._after_stop.append(symbol)
        elif symbol in (IM_END, EOS):
            if state in (_SECTION, _CALL_ID, _CALL_ARGS):
                self._close_section(f"{symbol} came inside the tool-call section (in the {state})")
                self._truncated = True
            elif state == _REASONING:
                self._truncated = True
                self._problems.append(f"{symbol} came inside the reasoning (no </think>): all of it is reasoning")
            self._state = _STOPPED
        elif symbol == THINK and first:
            # The prompt already opened the think block; a model that opens it again (K2-Thinking always
            # does) is not saying "<think>" as reasoning text.
            self._state = _REASONING
            if self._reasoning is None:
                self._reasoning = []
        elif state == _REASONING:
            if symbol == END_THINK:
                self._state = _CONTENT
            elif symbol == SECTION_BEGIN:  # a tool call ends the reasoning even without </think>
                self._state = _SECTION
            else:
                self._misplaced(symbol)
        elif state in (_CONTENT, _AFTER_SECTION):
            if symbol == SECTION_BEGIN:
                if state == _AFTER_SECTION:
                    self._problems.append("a second tool-call section: its calls are added to the first's")
                self._state = _SECTION
            else:
                self._misplaced(symbol)
        elif state == _SECTION:
            self._check_stray()
            if symbol == CALL_BEGIN:
                self._state = _CALL_ID
            elif symbol == SECTION_END:
                self._state = _AFTER_SECTION
            else:
                self._problems.append(f"{symbol} inside the tool-call section, outside a call: ignored")
        elif state == _CALL_ID:
            if symbol == CALL_ARGUMENT_BEGIN:
                self._open_call()
                self._state = _CALL_ARGS
            elif symbol in (CALL_BEGIN, CALL_END, SECTION_END):
                self._open_call()
                self._problems.append(f"tool call {len(self._calls) - 1} ({self._calls[-1]['id']!r}) has no "
                                      f"{CALL_ARGUMENT_BEGIN}; its arguments are empty")
                self._broken.setdefault(len(self._calls) - 1, f"it has no {CALL_ARGUMENT_BEGIN}")
                self._end_call()
                self._after_call(symbol)
            else:
                self._misplaced(symbol)
        elif state == _CALL_ARGS:
            if symbol == CALL_END:
                self._end_call()
                self._state = _SECTION
            elif symbol in (CALL_BEGIN, SECTION_END):
                self._problems.append(f"tool call {len(self._calls) - 1} ({self._calls[-1]['id']!r}) is not "
                                      f"closed by {CALL_END}")
                self._broken.setdefault(len(self._calls) - 1, f"it is not closed by {CALL_END}")
                self._end_call()
                self._after_call(symbol)
            else:
                self._misplaced(symbol)  # e.g. a real </think> token inside the arguments: kept as text

    def _after_call(self, symbol: str) -> None:
        """A call was cut short by ``symbol``: carry on as the section would."""
        self._state = _SECTION
        if symbol != CALL_END:
            self._marker(symbol)

    def _check_stray(self) -> None:
        stray = "".join(self._stray)
        if stray.strip():
            self._problems.append(f"text inside the tool-call section, outside a call, ignored: {stray[:80]!r}")
        self._stray = []

    def _open_call(self) -> None:
        call_id = "".join(self._id_text).strip()
        index = len(self._calls)
        if not call_id:
            self._problems.append(f"tool call {index} has an empty id")
            self._broken.setdefault(index, "its id is empty")
        elif not _INDEX_RE.match(call_id):
            self._problems.append(f"tool call {index} id {call_id!r} has no ':index' suffix")
        self._calls.append({"id": call_id, "name": function_name(call_id), "arguments": "", "valid_json": False})
        self._id_text = []
        self._args_text, self._args_started, self._args_blank = [], False, ""
        self._deltas.append({"type": "tool_call", "index": index, "id": call_id, "name": function_name(call_id)})

    def _arguments(self, text: str) -> None:
        """Argument text: kept, and sent as a delta once it is known not to be surrounding whitespace."""
        self._args_text.append(text)
        if not self._args_started:
            text = text.lstrip()
            if not text:
                return
            self._args_started = True
        text = self._args_blank + text
        visible = text.rstrip()
        self._args_blank = text[len(visible):]
        if visible:
            self._deltas.append({"type": "arguments", "index": len(self._calls) - 1, "text": visible})

    def _end_call(self) -> None:
        call = self._calls[-1]
        call["arguments"] = "".join(self._args_text).strip()
        try:
            json.loads(call["arguments"])
            call["valid_json"] = True
        except ValueError:
            call["valid_json"] = False
            self._broken.setdefault(len(self._calls) - 1, "its arguments are not valid JSON")
            self._problems.append(f"tool call {len(self._calls) - 1} ({call['id']!r}): arguments are not valid "
                                  f"JSON, returned raw: {call['arguments'][:80]!r}")
        self._args_text, self._args_started, self._args_blank = [], False, ""

    def _close_section(self, why: str) -> None:
        """The section ends abnormally (end of output or <|im_end|>): keep the partial call, say why."""
        self._problems.append(why)
        if self._state == _SECTION:
            self._check_stray()
        elif self._state in (_CALL_ID, _CALL_ARGS):
            if self._state == _CALL_ID:
                self._open_call()
            self._broken[len(self._calls) - 1] = "the output ended before the call did"
            self._end_call()

    def _take_deltas(self) -> list[dict[str, Any]]:
        deltas, self._deltas = self._deltas, []
        if self._finished and self._after_stop:
            trailing = "".join(self._after_stop)
            self._after_stop = []
            if trailing.strip():
                self._problems.append(f"text after the end of the message, not parsed: {trailing[:80]!r}")
        return deltas
