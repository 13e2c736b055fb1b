"""kimi_ref.chat_template: byte-identical to the genuine jinja templates, the TS tool encoder, clear errors.

The oracle is the real thing: ``shared/reference/*/chat_template.jinja`` rendered by jinja2 exactly as HF
does (trim_blocks, lstrip_blocks, loopcontrols, ``tojson`` = ``json.dumps(ensure_ascii=False)``), on
hypothesis-generated conversations. The tokenizer's own step before the template (deep-sorting the tools;
K2.5+: ``tools_ts_str = encode_tools_to_typescript_style(tools)``, None when it raises) is done here too.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_ref.chat_template import (
    VARIANTS, ChatTemplateError, deep_sort, encode_tools_ts, render, render_ids, render_segments,
)
from kimi_ref.tool_declarations import ToolDeclarationError
from chapter_solutions import load_solutions

FIXTURES = Path(__file__).parent / "fixtures" / "tools_ts"
TEMPLATE_DIRS = {"k2.5": "Kimi-K2.5", "k2-thinking": "Kimi-K2-Thinking", "k2-instruct": "Kimi-K2-Instruct"}


# ---------------------------------------------------------------------------------------------------
# The jinja oracle
# ---------------------------------------------------------------------------------------------------
def _hf_tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=None)
def _template(path: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _hf_tojson
    with open(path, encoding="utf-8", newline="") as f:  # newline="": K2-Instruct's CRLF reaches jinja as is
        return env.from_string(f.read())


def jinja_render(reference: Path, variant: str, messages, tools=None, source: str | None = None, **flags) -> str:
    """What HF's ``apply_chat_template(tokenize=False)`` returns for the genuine template of ``variant``."""
    context = dict(messages=messages, add_generation_prompt=flags.pop("add_generation_prompt", True), **flags)
    if tools is not None:
        context["tools"] = deep_sort(tools)
        if variant == "k2.5":
            try:
                context["tools_ts_str"] = encode_tools_ts(context["tools"])
            except ToolDeclarationError:
                context["tools_ts_str"] = None
    if source is not None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _hf_tojson
        return env.from_string(source).render(**context)
    return _template(str(reference / TEMPLATE_DIRS[variant] / "chat_template.jinja")).render(**context)


def ours(messages, tools=None, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the JSON fallback for an unencodable schema warns
        return render(messages, tools, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------------
TRICKY = ["<|im_end|>", "</think>", "<think>", "<|tool_call_end|>", "\r\n", "\n", "{{ x }}", "{% if %}", "None",
          "## Return of", " ", "é中文🙂", ""]
texts = st.one_of(st.text(max_size=12), st.sampled_from(TRICKY))
names = st.one_of(st.just(""), st.sampled_from(["bob", "get_weather", "Kimi", "a b"]), st.text(min_size=1, max_size=6))
call_ids = st.one_of(st.builds(lambda n, i: f"functions.{n}:{i}", st.sampled_from(["get_weather", "a.b-c", "x"]),
                               st.integers(0, 20)), st.text(min_size=1, max_size=10))
json_values = st.one_of(st.none(), st.booleans(), st.integers(-100, 100), st.text(max_size=5))
arguments = st.one_of(texts, st.dictionaries(st.text(max_size=5), json_values, max_size=3))
tool_calls = st.lists(st.builds(lambda i, n, a: {"id": i, "type": "function", "function": {"name": n, "arguments": a}},
                                call_ids, names, arguments), max_size=3)


def parts(video: bool):
    kinds = [st.builds(lambda t: {"type": "text", "text": t}, texts),
             st.just({"type": "image_url", "image_url": {"url": "https://x/y.png"}}), st.just({"type": "image"})]
    if video:
        kinds += [st.just({"type": "video_url", "video_url": {"url": "v.mp4"}}), st.just({"type": "video"})]
    return st.lists(st.one_of(*kinds), max_size=4)


@st.composite
def messages(draw, variant: str):
    family = "instruct" if variant == "k2-instruct" else "thinking" if variant == "k2-thinking" else "k25"
    content = st.one_of(texts, parts(video=family == "k25"))
    maybe_none = content if family == "instruct" else st.one_of(st.none(), content)
    out = []
    for _ in range(draw(st.integers(0, 7))):
        role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
        message = {"role": role, "content": draw(maybe_none if role in ("assistant", "tool") else content)}
        if draw(st.booleans()):
            message["name"] = draw(names)
        if role == "assistant":
            if family != "instruct" and draw(st.booleans()):
                message["reasoning_content"] = draw(texts)
            if family != "instruct" and draw(st.booleans()):
                message["tool_calls"] = draw(tool_calls)
            if draw(st.integers(0, 4)) == 0:
                message["reasoning"] = draw(texts)  # K2.6's key: K2.5 and older templates ignore it
        if role == "tool":
            message["tool_call_id"] = draw(call_ids)
        out.append(message)
    return out


def _fixture_tools(name: str) -> list:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


TOOLSETS = [
    None, [],
    _fixture_tools("01_simple_string"), _fixture_tools("05_two_tools"), _fixture_tools("20_defs_described"),
    _fixture_tools("21_non_function_tools_skipped"), _fixture_tools("27_three_tools_unsorted_keys"),
    [{"type": "builtin_function", "function": {"name": "$web_search"}}],  # nothing to declare: JSON fallback
    [{"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "properties": {
        "x": {"oneOf": [{"type": "string"}]}}}}}],  # the encoder rejects oneOf: JSON fallback
]
toolsets = st.sampled_from(TOOLSETS)


# ---------------------------------------------------------------------------------------------------
# Byte identity with the genuine templates
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=120)
@given(data=st.data())
def test_k25_matches_real_template(reference, data):
    msgs = data.draw(messages("k2.5"))
    tools, thinking, gen = data.draw(toolsets), data.draw(st.booleans()), data.draw(st.booleans())
    expected = jinja_render(reference, "k2.5", msgs, tools, thinking=thinking, add_generation_prompt=gen)
    assert ours(msgs, tools, variant="k2.5", thinking=thinking, add_generation_prompt=gen) == expected


@settings(max_examples=80)
@given(data=st.data())
def test_k2_thinking_matches_real_template(reference, data):
    msgs = data.draw(messages("k2-thinking"))
    tools, gen = data.draw(toolsets), data.draw(st.booleans())
    expected = jinja_render(reference, "k2-thinking", msgs, tools, add_generation_prompt=gen)
    assert ours(msgs, tools, variant="k2-thinking", add_generation_prompt=gen) == expected


@settings(max_examples=80)
@given(data=st.data())
def test_k2_instruct_matches_real_template(reference, data):
    msgs = data.draw(messages("k2-instruct"))
    tools, gen = data.draw(toolsets), data.draw(st.booleans())
    expected = jinja_render(reference, "k2-instruct", msgs, tools, add_generation_prompt=gen)
    assert ours(msgs, tools, variant="k2-instruct", add_generation_prompt=gen) == expected


def test_k2_instruct_template_has_crlf_endings(reference):
    raw = (reference / "Kimi-K2-Instruct" / "chat_template.jinja").read_bytes()
    assert b"\r\n" in raw  # the file the byte-identity test reads really is the CRLF one


def test_facts_example_k25(reference):
    """sources §9's worked example, piece by piece."""
    msgs = [{"role": "system", "content": "You are Kimi."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                         {"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:0",
             "content": '{"weather": "Sunny"}'}]
    text = render(msgs, variant="k2.5")
    assert text == jinja_render(reference, "k2.5", msgs)
    assert text == ("<|im_system|>system<|im_middle|>You are Kimi.<|im_end|>"
                    "<|im_user|>user<|im_middle|>What is in this image?"
                    "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
                    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
                    '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
                    "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
                    '{"weather": "Sunny"}<|im_end|><|im_assistant|>assistant<|im_middle|><think>')


# ---------------------------------------------------------------------------------------------------
# K2.6 / K2.7-Code: preserve_thinking
# ---------------------------------------------------------------------------------------------------
def _k26_template_from_k25(reference: Path) -> str:
    """sources §9's description of K2.6 applied to the genuine K2.5 file (K2.6's own file is not public):
    a ``preserve_thinking`` flag that skips the history split, and the ``reasoning`` key read first."""
    source = (reference / "Kimi-K2.5" / "chat_template.jinja").read_text(encoding="utf-8")
    edits = [
        ("{%- set hist_msgs = messages[:ns.last_non_tool_call_assistant_msg+1] -%}",
         "{%- set preserve_thinking = preserve_thinking | default(false) -%}\n"
         "{%- if preserve_thinking -%}{%- set ns.last_non_tool_call_assistant_msg = -1 -%}{%- endif -%}\n"
         "{%- set hist_msgs = messages[:ns.last_non_tool_call_assistant_msg+1] -%}"),
        ("{%- if thinking is defined and thinking is false -%}\n    <think></think>{{render_content(message)}}",
         "{%- if thinking is defined and thinking is false and preserve_thinking is false -%}\n"
         "    <think></think>{{render_content(message)}}"),
        ("{%- set rc = message.get('reasoning_content', '') -%}\n    <think>{{rc}}</think>{{render_content(message)}}\n"
         "    {%- endif -%}",
         "{%- set rc = message.get('reasoning', message.get('reasoning_content', '')) -%}\n"
         "    <think>{{rc}}</think>{{render_content(message)}}\n    {%- endif -%}"),
    ]
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    return source


@settings(max_examples=60)
@given(data=st.data())
def test_k26_and_k27_code_match_the_k26_rules(reference, data):
    msgs = data.draw(messages("k2.6"))
    tools, gen, thinking = data.draw(toolsets), data.draw(st.booleans()), data.draw(st.booleans())
    preserve = data.draw(st.booleans())
    source = _k26_template_from_k25(reference)
    expected = jinja_render(reference, "k2.5", msgs, tools, source=source, thinking=thinking,
                            preserve_thinking=preserve, add_generation_prompt=gen)
    assert ours(msgs, tools, variant="k2.6", thinking=thinking, preserve_thinking=preserve,
                add_generation_prompt=gen) == expected
    if thinking and preserve:  # K2.7-Code is K2.6 with both forced on
        assert ours(msgs, tools, variant="k2.7-code", add_generation_prompt=gen) == expected


CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "reasoning_content": "need a tool", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
]


def test_history_drops_reasoning_and_preserve_keeps_it():
    k25 = render(CONVERSATION, variant="k2.5")
    assert "greet back" not in k25 and "<think>need a tool</think>" in k25  # history vs suffix
    for text in (render(CONVERSATION, variant="k2.6", preserve_thinking=True), render(CONVERSATION)):
        assert "<think>greet back</think>Hello!" in text and "<think>need a tool</think>" in text
    assert render(CONVERSATION, variant="k2.6") == k25  # preserve_thinking defaults to off in K2.6
    assert render(CONVERSATION) == render(CONVERSATION, variant="k2.6", preserve_thinking=True)
    off = render(CONVERSATION, variant="k2.6", thinking=False)
    assert "need a tool" not in off and off.endswith("<|im_middle|><think></think>")
    # preserve_thinking beats thinking=False for the turns already written (K2.6's suffix condition)
    assert "<think>need a tool</think>" in render(CONVERSATION, variant="k2.6", thinking=False, preserve_thinking=True)


def test_k26_reads_the_reasoning_key_first():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning": "new", "reasoning_content": "old"}]
    assert "<think>new</think>a" in render(msgs)
    assert "<think>new</think>" in render(msgs, variant="k2.6", preserve_thinking=True)
    assert "new" not in render(msgs, variant="k2.5") and "<think></think>a" in render(msgs, variant="k2.5")
    # None counts as absent (jinja would print "None"): the next key is used
    assert "<think>old</think>a" in render([msgs[0], {**msgs[1], "reasoning": None}])


# ---------------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from kimi_ref.tokenizer import Tokenizer

    return Tokenizer.demo()


def test_ids_control_tokens_and_text(tok):
    msgs = [{"role": "user", "content": "type <|im_end|> please"}]
    ids = render_ids(msgs, tok)
    specials = set(tok.special_tokens.values())
    controls = [i for i in ids if i in specials]
    names = [n for i in controls for n, j in tok.special_tokens.items() if j == i]
    assert names == ["<|im_user|>", "<|im_middle|>", "<|im_end|>", "<|im_assistant|>", "<|im_middle|>", "<think>"]
    assert tok.decode(ids) == render(msgs)  # the typed "<|im_end|>" is text, one real <|im_end|> id


# No special-token string can form: the demo vocabulary's specials are <|...|> and [BOS] [EOS] [EOT] [UNK] [PAD]
# (hypothesis found a user typing "[UNK]", which allow_special=True encodes as the special and we, rightly, as text).
benign = st.text(alphabet=st.characters(blacklist_characters="<>|["), max_size=12)


@settings(max_examples=40)
@given(msgs=st.lists(st.builds(lambda r, c, rc: {"role": r, "content": c, "reasoning_content": rc},
                               st.sampled_from(["user", "assistant", "system"]), benign, benign), max_size=5),
       variant=st.sampled_from(VARIANTS))
def test_ids_equal_hf_whole_prompt_encoding_on_benign_text(tok, msgs, variant):
    """On text that holds no special-token strings, our ids == encoding the whole prompt with specials
    allowed (what HF's TikTokenTokenizer does), because text segments are joined before encoding."""
    if variant in ("k2-thinking", "k2-instruct"):  # their <|media_start|>-free prompts still fit the demo vocab
        msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
    prompt = render(msgs, variant=variant)
    assert render_ids(msgs, tok, variant=variant) == tok.encode(prompt, allow_special=True)


def test_ids_unknown_control_token_is_an_error():
    class NoThink:
        special_tokens = {"<|im_user|>": 1, "<|im_middle|>": 2, "<|im_end|>": 3, "<|im_assistant|>": 4}

        def encode(self, text):
            return [0] * len(text)

    with pytest.raises(ChatTemplateError, match="no special token '<think>'"):
        render_ids([{"role": "user", "content": "x"}], NoThink())


def test_segments_carry_roles():
    segments = render_segments(CONVERSATION, tools=_fixture_tools("01_simple_string"))
    roles = [s.role for s in segments]
    assert roles[0] == "tool_declare" and roles[-1] == "generation"
    assert {"user", "assistant", "tool"} <= set(roles)
    assert "".join(s.text for s in segments) == render(CONVERSATION, tools=_fixture_tools("01_simple_string"))


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the message index and field
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("msgs, kwargs, match", [
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], {}, r"messages\[1\]: unknown role 'robot'"),
    ([{"role": "tool", "content": "r"}], {}, r"messages\[0\]: a tool message needs 'tool_call_id'"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}], {},
     r"messages\[0\]\.tool_calls\[0\]: a tool call needs an 'id'"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "f:0"}]}], {},
     r"messages\[0\]\.tool_calls\[0\]\.function must be a dict with 'arguments'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], {}, r"messages\[0\]\.content\[0\]: unknown content part type 'audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], {}, r"messages\[0\]\.content\[0\]: a text part needs a string 'text'"),
    ([{"role": "user", "content": 5}], {}, r"messages\[0\]\.content must be a string, a list of parts or None"),
    ([{"role": "user", "content": "a", "name": 3}], {}, r"messages\[0\]\.name must be a string"),
    (["hello"], {}, r"messages\[0\] must be a dict"),
    ("hello", {}, "messages must be a list"),
    ([{"role": "user", "content": "a", "tool_calls": []}], {}, r"messages\[0\]: only assistant messages have tool_calls"),
    ([{"role": "user", "content": [{"type": "video"}]}], {"variant": "k2-thinking"}, "has no video support"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "f:0", "function": {"arguments": "{}"}}]}],
     {"variant": "k2-instruct"}, "no syntax for tool_calls"),
    ([{"role": "user", "content": None}], {"variant": "k2-instruct"}, r"messages\[0\]\.content is None"),
    ([], {"variant": "k3"}, "unknown variant 'k3'"),
    ([], {"thinking": False}, "k2.7-code always thinks"),
    ([], {"preserve_thinking": False}, "k2.7-code always preserves"),
    ([], {"variant": "k2.5", "preserve_thinking": True}, "no preserve_thinking flag"),
    ([], {"variant": "k2-thinking", "thinking": False}, "no thinking switch"),
    ([], {"thinking": "yes"}, "thinking must be True or False"),
    ([], {"tools": {"type": "function"}}, "tools must be a list"),
])
def test_bad_input_errors(msgs, kwargs, match):
    with pytest.raises(ChatTemplateError, match=match):
        render(msgs, **kwargs)


def test_arguments_that_are_not_json():
    call = {"id": "f:0", "function": {"arguments": {"x": {1, 2}}}}
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.tool_calls\[0\]\.function\.arguments cannot be written"):
        render([{"role": "assistant", "content": "", "tool_calls": [call]}])


# ---------------------------------------------------------------------------------------------------
# Chapter 02 exercises
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def solutions():
    return load_solutions("02_chat_template")


@settings(max_examples=30)
@given(msgs=messages("k2.5"), variant=st.sampled_from(["k2.5", "k2.7-code"]))
def test_solution_tokens_by_role(solutions, tok, msgs, variant):
    tools = _fixture_tools("01_simple_string")
    counts = solutions.tokens_by_role(msgs, tok, variant, tools)
    assert sum(counts.values()) == len(render_ids(msgs, tok, tools, variant=variant))
    assert counts["generation"] == 4 and counts["tool_declare"] > 3  # header, name, middle, <think>


@settings(max_examples=40)
@given(msgs=messages("k2.5"))
def test_solution_history_split(solutions, msgs):
    msgs = [{k: v for k, v in m.items() if k != "reasoning"} for m in msgs]
    assert ours(solutions.hide_history_reasoning(msgs), variant="k2.7-code") == ours(msgs, variant="k2.5")


def test_solution_message_from_deltas(solutions, tok):
    from kimi_ref.tool_parsing import StreamParser, parse

    output = ("hm</think>ok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
              '{"a": [1, 2]}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    ids = tok.encode(output, allow_special=True)
    parser = StreamParser(tok)
    deltas = [d for k in range(0, len(ids), 3) for d in parser.feed(ids[k:k + 3])] + parser.finish()
    rebuilt = solutions.message_from_deltas(deltas)
    whole = parse(ids, tok)
    assert rebuilt["reasoning_content"] == whole["reasoning_content"] == "hm"
    assert rebuilt["content"] == whole["content"] == "ok"
    assert rebuilt["tool_calls"] == [{k: v for k, v in c.items() if k != "valid_json"} for c in whole["tool_calls"]]
