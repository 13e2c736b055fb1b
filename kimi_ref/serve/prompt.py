"""A checked request -> what one generation needs: prompt ids, images, the token budget, sampling, stops.

Everything here can refuse the request with a 400 that names the field (a :class:`RequestError`),
and all of it happens before the request joins the queue, so a bad request never waits behind others:

* the template renders the conversation as the server's ``--variant`` writes it: K2.7-Code always
  thinks and always keeps earlier turns' reasoning (``preserve_thinking`` forced on); K2.6 keeps it
  only when ``chat_template_kwargs.preserve_thinking`` says so; ``thinking`` can be switched off
  only where the template has the switch (K2.5, K2.6);
* tools are declared only with ``tool_choice: "auto"``. With ``"none"`` (or no tools) nothing is
  declared, and ``<|tool_calls_section_begin|>`` becomes a stop token: a model that starts a call
  anyway ends its answer there, with what it wrote before;
* each ``image_url`` part is decoded and preprocessed here (MoonViT's resize and patches): a base64
  ``data:`` URL, or a local file under ``--allowed-local-media-path``. A remote URL is never fetched;
* the prompt (each image counted as its rows) must leave room for one new token in ``--max-model-len``,
  and a ``max_tokens`` that does not fit beside the prompt is refused, as OpenAI does. Without
  ``max_tokens`` the answer may run to ``--max-new-tokens`` (512, as the chat's), or to the end of the
  context if that comes first. (Not to the end of the context by default: ``generate`` allocates the KV
  cache for the whole budget up front, which for the real model's 256K context is gigabytes per request.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kimi_ref import moonvit
from kimi_ref.chat_template import ChatTemplateError, render_ids, render_segments
from kimi_ref.config import ConfigError, load_media_config
from kimi_ref.generate import Media, expanded_length, stop_ids_for
from kimi_ref.media import MediaError, open_source
from kimi_ref.serve.requests import RequestError
from kimi_ref.serve.shapes import ChatRequest

__all__ = ["Prepared", "Defaults", "PromptBuilder"]

VARIANT_FORCES_PRESERVE = ("k2.7-code",)


@dataclass
class Defaults:
    """The server's word where a request says nothing (the chat CLI's flags of the same names)."""

    temperature: float
    top_p: float
    max_new_tokens: int | None  # None: up to the end of the context
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's: they end an answer too


@dataclass
class Prepared:
    """One generation, ready to run."""

    ids: list[int]
    media: Media | None
    prompt_tokens: int               # positions the prompt fills, each image's rows counted
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: tuple[int, ...]
    stop: list[str]                  # stop strings, matched in the answer (content) only
    starts_in_reasoning: bool
    stream: bool = False
    include_usage: bool = False


class PromptBuilder:
    """Holds what preparing a request needs from the checkpoint and the server's flags."""

    def __init__(self, tokenizer: Any, config: Any, ckpt: str | Path, variant: str, max_model_len: int,
                 defaults: Defaults, media_dir: str | Path | None = None,
                 context_from: str = "this server's context (--max-model-len)") -> None:
        self.tok, self.config, self.ckpt, self.variant = tokenizer, config, Path(ckpt), variant
        self.max_model_len, self.defaults, self.context_from = max_model_len, defaults, context_from
        self.media_dir = Path(media_dir).resolve() if media_dir is not None else None
        self._media_config: Any = None
        self.section_begin = tokenizer.special_tokens.get("<|tool_calls_section_begin|>")
        self.stop_ids = stop_ids_for(tokenizer, config, defaults.eos_token_ids)  # ignore_eos drops all of them

    def prepare(self, request: ChatRequest) -> Prepared:
        thinking, preserve = self._switches(request)
        tools_on = bool(request.tools) and request.tool_choice == "auto"
        ids = self._render(request, thinking, preserve, tools_on)
        media = self._images(request.messages)
        try:
            length = expanded_length(ids, media, self.config)
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        budget = self._budget(length, request.max_tokens)
        stops = () if request.ignore_eos else self.stop_ids
        if not tools_on and self.section_begin is not None:
            stops = (*stops, self.section_begin)
        return Prepared(ids=ids, media=media, prompt_tokens=length, max_new_tokens=budget,
                        temperature=self.defaults.temperature if request.temperature is None else request.temperature,
                        top_p=self.defaults.top_p if request.top_p is None else request.top_p, seed=request.seed,
                        stop_ids=stops, stop=request.stop, starts_in_reasoning=thinking and self.variant != "k2-instruct",
                        stream=request.stream, include_usage=request.include_usage)

    # ---- the template ----
    def _switches(self, request: ChatRequest) -> tuple[bool, bool | None]:
        thinking = True if request.thinking is None else request.thinking
        preserve = request.preserve_thinking
        if preserve is None and self.variant in VARIANT_FORCES_PRESERVE:
            preserve = True
        try:  # an empty conversation: only the switches are checked
            render_segments([], variant=self.variant, thinking=thinking, preserve_thinking=preserve,
                            add_generation_prompt=False)
        except ChatTemplateError as e:
            which = "preserve_thinking" if "preserve_thinking" in str(e) else "thinking"
            param = f"chat_template_kwargs.{which}"
            raise RequestError(f"{e} (this server renders the {self.variant} template)", param) from None
        return thinking, preserve

    def _render(self, request: ChatRequest, thinking: bool, preserve: bool | None, tools_on: bool) -> list[int]:
        try:
            return render_ids(request.messages, self.tok, tools=request.tools if tools_on else None,
                              variant=self.variant, thinking=thinking, preserve_thinking=preserve,
                              add_generation_prompt=True)
        except ChatTemplateError as e:
            raise RequestError(str(e), "tools" if str(e).startswith("tools") else "messages") from None

    def _budget(self, length: int, max_tokens: int | None) -> int:
        room = self.max_model_len - length
        if room < 1:
            raise RequestError(f"the prompt is {length} tokens, but {self.context_from} is "
                               f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens leave room to "
                               "answer. Shorten the messages.", "messages", code="context_length_exceeded")
        if max_tokens is not None:
            if max_tokens > room:
                raise RequestError(f"{self.context_from} is {self.max_model_len} tokens, but "
                                   f"{length + max_tokens} were asked for ({length} in the messages, {max_tokens} in "
                                   "the completion). Reduce the length of the messages or max_tokens.", "max_tokens",
                                   code="context_length_exceeded")
            return max_tokens
        default = self.defaults.max_new_tokens
        return room if default is None else min(default, room)

    # ---- images ----
    def _images(self, messages: list[dict]) -> Media | None:
        """Every image part, in prompt order (the order of the ``<|media_pad|>`` tokens), preprocessed."""

        pixels: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        for i, message in enumerate(messages):
            if not isinstance(message.get("content"), list):
                continue
            for k, part in enumerate(message["content"]):
                if part.get("type") != "image_url":
                    continue
                where = f"messages[{i}].content[{k}].image_url"
                image = part["image_url"]
                url = image["url"] if isinstance(image, dict) else image
                source = self._open(url, where)
                try:
                    pv, grid = moonvit.preprocess(moonvit.load_image(source, "the image"), self._media(where))
                except (FileNotFoundError, ValueError, TypeError) as e:
                    raise RequestError(f"{where}: {e}", where) from None
                pixels.append(pv)
                grids.append(grid)
        return (torch.cat(pixels), grids) if grids else None

    def _media(self, where: str) -> Any:
        if self.config.vision is None:
            raise RequestError(f"{where}: the served checkpoint has no vision tower (its config.json has no "
                               "vision_config), so it cannot read images", where)
        if self._media_config is None:
            try:
                self._media_config = load_media_config(self.ckpt)
            except ConfigError as e:
                raise RequestError(f"{where}: {e}", where) from None
        return self._media_config

    def _open(self, url: str, where: str) -> bytes | str:
        """A base64 data: URL -> bytes; a local path or file:// URL under the allowed folder -> the path."""
        try:
            source = open_source(url, remote="this server never downloads images; send the image as a base64 "
                                             "data: URL")
        except MediaError as e:
            raise RequestError(f"{where}: {e}", where) from None
        if isinstance(source, bytes):
            return source
        path = Path(source)
        if self.media_dir is None:
            raise RequestError(f"{where}: local image files are off (start the server with "
                               "--allowed-local-media-path DIR to read files under DIR); send a base64 data: URL", where)
        resolved = (self.media_dir / path).resolve()  # a relative path is read under the folder
        if not resolved.is_relative_to(self.media_dir):
            raise RequestError(f"{where}: {path} is outside --allowed-local-media-path {self.media_dir}", where)
        return str(resolved)
