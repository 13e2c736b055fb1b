"""Solutions to the exercises of chapter 02 (chat template and tool parsing). Tested in tests/test_chat_template.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kimi_ref.chat_template import render_segments


def tokens_by_role(messages: list[dict], tokenizer: Any, variant: str = "k2.7-code",
                   tools: list | None = None) -> dict[str, int]:
    """How many prompt tokens each part of the prompt costs (roles as in ``render_segments``).

    Control tokens are one id each; a run of text between two control tokens is encoded as one piece,
    exactly as ``render_ids`` does, so the counts add up to ``len(render_ids(...))``.
    """
    counts: Counter[str] = Counter()
    run, run_role = "", ""
    for segment in render_segments(messages, tools, variant=variant) + [None]:
        if segment is None or segment.is_control:
            if run:
                counts[run_role] += len(tokenizer.encode(run))
                run = ""
            if segment is not None:
                counts[segment.role] += 1
        else:
            run, run_role = run + segment.text, segment.role
    return dict(counts)


def hide_history_reasoning(messages: list[dict]) -> list[dict]:
    """The history split by hand: blank the reasoning of every assistant message up to and including the
    last assistant message without tool calls. Rendering the result with reasoning preserved (k2.7-code)
    gives what K2.5 renders from the original."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
               default=-1)
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if i <= last and message["role"] == "assistant":
            message["reasoning_content"] = ""
            message.pop("reasoning", None)
        out.append(message)
    return out


def message_from_deltas(deltas: list[dict]) -> dict:
    """Rebuild ``{"reasoning_content", "content", "tool_calls"}`` from a StreamParser's deltas, as a chat UI
    that only sees the deltas would."""
    reasoning: str | None = None
    content = ""
    calls: list[dict] = []
    for delta in deltas:
        kind = delta["type"]
        if kind == "reasoning":
            reasoning = (reasoning or "") + delta["text"]
        elif kind == "content":
            content += delta["text"]
        elif kind == "tool_call":
            calls.append({"id": delta["id"], "type": "function",
                          "function": {"name": delta["name"], "arguments": ""}})
        elif kind == "arguments":
            calls[delta["index"]]["function"]["arguments"] += delta["text"]
    return {"reasoning_content": reasoning, "content": content, "tool_calls": calls}
