"""What the checkpoint decides about chatting: the template variant, the special-token ids, the sampling.

:func:`chat_setup` reads a checkpoint directory's own files and returns a :class:`ChatSetup`; the chat
CLI and ``python -m weights_tools.verify`` both use it. Which file decides what (docs/checkpoint_format.md,
"Which file decides what"):

================================  ===========================================================================
the chat template                 ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
                                  (HF's order); its fingerprint (:func:`fingerprint`) names the variant
the variant, without a template   ``tokenizer_config.json``'s ``kimi_ref_chat_variant`` (written by make_tiny
                                  and train_nano); nothing else: without either, ``--variant`` must say it
a consistency check               ``config.json``'s layout: K2.5, K2.6, K2.7-Code are ``kimi_k25``;
                                  K2-Thinking and K2-Instruct are flat (``kimi_k2`` / ``deepseek_v3``)
special-token ids                 ``tokenizer_config.json``'s ``added_tokens_decoder`` must agree with
                                  ``kimi_ref.tokenizer.KIMI_SPECIAL_TOKENS`` (offsets from the BPE ranks)
sampling and stop ids             ``generation_config.json`` (``temperature``, ``top_p``, ``do_sample``,
                                  ``eos_token_id``, ``max_length``, ``max_new_tokens``); K2.7-Code's fixed
                                  1.0 / 0.95 where it says nothing
================================  ===========================================================================

The template is then proven (:mod:`kimi_ref.template_proof`): kimi_ref's rendering must equal the
checkpoint's, byte for byte, or the setup is refused -- unless the caller asks to render with the
checkpoint's own template (``template="checkpoint"``), which needs jinja2.

Facts (docs/sources.md): the special-token layout §8; the templates and K2.7-Code's fixed settings §9; why
K2.6 / K2.7-Code templates and ``generation_config.json`` must come from the checkpoint §12.2, §12.4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kimi_ref.chat_template import VARIANTS, ChatTemplateError, render, render_ids
from kimi_ref.config import load_config, read_json
from kimi_ref.generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from kimi_ref.tokenizer import KIMI_SPECIAL_TOKENS, load_ranks
from kimi_ref.template_proof import TemplateMismatch, compile_template, jinja_available, prove, render_with_template

__all__ = ["ChatSetupError", "VariantUnknown", "ChatSetup", "Sampling", "VARIANT_FIELD", "TEMPLATE_MODES", "K27_CODE_SAMPLING",
           "chat_setup", "fingerprint", "read_template", "check_special_tokens", "read_generation_config",
           "required_tokens"]

VARIANT_FIELD = "kimi_ref_chat_variant"   # tokenizer_config.json: the variant of a checkpoint without a template
TEMPLATE_MODES = ("kimi_ref", "checkpoint")
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
FLAT_VARIANTS = ("k2-thinking", "k2-instruct")
# K2.7-Code's fixed settings (its model card; the vLLM recipe agrees): thinking and preserved reasoning
# always on, temperature 1.0, top-p 0.95.
K27_CODE_SAMPLING = (1.0, 0.95)


class ChatSetupError(ValueError):
    """A checkpoint file contradicts kimi_ref or itself (named, with what was found and what was expected).
    ``details``: more lines for a person (the template proof's diff), beside the one-line message."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class VariantUnknown(ChatSetupError):
    """The checkpoint does not say which template it uses (none shipped, none recorded, or unrecognised)."""


# ---------------------------------------------------------------------------------------------------
# The chat template and its fingerprint
# ---------------------------------------------------------------------------------------------------
def read_template(ckpt: str | Path) -> tuple[str | None, str | None]:
    """(template source, where it came from) or (None, None): ``chat_template.jinja`` first, then the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or HF's list of named templates: "default")."""
    ckpt = Path(ckpt)
    path = ckpt / TEMPLATE_FILE
    if path.is_file():
        try:
            # Text mode, as HF opens it: universal newlines, so a CRLF file renders as its LF twin.
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ChatSetupError(f"{path}: cannot read the chat template ({e})") from None
    config = _tokenizer_config(ckpt)
    value = config.get("chat_template")
    where = f"{ckpt / TOKENIZER_CONFIG} (chat_template)"
    if value is None:
        return None, None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if value is None:
            raise ChatSetupError(f"{where}: a list of templates without one named 'default' "
                                 f"(names: {sorted(map(str, named))})")
    if not isinstance(value, str):
        raise ChatSetupError(f"{where}: expected the template as a string, found {type(value).__name__}")
    return value, where


_THINKING_SWITCH = re.compile(r"(?<![\w.])thinking\s+is\s+(?:defined|false)")
_PRESERVE_DEFAULT_OFF = re.compile(r"preserve_thinking\s*\|\s*default\(\s*false\s*\)")


def fingerprint(source: str) -> tuple[str | None, str]:
    """(variant or None, why): which Kimi template ``source`` is, from a few markers.

    ==============================================================  ============
    markers                                                         variant
    ==============================================================  ============
    no ``<think>``                                                  k2-instruct
    ``<think>``, no ``tools_ts_str``                                k2-thinking
    ``tools_ts_str``, no ``preserve_thinking``                      k2.5
    ``preserve_thinking | default(false)`` and a ``thinking`` test  k2.6
    ``preserve_thinking`` not defaulting to false, or no way to     k2.7-code
    switch thinking off (both forced on, as K2.7-Code's card says)
    ==============================================================  ============

    Every Kimi template writes ``<|im_middle|>``; one that does not is not recognised (None).
    """
    if "<|im_middle|>" not in source or "<|im_end|>" not in source:
        return None, "it writes no <|im_middle|> / <|im_end|>, so it is not a Kimi K2 template"
    if "<think>" not in source:
        return "k2-instruct", "no <think> blocks (K2-Instruct)"
    if "tools_ts_str" not in source:
        return "k2-thinking", "<think> blocks, tools declared as JSON (K2-Thinking)"
    if "preserve_thinking" not in source:
        return "k2.5", "TypeScript tool declarations (tools_ts_str), no preserve_thinking flag (K2.5)"
    if _PRESERVE_DEFAULT_OFF.search(source) and _THINKING_SWITCH.search(source):
        return "k2.6", "a preserve_thinking flag that defaults to false, thinking can be switched off (K2.6)"
    return "k2.7-code", ("preserve_thinking and thinking cannot both be switched off "
                         "(forced on: K2.7-Code)")


# ---------------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------------
def required_tokens(variant: str) -> set[str]:
    """The special tokens ``variant``'s template writes as control tokens (they must be in the table)."""
    base = {"<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
            "<|media_content|>", "<|media_pad|>", "<|media_end|>"}
    if variant != "k2-instruct":
        base |= {"<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                 "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"}
    if variant not in FLAT_VARIANTS:
        base.add("<|media_begin|>")
    return base


def check_special_tokens(ckpt: str | Path, variant: str | None = None) -> list[str]:
    """Every disagreement between ``tokenizer_config.json``'s ``added_tokens_decoder`` and kimi_ref's
    special-token table (names at ``len(ranks) + offset``); ``variant``: also each token its template
    needs that the file lacks. Each problem names the token and both ids.

    The ``special`` flags are not compared: they only decide what HF's ``decode(skip_special_tokens=True)``
    drops, and kimi_ref never drops tokens when decoding."""
    ckpt = Path(ckpt)
    where = ckpt / TOKENIZER_CONFIG
    config = _tokenizer_config(ckpt)
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return [] if variant is None else [f"{where}: no added_tokens_decoder; kimi_ref's special tokens cannot "
                                           "be checked against it"]
    if not isinstance(decoder, dict):
        return [f"{where}: added_tokens_decoder must be an object {{id: {{'content': name}}}}, "
                f"found {type(decoder).__name__}"]
    try:
        n_ranks = len(load_ranks(ckpt / "tiktoken.model"))
    except Exception as e:  # noqa: BLE001 - any unreadable rank file is reported, not raised
        return [f"{ckpt / 'tiktoken.model'}: cannot count the BPE ranks ({e})"]
    expected = {name: n_ranks + offset for offset, (name, _) in KIMI_SPECIAL_TOKENS.items()}
    by_id = {n_ranks + offset: name for offset, (name, _) in KIMI_SPECIAL_TOKENS.items()}
    problems, found = [], {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not isinstance(content, str):
            problems.append(f"{where}: added_tokens_decoder[{key!r}] must map an integer id to {{'content': name}}, "
                            f"found {entry!r}")
            continue
        token_id = int(key)
        found[content] = token_id
        if content in expected and token_id != expected[content]:
            problems.append(f"{where}: special token {content!r} has id {token_id}, but kimi_ref's table puts it at "
                            f"{expected[content]} ({n_ranks} BPE ranks + {expected[content] - n_ranks})")
        elif content not in expected and token_id in by_id:
            problems.append(f"{where}: id {token_id} is named {content!r}, but kimi_ref's table has "
                            f"{by_id[token_id]!r} there")
    if variant is not None:
        for name in sorted(required_tokens(variant) - set(found)):
            problems.append(f"{where}: the {variant} template needs the special token {name!r} (kimi_ref's id "
                            f"{expected[name]}), which added_tokens_decoder does not name")
    return problems


# ---------------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """The chat's defaults and where each came from (``sources``: setting -> file or rule)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None          # prompt + answer, in tokens (HF's max_length)
    eos_token_ids: tuple[int, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)


def read_generation_config(ckpt: str | Path) -> dict[str, Any]:
    """The checked values of ``generation_config.json`` that kimi_ref uses ({} when there is no such file)."""
    path = Path(ckpt) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    data = _json_object(path)
    out: dict[str, Any] = {}

    def number(key: str, ok: Any, expected: str) -> None:
        if data.get(key) is None:
            return
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ChatSetupError(f"{path}: {key} must be {expected}, found {value!r}")
        out[key] = value

    number("temperature", lambda v: 0 <= v < float("inf"), "a number >= 0")
    number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    number("max_length", lambda v: isinstance(v, int) and v > 1, "an integer > 1")
    number("max_new_tokens", lambda v: isinstance(v, int) and v > 0, "an integer > 0")
    if data.get("do_sample") is not None:
        if not isinstance(data["do_sample"], bool):
            raise ChatSetupError(f"{path}: do_sample must be true or false, found {data['do_sample']!r}")
        out["do_sample"] = data["do_sample"]
    eos = data.get("eos_token_id")
    if eos is not None:
        ids = [eos] if not isinstance(eos, list) else eos
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ChatSetupError(f"{path}: eos_token_id must be a token id or a non-empty list of ids, found {eos!r}")
        out["eos_token_id"] = tuple(ids)
    return out


def _sampling(ckpt: Path, variant: str) -> Sampling:
    values = read_generation_config(ckpt)
    where = str(ckpt / GENERATION_CONFIG)
    temperature, top_p = (K27_CODE_SAMPLING if variant == "k2.7-code" else (DEFAULT_TEMPERATURE, DEFAULT_TOP_P))
    rule = "K2.7-Code's fixed settings" if variant == "k2.7-code" else "kimi_ref's default"
    sources = {"temperature": rule, "top_p": rule, "max_new_tokens": "kimi_ref's default"}
    if "temperature" in values:
        temperature, sources["temperature"] = float(values["temperature"]), where
    if values.get("do_sample") is False:  # HF: no sampling means greedy, whatever the temperature says
        temperature, sources["temperature"] = 0.0, f"{where} (do_sample false: greedy)"
    if "top_p" in values:
        top_p, sources["top_p"] = float(values["top_p"]), where
    max_new = values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if "max_new_tokens" in values:
        sources["max_new_tokens"] = where
    if "max_length" in values:
        sources["max_length"] = where
    if "eos_token_id" in values:
        sources["eos_token_id"] = where
    return Sampling(temperature, top_p, max_new, values.get("max_length"), values.get("eos_token_id", ()), sources)


# ---------------------------------------------------------------------------------------------------
# The whole decision
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatSetup:
    """How to chat with one checkpoint: the variant and why, which template renders, what the proof said."""

    variant: str
    reason: str                       # why this variant (which file said so)
    template: str                     # "kimi_ref" or "checkpoint"
    proof: str                        # what the load-time proof did (equal on N renderings / skipped, why)
    sampling: Sampling
    template_source: str | None = None
    template_where: str | None = None
    notes: tuple[str, ...] = ()

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, *,
               thinking: bool = True, preserve_thinking: bool | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, by kimi_ref's template or (``template="checkpoint"``) the checkpoint's own."""
        if self.template == "checkpoint":
            return render_with_template(_compiled(self.template_source, self.template_where), messages, tools,
                                        thinking=thinking, preserve_thinking=preserve_thinking,
                                        add_generation_prompt=add_generation_prompt, where=str(self.template_where))
        return render(messages, tools, variant=self.variant, thinking=thinking, preserve_thinking=preserve_thinking,
                      add_generation_prompt=add_generation_prompt)

    def render_ids(self, messages: Sequence[Mapping[str, Any]], tokenizer: Any,
                   tools: Sequence[Mapping[str, Any]] | None = None, *, thinking: bool = True,
                   preserve_thinking: bool | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The prompt as ids. With the checkpoint's template the text is encoded with special tokens allowed
        (as HF does), so message text holding a special-token string is refused rather than turned into one."""
        if self.template != "checkpoint":
            return render_ids(messages, tokenizer, tools, variant=self.variant, thinking=thinking,
                              preserve_thinking=preserve_thinking, add_generation_prompt=add_generation_prompt)
        _refuse_forged_tokens({"messages": list(messages), "tools": list(tools or [])}, tokenizer.special_tokens)
        text = self.render(messages, tools, thinking=thinking, preserve_thinking=preserve_thinking,
                           add_generation_prompt=add_generation_prompt)
        return tokenizer.encode(text, allow_special=True)

    def describe(self) -> str:
        """Two or three lines for a person: the variant and why, the template and its proof."""
        by = ("kimi_ref's template" if self.template == "kimi_ref"
              else f"the checkpoint's own template ({self.template_where}) through jinja2")
        return f"variant {self.variant}: {self.reason}\nprompts rendered by {by}; {self.proof}"


def chat_setup(ckpt: str | Path, variant: str | None = None, template: str = "kimi_ref", *,
               layout: str | None = None) -> ChatSetup:
    """Decide the variant (``variant`` overrides the checkpoint), check the special tokens, prove the
    template, read the sampling defaults. Raises :class:`ChatSetupError` naming the file and field.

    ``layout`` is ``config.json``'s (``"kimi_k25"`` or ``"flat"``); it is read when not given.
    """
    ckpt = Path(ckpt)
    if template not in TEMPLATE_MODES:
        raise ChatSetupError(f"template must be one of {', '.join(TEMPLATE_MODES)}, found {template!r}")
    if variant is not None and variant not in VARIANTS:
        raise ChatSetupError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    source, where = read_template(ckpt)
    # --variant is the user saying what the model is: the layout check is theirs to skip.
    detected, why = _detect(ckpt, source, where, None if variant is not None else layout, check_layout=variant is None)
    notes: list[str] = []
    if variant is None:
        if detected is None:
            raise VariantUnknown(f"{ckpt}: cannot tell which Kimi template this checkpoint uses: {why}; "
                                 f"pass --variant ({', '.join(VARIANTS)})"
                                 + ("" if source is None else " and --template checkpoint to render with its own"))
        chosen, reason = detected, why
    else:
        chosen, reason = variant, "chosen by --variant"
        if detected is not None and detected != variant:
            reason += f" (the checkpoint says {detected}: {why})"
            if detected == "k2.7-code":
                notes.append(f"the checkpoint is K2.7-Code, trained with thinking on and earlier reasoning kept; "
                             f"--variant {variant} writes prompts it was not trained on")
        elif detected is None:
            reason += f" (the checkpoint does not say: {why})"

    problems = check_special_tokens(ckpt, chosen) if (ckpt / TOKENIZER_CONFIG).is_file() else []
    if problems:
        raise ChatSetupError("; ".join(problems))

    if template == "checkpoint":
        if source is None:
            raise ChatSetupError(f"--template checkpoint: {ckpt} ships no chat template ({TEMPLATE_FILE} or "
                                 f"{TOKENIZER_CONFIG}'s chat_template)")

        if not jinja_available():
            raise ChatSetupError("--template checkpoint renders through jinja2, an optional extra: "
                                 "pip install 'kimi-ref[template]'")
        try:
            _compiled(source, where)  # a syntax error is refused now, not at the first prompt
        except ChatTemplateError as e:
            raise ChatSetupError(f"--template checkpoint: {e}") from None
        proof = "not compared with kimi_ref's (--template checkpoint)"
    else:
        proof = _prove(source, where, chosen)
    return ChatSetup(chosen, reason, template, proof, _sampling(ckpt, chosen), source, where, tuple(notes))


def _detect(ckpt: Path, source: str | None, where: str | None, layout: str | None,
            check_layout: bool = True) -> tuple[str | None, str]:
    recorded = _tokenizer_config(ckpt).get(VARIANT_FIELD)
    if recorded is not None and recorded not in VARIANTS:
        raise ChatSetupError(f"{ckpt / TOKENIZER_CONFIG}: {VARIANT_FIELD} {recorded!r} is not one of "
                             f"{', '.join(VARIANTS)}")
    if source is not None:
        variant, why = fingerprint(source)
        shown = TEMPLATE_FILE if str(where).endswith(TEMPLATE_FILE) else f"{TOKENIZER_CONFIG} (chat_template)"
        why = f"{shown}: {why}"
        if variant is not None and recorded is not None and recorded != variant:
            raise ChatSetupError(f"{ckpt / TOKENIZER_CONFIG} says {VARIANT_FIELD} {recorded!r}, but {where} is a "
                                 f"{variant} template ({why}); one of the two files is wrong")
    elif recorded is not None:
        variant, why = recorded, f"{TOKENIZER_CONFIG}: {VARIANT_FIELD} = {recorded!r}"
    else:
        return None, f"it ships no chat template ({TEMPLATE_FILE}, or {TOKENIZER_CONFIG}'s chat_template) and no {VARIANT_FIELD}"
    if variant is None:
        return None, f"{where}: an unrecognised template ({why.split(': ', 1)[-1]})"
    if not check_layout:
        return variant, why
    if layout is None and (ckpt / "config.json").is_file():
        layout = load_config(ckpt).layout
    if layout is not None and (layout == "flat") != (variant in FLAT_VARIANTS):
        expected = "flat (model_type kimi_k2 / deepseek_v3)" if variant in FLAT_VARIANTS else "kimi_k25"
        raise ChatSetupError(f"{ckpt / 'config.json'} has the {layout} layout, but the chat template says {variant} "
                             f"({why}), whose checkpoints are {expected}; pass --variant if this is intended")
    return variant, why


def _prove(source: str | None, where: str | None, variant: str) -> str:
    if source is None:
        return "no template in the checkpoint to prove it against"
    if not jinja_available():
        return "the load-time check against the checkpoint's template was skipped: jinja2 is not installed " \
               "(pip install 'kimi-ref[template]')"
    try:
        return f"proven: {prove(source, variant, str(where))}"
    except TemplateMismatch as e:
        raise ChatSetupError(f"{e} (use --template checkpoint to render with the checkpoint's own template)",
                             e.diff) from None
    except ChatTemplateError as e:  # the template does not compile or render: nothing to compare
        raise ChatSetupError(str(e)) from None


_COMPILED: dict[str, Any] = {}


def _compiled(source: str | None, where: str | None) -> Any:
    assert source is not None
    if source not in _COMPILED:
        _COMPILED[source] = compile_template(source, str(where))
    return _COMPILED[source]


def _refuse_forged_tokens(value: Any, specials: Mapping[str, int], where: str = "") -> None:
    if isinstance(value, str):
        for name in specials:
            if name in value:
                raise ChatTemplateError(f"{where or 'the conversation'} holds the text {name!r}; rendered by the "
                                        "checkpoint's template and encoded as HF does, it would become that special "
                                        "token, so the turn is refused (kimi_ref's own template keeps it text)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_forged_tokens(item, specials, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_forged_tokens(item, specials, f"{where}[{i}]")


def _json_object(path: Path) -> dict:
    data = read_json(path, ChatSetupError)
    if not isinstance(data, dict):
        raise ChatSetupError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _tokenizer_config(ckpt: Path) -> dict:
    path = ckpt / TOKENIZER_CONFIG
    return _json_object(path) if path.is_file() else {}
