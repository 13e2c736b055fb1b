"""One answer, token by token: the stream parser, stop strings, token counts -> deltas and the final message.

The engine feeds every new token to :meth:`Turn.feed` and sends the deltas it returns; :meth:`Turn.finish`
gives the last deltas and the whole answer. The whole answer is assembled from exactly the deltas that
were sent, so a streamed answer joined up equals the non-streamed one by construction.

Stop strings (``stop``) are matched in the answer only (the content, after ``</think>``): a thinking
model's reasoning is not what a stop string is written for. Content that could be the start of a stop
string is held back until the next token decides, so a stop string never reaches the client. Once one
matches, the answer ends there (``finish_reason: "stop"``) and the engine stops the generation.

Token counts follow the chat CLI: a token counts as reasoning until ``</think>`` (itself included) or
until the parser leaves the reasoning; ``completion_tokens`` counts every generated token the answer
used, the final ``<|im_end|>`` included.
"""

from __future__ import annotations

from typing import Any

from kimi_ref.serve.shapes import (CompletionDetails, Delta, FunctionCall, FunctionDelta, Message, ToolCall,
                                   ToolCallDelta, Usage)
from kimi_ref.tool_parsing import StreamParser

__all__ = ["StopMatcher", "Turn", "Answer"]


class StopMatcher:
    """Text in, text out, cut before the first stop string; a tail that may grow into one is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        if not self.stops:
            return text
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self.held = True, ""
            return buffer[:min(hits)]
        keep = 0  # the longest tail of the buffer that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buffer)), keep, -1):
                if buffer.endswith(s[:n]):
                    keep = n
                    break
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        text, self.held = ("" if self.matched else self.held), ""
        return text


class Answer:
    """What :meth:`Turn.finish` returns: the message, why it ended and the counts."""

    def __init__(self, message: Message, finish_reason: str, usage: Usage) -> None:
        self.message, self.finish_reason, self.usage = message, finish_reason, usage


class Turn:
    def __init__(self, tokenizer: Any, prompt_tokens: int, stop: list[str], starts_in_reasoning: bool,
                 stop_ids: tuple[int, ...]) -> None:
        self.parser = StreamParser(tokenizer, starts_in_reasoning=starts_in_reasoning)
        self.stop = StopMatcher(stop)
        self.stop_ids = set(stop_ids)
        self.end_think = tokenizer.special_tokens.get("</think>")
        self.prompt_tokens = prompt_tokens
        self.in_reasoning = starts_in_reasoning
        self.tokens = self.reasoning_tokens = 0
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []  # {"id", "name", "arguments": [fragments]}

    @property
    def stopped(self) -> bool:
        """A stop string matched: the generation should end."""
        return self.stop.matched

    def feed(self, token: int) -> list[Delta]:
        if self.stopped:
            return []  # the token sampled while the stop travelled to every rank: not part of the answer
        self.tokens += 1
        if token in self.stop_ids:
            return []
        if self.in_reasoning:
            self.reasoning_tokens += 1
            if token == self.end_think:
                self.in_reasoning = False
        return self._deltas(self.parser.feed([token]))

    def finish(self, generation_finish: str) -> tuple[list[Delta], Answer]:
        """``generation_finish``: generate()'s reason ("stop", "length" or "interrupted")."""
        deltas = [] if self.stopped else self._deltas(self.parser.finish())
        tail = self.stop.flush()
        if tail:
            deltas.append(self._content(tail))
        calls = [ToolCall(c["id"], FunctionCall(c["name"], "".join(c["arguments"]))) for c in self.calls]
        reasoning = "".join(self.reasoning) or None
        content = "".join(self.content)
        message = Message(content=content if content or not calls else None, reasoning_content=reasoning,
                          reasoning=reasoning, tool_calls=calls or None)
        if self.stopped or generation_finish != "length":
            reason = "tool_calls" if calls and not self.stopped else "stop"
        else:
            reason = "length"
        usage = Usage(self.prompt_tokens, self.tokens, CompletionDetails(self.reasoning_tokens))
        return deltas, Answer(message, reason, usage)

    # ---- parser deltas -> shapes.Delta ----
    def _deltas(self, parsed: list[dict]) -> list[Delta]:
        out: list[Delta] = []
        for d in parsed:
            kind = d["type"]
            if kind != "reasoning":
                self.in_reasoning = False  # the answer has begun (a call may skip </think>)
            if self.stopped:
                break
            if kind == "reasoning":
                self.reasoning.append(d["text"])
                out.append(Delta(reasoning_content=d["text"], reasoning=d["text"]))
            elif kind == "content":
                text = self.stop.feed(d["text"])
                if text:
                    out.append(self._content(text))
            elif kind == "tool_call":
                self.calls.append({"id": d["id"], "name": d["name"], "arguments": []})
                out.append(Delta(tool_calls=[ToolCallDelta(d["index"], FunctionDelta(d["name"], ""), id=d["id"],
                                                           type="function")]))
            elif kind == "arguments":
                self.calls[d["index"]]["arguments"].append(d["text"])
                out.append(Delta(tool_calls=[ToolCallDelta(d["index"], FunctionDelta(arguments=d["text"]))]))
        return out

    def _content(self, text: str) -> Delta:
        self.content.append(text)
        return Delta(content=text)
