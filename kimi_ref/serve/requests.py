"""Check a ``POST /v1/chat/completions`` body into a :class:`~kimi_ref.serve.shapes.ChatRequest`.

Every refusal is a :class:`RequestError` whose ``param`` names the field at fault in the request's own
terms (``messages[2].tool_call_id``, ``tools[0].function.name``, ``stop``), so the client sees an
OpenAI-shaped 400 that says what to change. What is checked here needs no model: JSON, types, ranges,
roles, the pairing of tool results with calls. What needs the model (the prompt's length, whether an
image decodes, the checkpoint's vision tower) is checked by ``kimi_ref.serve.prompt``.

Fields OpenAI defines that change nothing here (``user``, ``metadata``, ``store``, ...) are accepted;
fields that would change the answer but are not implemented (``n`` > 1, ``logprobs``, penalties,
``response_format`` other than text, ``tool_choice`` other than auto / none) are refused, never
silently ignored; and an unknown field is refused too, as OpenAI does, so a typo is caught.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kimi_ref.serve.shapes import ChatRequest

__all__ = ["RequestError", "parse_chat_request", "ROLES", "MAX_STOP"]

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
_SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
# Accepted and without effect: who is asking, bookkeeping, and switches whose only value here is the default.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort", "prompt_cache_key",
            "safety_identifier"}
_HANDLED = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
            "stream", "stream_options", "tools", "tool_choice", "chat_template_kwargs", "thinking", "ignore_eos",
            "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format"}


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and an OpenAI error body naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _expect(value: Any, kinds: tuple[type, ...], param: str, what: str) -> Any:
    # bool is an int in Python, never in JSON's eyes.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{param} must be {what}, found {_type_name(value)} {json.dumps(value)[:80]}", param)
    return value


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(value, (int, float), key, "a number")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{key} must lie in {interval}, found {value}", key)
    return float(value)


def parse_chat_request(body: bytes) -> ChatRequest:
    """The checked request, or a :class:`RequestError` naming the first field at fault."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError("the request body is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, found {_type_name(data)}")
    unknown = sorted(set(data) - _HANDLED - _IGNORED)
    if unknown:
        raise RequestError(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
    _refuse_unimplemented(data)

    model = data.get("model")
    if model is not None:
        _expect(model, (str,), "model", "a string")
    request = ChatRequest(messages=_messages(data.get("messages")), model=model)
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        if data.get(key) is not None:
            request.max_tokens = _expect(data[key], (int,), key, "an integer")
            if request.max_tokens < 1:
                raise RequestError(f"{key} must be at least 1, found {request.max_tokens}", key)
            break
    request.temperature = _number(data, "temperature", 0.0, 2.0)
    request.top_p = _number(data, "top_p", 0.0, 1.0, low_open=True)
    if data.get("seed") is not None:
        request.seed = _expect(data["seed"], (int,), "seed", "an integer")
        if not _SEED_RANGE[0] <= request.seed <= _SEED_RANGE[1]:
            raise RequestError(f"seed must lie in [-2**63, 2**64 - 1], found {request.seed}", "seed")
    request.stop = _stop(data.get("stop"))
    if data.get("stream") is not None:
        request.stream = _expect(data["stream"], (bool,), "stream", "a boolean")
    options = data.get("stream_options")
    if options is not None:
        _expect(options, (dict,), "stream_options", "an object")
        if not request.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        extra = sorted(set(options) - {"include_usage"})
        if extra:
            raise RequestError(f"stream_options.{extra[0]} is not supported (only include_usage)", f"stream_options.{extra[0]}")
        request.include_usage = bool(_expect(options.get("include_usage", False), (bool,),
                                             "stream_options.include_usage", "a boolean"))
    request.tools = _tools(data.get("tools"))
    request.tool_choice = _tool_choice(data.get("tool_choice"))
    request.thinking, request.preserve_thinking = _thinking(data)
    if data.get("ignore_eos") is not None:
        request.ignore_eos = _expect(data["ignore_eos"], (bool,), "ignore_eos", "a boolean")
    return request


def _refuse_unimplemented(data: dict) -> None:
    """Fields that would change the answer but are not implemented: refused by name."""
    if data.get("n") not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request here), found {json.dumps(data['n'])[:40]}", "n")
    if data.get("logprobs") not in (None, False) or data.get("top_logprobs") not in (None, 0):
        key = "logprobs" if data.get("logprobs") not in (None, False) else "top_logprobs"
        raise RequestError(f"{key} is not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if data.get(key) not in (None, 0, 0.0) or isinstance(data.get(key), bool):
            raise RequestError(f"{key} is not supported by this server (only 0)", key)
    if data.get("logit_bias") not in (None, {}):
        raise RequestError("logit_bias is not supported by this server", "logit_bias")
    fmt = data.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError("response_format is not supported by this server (only {\"type\": \"text\"})",
                           "response_format")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    _expect(stops, (list,), "stop", "a string or an array of strings")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop holds at most {MAX_STOP} strings, found {len(stops)}", "stop")
    for i, s in enumerate(stops):
        where = "stop" if isinstance(value, str) else f"stop[{i}]"
        if not isinstance(s, str) or not s:
            raise RequestError(f"{where} must be a non-empty string, found {json.dumps(s)[:80]}", where)
    return list(stops)


def _tools(value: Any) -> list[dict]:
    if value is None:
        return []
    _expect(value, (list,), "tools", "an array of tool definitions")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        _expect(tool, (dict,), where, 'an object {"type": "function", "function": {...}}')
        if tool.get("type", "function") != "function":
            raise RequestError(f"{where}.type must be 'function', found {tool.get('type')!r}", f"{where}.type")
        fn = _expect(tool.get("function"), (dict,), f"{where}.function", 'an object {"name": ..., "parameters": ...}')
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.function.name must be a non-empty string, found {json.dumps(name)}",
                               f"{where}.function.name")
        if fn.get("parameters") is not None:
            _expect(fn["parameters"], (dict,), f"{where}.function.parameters", "a JSON Schema object")
    return value


def _tool_choice(value: Any) -> str:
    if value is None:
        return "auto"
    if value in ("auto", "none"):
        return value
    shown = repr(value) if isinstance(value, str) else json.dumps(value)[:80]
    raise RequestError(f"tool_choice {shown} is not supported: use 'auto' (the model decides) or 'none' "
                       "(no tool calls)", "tool_choice")


def _thinking(data: dict) -> tuple[bool | None, bool | None]:
    """``chat_template_kwargs`` (vLLM, SGLang) and ``thinking: {"type": ...}`` (Moonshot's API)."""
    thinking = preserve = None
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None:
        _expect(kwargs, (dict,), "chat_template_kwargs", "an object")
        for key, value in kwargs.items():
            where = f"chat_template_kwargs.{key}"
            if key not in ("thinking", "preserve_thinking"):
                raise RequestError(f"{where} is not a switch of Kimi's template (it has thinking and "
                                   "preserve_thinking)", where)
            _expect(value, (bool,), where, "true or false")
        thinking, preserve = kwargs.get("thinking"), kwargs.get("preserve_thinking")
    switch = data.get("thinking")
    if switch is not None:
        _expect(switch, (dict,), "thinking", 'an object {"type": "enabled" | "disabled"}')
        if switch.get("type") not in ("enabled", "disabled"):
            raise RequestError(f"thinking.type must be 'enabled' or 'disabled', found {switch.get('type')!r}",
                               "thinking.type")
        thinking = switch["type"] == "enabled"
    return thinking, preserve


# ---- messages ----------------------------------------------------------------------------------------------

def _messages(value: Any) -> list[dict]:
    if value is None:
        raise RequestError("messages is required: a non-empty array of chat messages", "messages")
    _expect(value, (list,), "messages", "an array of chat messages")
    if not value:
        raise RequestError("messages must hold at least one message", "messages")
    checked: list[dict] = []
    open_calls: set[str] = set()  # ids of the latest assistant's tool calls
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        _expect(message, (dict,), where, "an object with a 'role'")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role: unknown role {json.dumps(role)[:40]}; expected one of "
                               f"{', '.join(ROLES)}", f"{where}.role")
        message = dict(message, role="system" if role == "developer" else role)
        for key in ("name", "reasoning_content", "reasoning", "tool_call_id"):
            if message.get(key) is not None:
                _expect(message[key], (str,), f"{where}.{key}", "a string")
        _content(message, where)
        if role == "assistant":
            open_calls = _tool_calls(message, where)
        elif message.get("tool_calls") is not None:
            raise RequestError(f"{where}.tool_calls: only assistant messages carry tool calls (this one is {role})",
                               f"{where}.tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not call_id:
                raise RequestError(f"{where}.tool_call_id is required: the id of the call this message answers",
                                   f"{where}.tool_call_id")
            if call_id not in open_calls:
                known = ", ".join(sorted(open_calls)) or "none"
                raise RequestError(f"{where}.tool_call_id {call_id!r} matches no tool call of the assistant message "
                                   f"before it (its calls: {known})", f"{where}.tool_call_id")
        checked.append(message)
    return checked


_PART_TYPES = ("text", "image_url")


def _content(message: dict, where: str) -> None:
    content = message.get("content")
    if content is None:
        if message["role"] != "assistant":
            raise RequestError(f"{where}.content is required for a {message['role']} message", f"{where}.content")
        return
    if isinstance(content, str):
        return
    _expect(content, (list,), f"{where}.content", "a string or an array of content parts")
    for k, part in enumerate(content):
        part_where = f"{where}.content[{k}]"
        _expect(part, (dict,), part_where, "an object with a 'type'")
        kind = part.get("type")
        if kind not in _PART_TYPES:
            raise RequestError(f"{part_where}.type {json.dumps(kind)[:40]} is not supported here; expected one of "
                               f"{', '.join(_PART_TYPES)}", f"{part_where}.type")
        if kind == "text":
            _expect(part.get("text"), (str,), f"{part_where}.text", "a string")
        else:
            if message["role"] != "user":
                raise RequestError(f"{part_where}: images go in user messages", f"{part_where}.type")
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{part_where}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}, "
                                   f"found {json.dumps(image)[:80]}", f"{part_where}.image_url")


def _tool_calls(message: dict, where: str) -> set[str]:
    calls = message.get("tool_calls")
    if calls is None:
        return set()
    _expect(calls, (list,), f"{where}.tool_calls", "an array of tool calls")
    ids = set()
    for j, call in enumerate(calls):
        call_where = f"{where}.tool_calls[{j}]"
        _expect(call, (dict,), call_where, 'an object {"id", "type", "function"}')
        _expect(call.get("id"), (str,), f"{call_where}.id", "a string (e.g. 'functions.get_weather:0')")
        fn = _expect(call.get("function"), (dict,), f"{call_where}.function", 'an object {"name", "arguments"}')
        _expect(fn.get("name"), (str,), f"{call_where}.function.name", "a string")
        _expect(fn.get("arguments"), (str,), f"{call_where}.function.arguments", "a JSON string")
        ids.add(call["id"])
    return ids
