"""One chat session on rank 0: render the conversation, stream the answer, run its tool calls, save it.

One turn (every other rank, of every stage, only follows: ``control.py`` is the protocol)::

    messages + tools --ChatSetup.render_ids--> prompt ids       (reasoning of earlier turns kept:
                                                                 preserve_thinking, forced for K2.7-Code)
    --control.command(GENERATE) + send_ids--> every rank         the followers generate in lockstep
    --generate.generate--> new ids, streamed one by one into tool_parsing.StreamParser
                           reasoning deltas print under [reasoning], content under [answer]
    --> assistant message {content, reasoning_content, tool_calls} appended to the history
    tool calls? run each (kimi_ref.tools: the built-in calculator / current time, or ask the user for
    a declared tool that is not built in), append the {"role": "tool"} results and generate again, up
    to max_tool_rounds times.

The conversation on disk is OpenAI's chat format (``save_conversation`` / ``load_conversation``), and
``--tools`` reads OpenAI tool definitions (``load_tools``). The command line around a session, and
what the other ranks run, is :mod:`kimi_ref.chat`.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kimi_ref import control
from kimi_ref.chat_template import ChatTemplateError, render_ids
from kimi_ref.config import read_json
from kimi_ref.control import GENERATE, send_ids
from kimi_ref.generate import (ContextError, check_context, expanded_length, generate, make_generator, media_rows,
                               stop_ids_for)
from kimi_ref.media import ImageTable, image_part, message_images
from kimi_ref.parallel import ONE_STAGE, PP, TP
from kimi_ref.tool_parsing import StreamParser
from kimi_ref.tools import BUILTIN_TOOLS, run_tool
from weights_tools.safe_write import OutputError, write_text

__all__ = ["ChatError", "Settings", "Session", "session_images", "load_tools", "save_conversation", "load_conversation",
           "VARIANTS_WITH_PRESERVE"]

VARIANTS_WITH_PRESERVE = ("k2.6", "k2.7-code")


class ChatError(ValueError):
    """A command-line choice or file the chat cannot use (named, with what was expected)."""


# ---- tools (the built-ins live in kimi_ref.tools: bounded, never raising) ------------------------------

def load_tools(spec: str | None) -> list[dict]:
    """``--tools``: "demo" (the built-ins) or a JSON file holding a list of OpenAI tool definitions."""
    if spec is None:
        return []
    if spec == "demo":
        return [definition for _, definition in BUILTIN_TOOLS.values()]
    path = Path(spec)
    tools = read_json(path, ChatError, f"--tools {spec}")
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list) or not tools:
        raise ChatError(f"--tools {spec}: expected a non-empty JSON list of tool definitions, found {type(tools).__name__}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatError(f"--tools {spec}: tool {i} must look like "
                            '{"type": "function", "function": {"name": ..., "parameters": {...}}}, found ' f"{tool!r}")
    return tools


# ---- saving (OpenAI chat format) ------------------------------------------------------------------------

def save_conversation(path: str | Path, messages: list[dict], tools: list[dict] | None = None, *,
                      force: bool = False) -> None:
    """Write ``{"messages": [...], "tools": [...]}``: OpenAI chat messages with reasoning_content and tool_calls.

    Atomically (a temporary file renamed over ``path``); an existing file is replaced only with ``force``.
    Failures raise ``weights_tools.safe_write.OutputError`` naming the path.
    """

    data: dict[str, Any] = {"messages": messages}
    if tools:
        data["tools"] = tools
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", force=force, what="--save")


def load_conversation(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read what :func:`save_conversation` wrote (or a bare list of messages): ``(messages, tools)``."""
    data = read_json(path, ChatError)
    messages, tools = (data, []) if isinstance(data, list) else (data.get("messages"), data.get("tools") or [])
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatError(f"{path}: expected {{'messages': [{{'role': ..., ...}}, ...]}} (OpenAI chat format)")
    return messages, tools


# ---- the session on rank 0 ------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything rank 0 needs to run a session (picklable: it travels to the spawned ranks)."""

    ckpt: str
    device: str
    dtype: str | None
    backend: str
    variant: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None
    prompt: str | None
    system: str | None
    tools: list[dict] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # --image files (absolute), for the first user message
    history: list[dict] = field(default_factory=list)
    save: str | None = None
    force: bool = False  # --save may replace an existing file
    max_tool_rounds: int = 8
    timings: bool = True
    threads: int = 1  # torch CPU threads per rank (--threads)
    tp: int = 1  # ranks per pipeline stage
    pp: int = 1  # pipeline stages
    timeout: float = 1800.0  # seconds a rank waits for another
    setup: Any = None  # the checkpoint's ChatSetup (template, proof, sampling); None: kimi_ref's `variant` template


def session_images(s: Settings) -> list[str]:
    """Every image a session may show: the loaded history's, then the --image files."""
    return message_images(s.history) + list(s.images)


class _Interrupt:
    """Ctrl-C during a generation: a flag rank 0 reads after each token (never an exception mid-collective)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_Interrupt":
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (e.g. embedded): no Ctrl-C handling
            self._previous = None
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Printer:
    """Streams the parser's deltas: reasoning (dimmed on a terminal) under [reasoning], content under [answer]."""

    _DIM, _BOLD, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.color = out.isatty() and os.environ.get("NO_COLOR") is None
        self.section: str | None = None

    def _enter(self, section: str) -> None:
        if self.section == section:
            return
        self._leave()
        label = {"reasoning": "[reasoning]", "content": "[answer]", "tool": "[tool call]"}[section]
        if self.color:
            self.out.write(f"{self._BOLD}{label}{self._RESET} " + (self._DIM if section == "reasoning" else ""))
        else:
            self.out.write(label + " ")
        self.section = section

    def _leave(self) -> None:
        if self.section is None:
            return
        if self.section == "tool":
            self.out.write(")")
        self.out.write((self._RESET if self.color else "") + "\n")
        self.section = None

    def delta(self, d: dict) -> None:
        kind = d["type"]
        if kind in ("reasoning", "content"):
            self._enter(kind)
            if d.get("marker"):  # a control token out of place (listed in the problems): never shown as plain text
                mark = f"⟦misplaced {d['text']}⟧"
                self.out.write(f"{self._RESET}{self._BOLD}{mark}{self._RESET}{self._DIM if kind == 'reasoning' else ''}"
                               if self.color else mark)
            else:
                self.out.write(d["text"])
        elif kind == "tool_call":
            if self.section == "tool":
                self._leave()  # each call on its own line
            self._enter("tool")
            self.out.write(f"{d['name']}(")
        elif kind == "arguments":
            self.out.write(d["text"])
        self.out.flush()

    def end(self) -> None:
        self._leave()
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.write((f"{self._DIM}{text}{self._RESET}" if self.color else text) + "\n")
        self.out.flush()


class Session:
    """Rank 0's side of the conversation: renders, asks every rank to generate, parses, runs tools."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, tp: TP, device: str,
                 out: TextIO | None = None, inp: TextIO | None = None, images: ImageTable | None = None) -> None:
        self.model, self.tok, self.s, self.tp, self.device = model, tokenizer, settings, tp, device
        self.pp: PP = getattr(model, "pp", ONE_STAGE)
        self.out, self.inp = out or sys.stdout, inp or sys.stdin
        self.printer = _Printer(self.out)
        # generation_config.json's eos ids stop an answer too
        self.stop_ids = stop_ids_for(tokenizer, model.config,
                                     settings.setup.sampling.eos_token_ids if settings.setup is not None else ())
        self.end_think = tokenizer.special_tokens.get("</think>")
        self.open_think = tokenizer.special_tokens.get("<think>")
        self.generator = make_generator(settings.seed)
        self.images = images if images is not None else ImageTable(session_images(settings), settings.ckpt)
        self.pending_images = list(settings.images)  # attached to the next user message, once
        self.interrupted = False  # a generation was stopped by Ctrl-C (--prompt then exits 130)
        self.malformed: dict[int, str] = {}  # the last output's calls the parser found broken: index -> why
        self.save_failed = False
        self.messages: list[dict] = []
        self.reset()
        if settings.history:
            self.messages = [dict(m) for m in settings.history]

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.s.system}] if self.s.system else []

    def prompt_ids(self) -> list[int]:
        preserve = True if self.s.variant in VARIANTS_WITH_PRESERVE else None
        if self.s.setup is not None:
            return self.s.setup.render_ids(self.messages, self.tok, tools=self.s.tools or None, thinking=True,
                                           preserve_thinking=preserve, add_generation_prompt=True)
        return render_ids(self.messages, self.tok, tools=self.s.tools or None, variant=self.s.variant,
                          thinking=True, preserve_thinking=preserve, add_generation_prompt=True)

    def _budget(self, prompt_tokens: int) -> int:
        """New tokens allowed for this generation: --max-new-tokens, within generation_config.json's max_length."""
        max_length = self.s.setup.sampling.max_length if self.s.setup is not None else None
        if max_length is None:
            return self.s.max_new_tokens
        if prompt_tokens >= max_length:
            raise ContextError(f"the prompt is {prompt_tokens} tokens, but generation_config.json's max_length is "
                               f"{max_length} (prompt and answer together): /reset, or start without --load")
        return min(self.s.max_new_tokens, max_length - prompt_tokens)

    def user_turn(self, text: str) -> bool:
        """One user message and everything it triggers; False if it was refused (history unchanged)."""
        before, pending = len(self.messages), self.pending_images
        if pending:
            self.messages.append({"role": "user", "content": [image_part(s) for s in pending]
                                  + [{"type": "text", "text": text}]})
            self.pending_images = []
            merge = self.model.config.vision.merge_kernel_size
            for source in pending:
                _, grid = self.images.entries[self.images.indices([source])[0]]
                self.printer.note(f"[image] {source} · {grid[2]}×{grid[1]} patches -> "
                                  f"{media_rows([grid], merge)[0]} tokens")
        else:
            self.messages.append({"role": "user", "content": text})
        rounds = 0
        while True:
            try:
                message, finish = self._assistant()
            except ContextError as e:
                del self.messages[before:]
                self.pending_images = pending  # the turn never happened: its images wait for the next one
                self.printer.note(f"refused: {e}")
                return False
            self.messages.append(message)
            calls = message.get("tool_calls") or []
            if finish == "interrupted":
                self.interrupted = True
            if finish == "interrupted" or not calls:
                self._save()
                return True
            if finish != "stop":  # cut off by --max-new-tokens / the context: the calls may be incomplete
                self.printer.note(f"(not running {len(calls)} tool call(s): the output was cut off at "
                                  f"--max-new-tokens {self.s.max_new_tokens} / the context before it ended)")
                self._results(calls, {i: "the output was cut off before it ended (--max-new-tokens)"
                                      for i in range(len(calls))})
                return True
            if rounds >= self.s.max_tool_rounds:
                self._save()
                self.printer.note(f"(not running these tool calls: --max-tool-rounds {self.s.max_tool_rounds} reached)")
                return True
            rounds += 1
            self._results(calls, self.malformed)

    def _results(self, calls: list[dict], refused: dict[int, str]) -> None:
        """Run (or, for the indices in ``refused``, decline with the reason) each call; append the results."""
        declared = [t["function"]["name"] for t in self.s.tools]
        for i, call in enumerate(calls):
            if i in refused:
                result = f"error: not run: {refused[i]}"
            else:
                result = run_tool(call, self._ask, declared)
            self.printer.note(f"[tool result] {call['id']} -> {result}")
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                  "content": result})
        self._save()

    def _assistant(self) -> tuple[dict, str]:
        try:
            ids = self.prompt_ids()
        except ChatTemplateError as e:  # e.g. --template checkpoint and a typed special token: refuse the turn
            raise ContextError(str(e)) from None
        chosen = self.images.indices(message_images(self.messages))
        media = self.images.media(chosen)
        try:
            length = expanded_length(ids, media, self.model.config)
        except ValueError as e:  # e.g. a typed "<|media_pad|>" that has no image: refuse the turn, not crash
            raise ContextError(str(e)) from None
        check_context(length, self.model.config.max_position_embeddings)  # before any rank starts
        budget = self._budget(length)
        control.command(self.tp, self.pp, self.device, GENERATE, budget)
        send_ids(ids, self.tp, self.device, self.pp)
        send_ids(chosen, self.tp, self.device, self.pp)
        # K2.5+ prompts end with <think>, so the answer starts inside the reasoning; K2-Thinking's model
        # writes <think> itself, and K2-Instruct does not think.
        in_reasoning = bool(ids) and ids[-1] == self.open_think
        parser = StreamParser(self.tok, starts_in_reasoning=in_reasoning)
        counts = {"reasoning": 0, "answer": 0}
        phase = ["reasoning" if in_reasoning else "answer"]

        def on_token(token: int) -> None:
            if token in self.stop_ids:
                return
            counts[phase[0]] += 1
            if token == self.end_think:
                phase[0] = "answer"
            for d in parser.feed([token]):
                if d["type"] != "reasoning":
                    phase[0] = "answer"
                self.printer.delta(d)

        with _Interrupt() as interrupt:
            result = generate(self.model, ids, max_new_tokens=budget, temperature=self.s.temperature,
                              top_p=self.s.top_p, generator=self.generator, stop_ids=self.stop_ids,
                              on_token=on_token, should_stop=lambda: interrupt.requested, tp=self.tp, media=media)
        for d in parser.finish():
            self.printer.delta(d)
        self.printer.end()
        parsed = parser.result()
        message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
        if parsed["reasoning_content"]:
            message["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "valid_json"} for c in parsed["tool_calls"]]
        self.malformed = parser.malformed_calls()
        if result.finish_reason == "stop":  # a finished answer the parser found irregular: say so
            for problem in parsed["problems"]:
                self.printer.note(f"(output: {problem})")
        if self.s.timings:
            why = {"stop": "", "length": " · stopped at --max-new-tokens / the context",
                   "interrupted": " · interrupted"}[result.finish_reason]
            speed = result.decode_tokens_per_second
            self.printer.note(f"── prompt {result.prompt_tokens} · reasoning {counts['reasoning']} · answer "
                              f"{counts['answer']} tokens · {'n/a' if math.isnan(speed) else f'{speed:.1f}'} tok/s · "
                              f"prefill {result.prefill_seconds:.2f} s{why}")
        return message, result.finish_reason

    def _ask(self, question: str) -> str:
        line = self._read_line(question)
        return "error: no result (the user's input ended)" if line is None else line

    def _read_line(self, prompt: str) -> str | None:
        """One line of input without its newline, or None at end of input.

        On a terminal we wait in ``select`` with a short timeout instead of a blocking read: torch and
        gloo start threads, and the kernel may hand Ctrl-C's SIGINT to any of them, which would not
        interrupt a blocking read in this one. Python runs the handler (KeyboardInterrupt) at the next
        timeout. In canonical mode one ``os.read`` returns at most one line, so nothing is buffered.
        """
        self.out.write(prompt)
        self.out.flush()
        if not self.inp.isatty():
            line = self.inp.readline()
            return None if not line else line.rstrip("\n")
        fd = self.inp.fileno()
        while not select.select([fd], [], [], 0.2)[0]:
            pass
        data = os.read(fd, 1 << 16)
        return None if not data else data.decode("utf-8", errors="replace").rstrip("\n")

    def _save(self) -> None:
        """After every turn; a failure is shown and the session goes on (the conversation is still in memory)."""

        if not self.s.save:
            return
        try:
            save_conversation(self.s.save, self.messages, self.s.tools, force=True)  # our own file (checked at start)
            if self.save_failed:
                self.printer.note(f"(saved to {self.s.save} again)")
            self.save_failed = False
        except OutputError as e:
            self.save_failed = True
            self.printer.note(f"(not saved: {e}; the conversation is kept in memory and saved again after the next turn)")

    def repl(self) -> None:
        interactive = self.inp.isatty()
        if interactive:
            self.printer.note("Type a message. /reset forgets the conversation, /exit (or Ctrl-D) quits; "
                              "Ctrl-C stops a generation.")
        while True:
            try:
                line = self._read_line("you> " if interactive else "")
                if line is None:
                    break
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                self.reset()
                self.printer.note("(conversation forgotten)")
                continue
            if text.startswith("/"):
                self.printer.note(f"unknown command {text.split()[0]!r}: use /reset or /exit")
                continue
            if not interactive:
                self.out.write(f"you> {text}\n")
            self.user_turn(text)
