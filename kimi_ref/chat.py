"""Talk to the model: ``python -m kimi_ref.chat``.

    python -m kimi_ref.chat                                  # the embedded tiny checkpoint, CPU (answers are noise)
    python -m kimi_ref.chat --ckpt DIR --tp 8                # the real checkpoint on 8 GPUs
    python -m kimi_ref.chat --ckpt DIR --tp 2 --device cpu --prompt "..." --max-new-tokens N --seed S
    python -m kimi_ref.chat ... --temperature 0              # greedy (defaults: generation_config.json, else 1.0 / 0.95)
    python -m kimi_ref.chat --ckpt DIR --template checkpoint  # render with the checkpoint's own chat_template.jinja
    python -m kimi_ref.chat ... --tools demo | --tools FILE.json   --save FILE.json   --load FILE.json
    python -m kimi_ref.chat --ckpt DIR --image cat.png --prompt "What is in the picture?"   # K2.5+ checkpoints

The checkpoint decides (:mod:`kimi_ref.checkpoint_chat`): the template variant comes from its
``chat_template.jinja`` (or the variant its ``tokenizer_config.json`` records; ``--variant`` overrides),
kimi_ref's template is proven equal to the checkpoint's on a built-in suite before the model loads (or
refused with a diff; ``--template checkpoint`` renders with the checkpoint's own through jinja2), the
special-token ids are checked, and ``generation_config.json`` sets the sampling defaults and extra stop
ids. The chat prints the variant chosen and why, and the sampling and where it came from.

One turn, on rank 0 (the other TP ranks only follow, see ``launch.py``):

    messages + tools --ChatSetup.render_ids--> prompt ids       (reasoning of earlier turns kept:
                                                                 preserve_thinking, forced for K2.7-Code)
    --generate.generate--> new ids, streamed one by one into tool_parsing.StreamParser
                           reasoning deltas print under [reasoning], content under [answer]
    --> assistant message {content, reasoning_content, tool_calls} appended to the history
    tool calls? run each (kimi_ref.tools: the built-in calculator / current time, or ask the user for
    a declared tool that is not built in), append the {"role": "tool"} results and generate again, up
    to --max-tool-rounds times. A call is answered with an "error: ..." result instead of being run
    when it names a tool the conversation does not declare, when the parser found it malformed, or
    when --max-new-tokens cut the output off (then the turn ends there).

--save FILE is checked before the model loads (a new file, the --load file, or --force) and written
atomically after every turn; if a write fails the session goes on and says so (exit status 1).
Exit status: 0, 2 for a refused command line, 1 if a --save failed, 130 for Ctrl-C under --prompt.

Images (``--image PATH``, repeatable) ride with the first user message (the ``--prompt`` one, or the
first REPL line) as content parts ``{"type": "image_url", "image_url": {"url": PATH}}`` placed before its
text; --save keeps them so, and --load reads such parts back (a path, a ``file://`` URL or a base64
``data:`` URL). Each turn re-prefills the whole conversation, so the images of every user message go in
again each time. Pixels never travel between ranks: every rank holds the same Settings and runs the
same deterministic MoonViT preprocessing on the same files (an :class:`ImageTable`); rank 0 only sends,
with each prompt, which table entries the conversation shows, in order.

REPL commands: ``/reset`` (forget the conversation), ``/exit`` (or Ctrl-D). Ctrl-C during a generation
stops that generation (what was written so far is kept); Ctrl-C at the prompt only clears the line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from kimi_ref import parallel
from kimi_ref.config import read_json
from kimi_ref.generate import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ContextError, Media,
                               check_context, check_sampling, expanded_length, generate, make_generator, media_rows,
                               receive_ids, send_ids, stop_ids_for)
from kimi_ref.parallel import TP, TPError
from kimi_ref.tools import BUILTIN_TOOLS, calculator, current_time, run_tool

__all__ = ["main", "default_checkpoint", "checkpoint_tools", "calculator", "current_time", "BUILTIN_TOOLS", "run_tool",
           "load_tools", "save_conversation", "load_conversation", "ChatError", "image_part", "image_source", "message_images",
           "ImageTable"]

VARIANTS_WITH_PRESERVE = ("k2.6", "k2.7-code")


class ChatError(ValueError):
    """A command-line choice or file the chat cannot use (named, with what was expected)."""


NANO_DIR = Path(__file__).resolve().parent / "data" / "nano"
CHECKPOINT_TOOLS_FILE = "tools.json"  # the tools a checkpoint was trained with (kimi-nano ships one)


def default_checkpoint() -> Path:
    """The checkpoint used when no --ckpt is given: kimi-nano, shipped in the package.

    kimi-nano is a miniature Kimi trained from scratch with ``python -m weights_tools.train_nano``
    (same architecture and checkpoint format, INT4 experts, the real chat template and tool calls).
    """
    if not (NANO_DIR / "config.json").is_file():
        raise ChatError(f"the embedded kimi-nano checkpoint is missing from {NANO_DIR} (a broken install?); "
                        "rebuild it with `python -m weights_tools.train_nano kimi_ref/data/nano --force` or pass --ckpt")
    return NANO_DIR


def checkpoint_tools(ckpt: str | Path) -> list[dict]:
    """The tool definitions a checkpoint directory declares in ``tools.json`` (none when it has no such file)."""
    path = Path(ckpt) / CHECKPOINT_TOOLS_FILE
    return load_tools(str(path)) if path.is_file() else []


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
    from weights_tools.safe_write import write_text

    data: dict[str, Any] = {"messages": messages}
    if tools:
        data["tools"] = tools
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", force=force, what="--save")


def load_conversation(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read what :func:`save_conversation` wrote (or a bare list of messages): ``(messages, tools)``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatError(f"{path}: cannot read the conversation ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ChatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ChatError(f"{path}: not valid JSON ({e})") from None
    messages, tools = (data, []) if isinstance(data, list) else (data.get("messages"), data.get("tools") or [])
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatError(f"{path}: expected {{'messages': [{{'role': ..., ...}}, ...]}} (OpenAI chat format)")
    return messages, tools


# ---- images ---------------------------------------------------------------------------------------------

def image_part(source: str) -> dict:
    """The OpenAI content part for an image file (what --image adds and --save writes)."""
    return {"type": "image_url", "image_url": {"url": source}}


def image_source(part: dict) -> str:
    """The url/path an image part names: ``image_url.url`` (or ``image_url`` as a string), or ``image``."""
    value = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ChatError(f"an image part must name its image as a string url or path, found {part!r}")
    return value


def message_images(messages: list[dict]) -> list[str]:
    """The image sources of every message, in prompt order (the order of the ``<|media_pad|>`` tokens)."""
    from kimi_ref.chat_template import IMAGE_PART_TYPES

    return [image_source(part) for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES]


def _open_source(source: str) -> str | bytes:
    """A path, a ``file://`` URL or a base64 ``data:`` URL -> what moonvit.load_image reads. No network."""
    import base64
    import binascii
    from urllib.parse import unquote, urlparse

    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ChatError(f"image {source[:40]}...: only base64 data: URLs are supported")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ChatError(f"image {source[:40]}...: the base64 payload is broken ({e})") from None
    if source.startswith("file://"):
        return unquote(urlparse(source).path)
    if "://" in source:
        raise ChatError(f"image {source}: the chat does not download images; save it and pass its path")
    return source


class ImageTable:
    """Every image a session can show, preprocessed once, identically on every rank.

    ``sources`` are the images of the loaded history and the --image files, in that order, duplicates
    once. ``media(indices)`` concatenates the chosen entries into the ``(pixel_values, grid_thws)``
    that :func:`generate.generate` takes; ``indices(sources)`` is rank 0's side of that choice.
    """

    def __init__(self, sources: list[str], ckpt: str | Path) -> None:
        from kimi_ref import moonvit
        from kimi_ref.config import ConfigError, load_media_config

        self.sources = list(dict.fromkeys(sources))
        self.entries: list[tuple[torch.Tensor, tuple[int, int, int]]] = []
        if not self.sources:
            return
        try:
            media_config = load_media_config(ckpt)
        except ConfigError as e:
            raise ChatError(f"images: {e}") from None
        for source in self.sources:
            try:
                self.entries.append(moonvit.preprocess(moonvit.load_image(_open_source(source), "image"), media_config))
            except (FileNotFoundError, ValueError, TypeError) as e:
                raise ChatError(str(e)) from None

    def indices(self, sources: list[str]) -> list[int]:
        return [self.sources.index(s) for s in sources]

    def media(self, indices: list[int]) -> Media | None:
        if not indices:
            return None
        return (torch.cat([self.entries[i][0] for i in indices]), [self.entries[i][1] for i in indices])


def _check_vision(config: Any, ckpt: str | Path, what: str) -> None:
    if config.vision is None:
        raise ChatError(f"{what}: the checkpoint {ckpt} has no vision tower (its config.json has no vision_config; "
                        "a text-only layout such as K2-Instruct/K2-Thinking), so it cannot read images")


# ---- the session on rank 0 ------------------------------------------------------------------------------

_GENERATE, _EXIT = 1, 0


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
    setup: Any = None  # the checkpoint's ChatSetup (template, proof, sampling); None: kimi_ref's `variant` template


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
        self.out, self.inp = out or sys.stdout, inp or sys.stdin
        self.printer = _Printer(self.out)
        self.stop_ids = stop_ids_for(tokenizer, model.config)
        if settings.setup is not None:  # generation_config.json's eos ids stop an answer too
            self.stop_ids += tuple(i for i in settings.setup.sampling.eos_token_ids if i not in self.stop_ids)
        self.end_think = tokenizer.special_tokens.get("</think>")
        self.open_think = tokenizer.special_tokens.get("<think>")
        self.generator = make_generator(settings.seed)
        self.images = images if images is not None else ImageTable(_session_images(settings), settings.ckpt)
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
        from kimi_ref.chat_template import render_ids

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
        from kimi_ref.chat_template import ChatTemplateError
        from kimi_ref.tool_parsing import StreamParser

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
        _command(self.tp, self.device, _GENERATE, budget)
        send_ids(ids, self.tp, self.device)
        send_ids(chosen, self.tp, self.device)
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
        from weights_tools.safe_write import OutputError

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


def _command(tp: TP, device: str, command: int, argument: int = 0) -> tuple[int, int]:
    """Rank 0 tells every rank what comes next: (_GENERATE, max_new_tokens) or (_EXIT, 0)."""
    message = torch.tensor([command, argument], dtype=torch.long, device=device)
    parallel.broadcast(message, tp)
    return int(message[0]), int(message[1])


def _follow(model: Any, tp: TP, device: str, images: ImageTable) -> None:
    """Ranks 1..N-1: generate whenever rank 0 says so, with the prompt and images it names, until it says exit."""
    while True:
        command, max_new_tokens = _command(tp, device, -1)
        if command == _EXIT:
            return
        ids = receive_ids(None, tp, device)
        media = images.media(receive_ids(None, tp, device))  # indices into this rank's own ImageTable
        generate(model, ids, max_new_tokens=max_new_tokens, tp=tp, media=media)  # sampling settings: rank 0's alone


def _session_images(s: Settings) -> list[str]:
    """Every image a session may show: the loaded history's, then the --image files."""
    return message_images(s.history) + list(s.images)


def _rank_main(tp: TP, device: str, s: Settings) -> int:
    """What every rank runs: load this rank's slices, then lead (rank 0) or follow."""
    from kimi_ref.checkpoint import load_model
    from kimi_ref.tokenizer import Tokenizer

    if device == "cpu":  # before the first op: kimi-nano's matrices are too small to share between cores
        torch.set_num_threads(s.threads)
    model = load_model(s.ckpt, device=device, dtype=s.dtype, tp=tp, backend=s.backend,
                       progress=tp.rank == 0 and sys.stderr.isatty())
    images = ImageTable(_session_images(s), s.ckpt)  # the same files, the same pixels, on every rank
    if tp.rank != 0:
        _follow(model, tp, device, images)
        return 0
    session = Session(model, Tokenizer.from_pretrained(s.ckpt), s, tp, device, images=images)
    try:
        if s.prompt is not None:
            ok = session.user_turn(s.prompt)
            if session.interrupted:
                print("(interrupted)", file=sys.stderr)
                return 130
            return 1 if session.save_failed else 0 if ok else 2
        session.repl()
        return 1 if session.save_failed else 0
    finally:
        _command(tp, device, _EXIT)


# ---- the command line -------------------------------------------------------------------------------------

def add_shared_flags(p: argparse.ArgumentParser, *, tp_help: str, for_what: str = "") -> None:
    """The flags the chat and the server share, meaning the same in both (checked by check_shared_flags;
    None = the checkpoint decides). ``for_what`` says whose defaults the sampling flags are, if not the chat's."""
    p.add_argument("--ckpt", help="checkpoint directory (default: kimi-nano, shipped in the package)")
    p.add_argument("--tp", type=int, default=1, help=tp_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype of the dense weights (default: the config's)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"], help="kernels (default torch)")
    p.add_argument("--variant", default=None,
                   help="chat template variant (default: the checkpoint's, from its chat_template.jinja or the "
                        "variant its tokenizer_config.json records)")
    prefix = f"{for_what}; " if for_what else ""
    p.add_argument("--temperature", type=float, default=None,
                   help=f"{prefix}0 = greedy (default: generation_config.json's, else {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"{prefix}nucleus mass (default: generation_config.json's, else {DEFAULT_TOP_P})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"{for_what or 'per generation'} (default: generation_config.json's, else {DEFAULT_MAX_NEW_TOKENS})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimi_ref.chat", description="Chat with a Kimi K2.x checkpoint.")
    add_shared_flags(p, tp_help="tensor-parallel ranks; started here (or by torchrun)")
    p.add_argument("--template", default="kimi_ref", choices=["kimi_ref", "checkpoint"],
                   help="kimi_ref (default): kimi_ref's template, proven equal to the checkpoint's own at start; "
                        "checkpoint: render with the checkpoint's chat template through jinja2")
    p.add_argument("--prompt", help="one message, answer, exit (no REPL)")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the first user message (repeatable; K2.5+ checkpoints with a vision tower)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tools", help="'demo' (calculator, current_time) or a JSON file of OpenAI tool definitions "
                   "(default: the checkpoint's tools.json, if it has one)")
    p.add_argument("--max-tool-rounds", type=int, default=8, help="tool round trips per user message")
    p.add_argument("--save", help="write the conversation here (OpenAI format) after every turn; a new file, "
                   "or the --load file, unless --force")
    p.add_argument("--force", action="store_true", help="let --save replace an existing file")
    p.add_argument("--load", help="continue a conversation written by --save")
    p.add_argument("--no-timings", action="store_true", help="omit the per-turn token counts and speed")
    # 1: kimi-nano's 128-wide matrices gain nothing from a second core, and on a busy machine two threads
    # made decode swing between 2 and 130 tok/s (one answer 4-41 s; one thread: a steady 4-5 s).
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per rank (default 1; raise it for a large checkpoint on CPU)")
    return p


def check_shared_flags(args: argparse.Namespace) -> None:
    """The flags the chat and the server share: a known --variant, a sampling pair generate accepts."""
    from kimi_ref.chat_template import VARIANTS

    if args.variant is not None and args.variant not in VARIANTS:
        raise ChatError(f"--variant {args.variant!r}: expected one of {', '.join(VARIANTS)}")
    try:
        check_sampling(DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                       DEFAULT_TOP_P if args.top_p is None else args.top_p)
    except ValueError as e:
        raise ChatError(f"--temperature / --top-p: {e}") from None


def open_checkpoint(ckpt: Path, tp: int):
    """The checkpoint the chat (or the server) will run, checked before any rank starts: the directory, its
    config and tokenizer files, every shard's header, and that ``tp`` divides the model."""
    from kimi_ref.checkpoint import Checkpoint

    if not ckpt.exists():
        raise ChatError(f"--ckpt {ckpt}: no such directory")
    if not (ckpt / "config.json").is_file():
        raise ChatError(f"--ckpt {ckpt}: no config.json there (is it a checkpoint directory?)")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        if not (ckpt / name).is_file():
            raise ChatError(f"--ckpt {ckpt}: no {name} there (the tokenizer ships with the checkpoint)")
    checkpoint = Checkpoint.open(ckpt)
    checkpoint.raise_if_problems()
    parallel.validate_tp(checkpoint.config, tp)
    return checkpoint


def _settings(args: argparse.Namespace) -> tuple[Settings, int]:
    """Check everything that can be checked before any rank starts; refusals raise."""
    from kimi_ref.launch import check_device, torchrun_env

    if args.tp < 1:
        raise ChatError(f"--tp must be at least 1, found {args.tp}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, found {args.max_new_tokens}")
    if args.max_tool_rounds < 0:
        raise ChatError(f"--max-tool-rounds must be at least 0, found {args.max_tool_rounds}")
    if args.threads < 1:
        raise ChatError(f"--threads must be at least 1, found {args.threads}")
    check_shared_flags(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, args.tp)
    if args.ckpt is None:
        ckpt = default_checkpoint()
        if (torchrun_env() or (0,))[0] == 0:  # under torchrun, say it once
            print(f"(no --ckpt: kimi-nano, the miniature Kimi shipped in the package, {ckpt})", file=sys.stderr)
    else:
        ckpt = Path(args.ckpt)
    checkpoint = open_checkpoint(ckpt, args.tp)
    setup, sampling, said = resolve_chat_setup(args, ckpt, checkpoint.config)
    variant = setup.variant
    # Without --tools, a checkpoint's own tools.json (kimi-nano: the calculator it was trained to call).
    tools = load_tools(args.tools) if args.tools else checkpoint_tools(ckpt)
    history: list[dict] = []
    if args.load:
        history, saved_tools = load_conversation(args.load)
        tools = tools or saved_tools
    if args.save:  # now, not after the first answer: a refused --save must not cost a conversation
        from weights_tools.safe_write import OutputError, check_file

        same = bool(args.load) and Path(args.load).resolve() == Path(args.save).resolve()
        try:
            check_file(args.save, force=args.force, protect=[ckpt], what="--save", allow_existing=same)
        except OutputError as e:
            raise ChatError(str(e)) from None
    images = [str(Path(p).expanduser().absolute()) for p in args.image]
    if images:
        _check_vision(checkpoint.config, ckpt, "--image")
    if message_images(history):
        _check_vision(checkpoint.config, ckpt, f"--load {args.load} (its messages hold images)")
    table = ImageTable(message_images(history) + images, ckpt)  # refuses missing / unreadable files now
    if args.prompt is not None:
        from kimi_ref.chat_template import ChatTemplateError
        from kimi_ref.tokenizer import Tokenizer

        messages = history + ([{"role": "system", "content": args.system}] if args.system and not history else [])
        content: str | list[dict] = args.prompt
        if images:
            content = [image_part(s) for s in images] + [{"type": "text", "text": args.prompt}]
        messages = messages + [{"role": "user", "content": content}]
        preserve = True if variant in VARIANTS_WITH_PRESERVE else None
        try:
            ids = setup.render_ids(messages, Tokenizer.from_pretrained(ckpt), tools=tools or None,
                                   preserve_thinking=preserve)
        except ChatTemplateError as e:
            raise ChatError(f"--prompt: {e}") from None
        try:
            n = expanded_length(ids, table.media(table.indices(message_images(messages))), checkpoint.config)
        except ValueError as e:
            raise ChatError(str(e)) from None
        check_context(n, checkpoint.config.max_position_embeddings)
        if setup.sampling.max_length is not None and n >= setup.sampling.max_length:
            raise ContextError(f"the prompt is {n} tokens, but generation_config.json's max_length is "
                               f"{setup.sampling.max_length} (prompt and answer together)")
    settings = Settings(ckpt=str(ckpt), device=device, dtype=args.dtype, backend=args.backend, variant=variant,
                        temperature=sampling[0], top_p=sampling[1], max_new_tokens=sampling[2],
                        seed=args.seed, prompt=args.prompt, system=args.system, tools=tools, images=images,
                        history=history, save=args.save, force=args.force, max_tool_rounds=args.max_tool_rounds,
                        timings=not args.no_timings, threads=args.threads, setup=setup)
    if (torchrun_env() or (0,))[0] == 0:  # once everything is accepted; under torchrun, once
        for line in said:
            print(line, file=sys.stderr)
    return settings, args.tp


def resolve_chat_setup(args: argparse.Namespace, ckpt: Path, config: Any) -> tuple[Any, tuple[float, float, int], list[str]]:
    """The checkpoint's ChatSetup, the (temperature, top_p, max_new_tokens) to use, and the lines saying so.

    ``args`` carries the flags the chat and the server share (variant, template, temperature, top_p,
    max_new_tokens; None = the checkpoint decides)."""
    from kimi_ref.checkpoint_chat import K27_CODE_SAMPLING, ChatSetupError, chat_setup

    try:
        setup = chat_setup(ckpt, args.variant, args.template, layout=config.layout)
    except ChatSetupError as e:
        if e.details:  # the proof's diff, above the one-line error
            print(e.details, file=sys.stderr)
        raise ChatError(str(e)) from None
    s = setup.sampling
    temperature = s.temperature if args.temperature is None else args.temperature
    top_p = s.top_p if args.top_p is None else args.top_p
    max_new = s.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    try:
        check_sampling(temperature, top_p)
    except ValueError as e:
        raise ChatError(f"{s.sources.get('temperature')} / {s.sources.get('top_p')}: {e}") from None
    def said(name: str, value: Any, flag: str) -> str:
        return f"{value} ({'--' + flag if getattr(args, flag.replace('-', '_')) is not None else s.sources[name]})"

    lines = [f"({line})" for line in setup.describe().splitlines()]
    extra = "".join(f"; {k} {v} ({s.sources[k]})" for k, v in
                    (("max_length", s.max_length), ("eos_token_id", list(s.eos_token_ids))) if k in s.sources)
    lines.append(f"(sampling: temperature {said('temperature', temperature, 'temperature')}, top-p "
                 f"{said('top_p', top_p, 'top-p')}, max new tokens {said('max_new_tokens', max_new, 'max-new-tokens')}"
                 f"{extra})")
    lines += [f"note: {note}" for note in setup.notes]
    overridden = (args.temperature is not None and temperature != K27_CODE_SAMPLING[0]) or \
        (args.top_p is not None and top_p != K27_CODE_SAMPLING[1])
    if setup.variant == "k2.7-code" and overridden:  # the user's choice, not the checkpoint's own file
        lines.append(f"note: K2.7-Code was trained for temperature {K27_CODE_SAMPLING[0]} and top-p "
                     f"{K27_CODE_SAMPLING[1]} (thinking on, earlier reasoning kept); temperature {temperature}, "
                     f"top-p {top_p} is not what it was trained for")
    return setup, (temperature, top_p, max_new), lines


def main(argv: list[str] | None = None) -> int:
    from kimi_ref.checkpoint import CheckpointError
    from kimi_ref.config import ConfigError
    from kimi_ref.launch import LaunchError, launch
    from kimi_ref.tokenizer import TokenizerError

    args = _parser().parse_args(argv)
    try:
        settings, world_size = _settings(args)
    except (ChatError, ContextError, TPError, LaunchError, CheckpointError, ConfigError, TokenizerError, OSError) as e:
        print(f"kimi_ref.chat: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkimi_ref.chat: interrupted", file=sys.stderr)
        return 130
    # By module name, so spawned ranks find it even when this file runs as __main__.
    rank_main = importlib.import_module("kimi_ref.chat")._rank_main
    try:
        return launch(rank_main, world_size, settings.device, settings)
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
