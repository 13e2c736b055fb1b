"""The OpenAI chat-completion shapes the server speaks, each written once as a dataclass.

Requests arrive as JSON and are checked into a :class:`ChatRequest` by ``kimi_ref.serve.requests``;
responses are built from these classes and turned into JSON by :func:`payload`, which drops the
fields that are ``None`` unless the class lists them in ``KEEP_NULL`` (OpenAI writes ``"content":
null`` in a message and ``"finish_reason": null`` in a chunk, but leaves an absent delta field out).

Beside OpenAI's own fields a message carries Kimi's reasoning twice: ``reasoning_content`` (what
vLLM and SGLang return, and K2.5's card reads) and ``reasoning`` (the alias the K2.6 / K2.7 cards read).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["ChatRequest", "FunctionCall", "ToolCall", "Message", "Choice", "CompletionDetails", "Usage",
           "ChatCompletion", "FunctionDelta", "ToolCallDelta", "Delta", "ChunkChoice", "ChatCompletionChunk",
           "ModelCard", "ModelList", "ErrorBody", "ErrorResponse", "payload"]


# ---- the request (after checking: every field has its final type) ----------------------------------------

@dataclass
class ChatRequest:
    """``POST /v1/chat/completions``, checked. ``None`` means "not given: the server's default"."""

    messages: list[dict]                      # OpenAI messages ("developer" already renamed "system")
    model: str | None = None
    max_tokens: int | None = None             # max_completion_tokens, or the older max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False               # stream_options.include_usage: a last chunk with the usage
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"                 # "auto" or "none"
    thinking: bool | None = None              # chat_template_kwargs.thinking, or thinking.type
    preserve_thinking: bool | None = None     # chat_template_kwargs.preserve_thinking
    ignore_eos: bool = False                  # vLLM's extension: generate past <|im_end|> up to max_tokens


# ---- a whole answer ----------------------------------------------------------------------------------------

@dataclass
class FunctionCall:
    name: str
    arguments: str                            # a JSON string, as the model wrote it


@dataclass
class ToolCall:
    id: str                                   # kimi_k2 ids: "functions.NAME:IDX"
    function: FunctionCall
    type: str = "function"


@dataclass
class Message:
    KEEP_NULL: ClassVar[tuple[str, ...]] = ("content",)
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None              # the same text as reasoning_content
    tool_calls: list[ToolCall] | None = None
    role: str = "assistant"


@dataclass
class Choice:
    KEEP_NULL: ClassVar[tuple[str, ...]] = ("finish_reason", "logprobs")
    message: Message
    finish_reason: str                        # "stop", "length" or "tool_calls"
    index: int = 0
    logprobs: None = None


@dataclass
class CompletionDetails:
    reasoning_tokens: int


@dataclass
class Usage:
    prompt_tokens: int                        # positions the prompt fills, each image's rows counted
    completion_tokens: int
    completion_tokens_details: CompletionDetails
    total_tokens: int = 0

    def __post_init__(self) -> None:
        self.total_tokens = self.prompt_tokens + self.completion_tokens


@dataclass
class ChatCompletion:
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"


# ---- a streamed answer -------------------------------------------------------------------------------------

@dataclass
class FunctionDelta:
    name: str | None = None
    arguments: str | None = None


@dataclass
class ToolCallDelta:
    index: int
    function: FunctionDelta
    id: str | None = None                     # id and type only in a call's first delta
    type: str | None = None


@dataclass
class Delta:
    role: str | None = None                   # "assistant", in the first chunk only
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


@dataclass
class ChunkChoice:
    KEEP_NULL: ClassVar[tuple[str, ...]] = ("finish_reason", "logprobs")
    delta: Delta
    finish_reason: str | None = None
    index: int = 0
    logprobs: None = None


@dataclass
class ChatCompletionChunk:
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None                # only in the last chunk, with stream_options.include_usage
    object: str = "chat.completion.chunk"


# ---- models and errors -------------------------------------------------------------------------------------

@dataclass
class ModelCard:
    id: str
    created: int
    max_model_len: int
    owned_by: str = "kimi_ref"
    object: str = "model"


@dataclass
class ModelList:
    data: list[ModelCard]
    object: str = "list"


@dataclass
class ErrorBody:
    KEEP_NULL: ClassVar[tuple[str, ...]] = ("param", "code")
    message: str
    type: str = "invalid_request_error"
    param: str | None = None                  # the request field at fault, e.g. "messages[2].tool_call_id"
    code: str | None = None


@dataclass
class ErrorResponse:
    error: ErrorBody


def payload(obj: Any) -> Any:
    """A dataclass (or list / dict of them) as plain JSON values, ``None`` fields dropped unless kept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        keep = getattr(obj, "KEEP_NULL", ())
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None or f.name in keep:
                out[f.name] = payload(value)
        return out
    if isinstance(obj, list):
        return [payload(v) for v in obj]
    if isinstance(obj, dict):
        return {k: payload(v) for k, v in obj.items()}
    return obj
