"""kimi_ref.tool_parsing: the kimi_k2 output grammar, on text and on ids, whole and streamed."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kimi_ref.chat_template import render, render_ids
from kimi_ref.tool_parsing import MARKERS, StreamParser, ToolParseError, function_name, parse

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


@pytest.fixture(scope="module")
def tok():
    from kimi_ref.tokenizer import Tokenizer

    return Tokenizer.demo()


def call(call_id: str, args: str) -> str:
    return f"{CB}{call_id}{AB}{args}{CE}"


def calls_of(result):
    return [(c["id"], c["function"]["name"], c["function"]["arguments"], c["valid_json"]) for c in result["tool_calls"]]


# ---------------------------------------------------------------------------------------------------
# The cases of issue 4
# ---------------------------------------------------------------------------------------------------
def test_plain_answer():
    r = parse("Let me think.</think>Paris is the capital.<|im_end|>")
    assert r == {"role": "assistant", "reasoning_content": "Let me think.", "content": "Paris is the capital.", "tool_calls": [],
                 "truncated": False, "problems": []}


def test_several_tool_calls():
    r = parse("r</think>" + SB + call("functions.get_weather:0", '{"city": "Paris"}')
              + call("functions.get_time:1", '{"tz": "CET"}') + SE + "<|im_end|>")
    assert calls_of(r) == [("functions.get_weather:0", "get_weather", '{"city": "Paris"}', True),
                           ("functions.get_time:1", "get_time", '{"tz": "CET"}', True)]
    assert r["tool_calls"][0]["type"] == "function" and r["content"] == "" and not r["problems"]


def test_braces_and_markup_inside_json_strings():
    args = '{"code": "if (x) { return \\"}\\"; }", "html": "<div class=\\"a\\">}</div>", "lt": "<|"}'
    r = parse("</think>" + SB + call("functions.run:0", args) + SE)
    assert calls_of(r) == [("functions.run:0", "run", args, True)]
    assert json.loads(r["tool_calls"][0]["function"]["arguments"])["html"] == '<div class="a">}</div>'


@pytest.mark.parametrize("call_id, name", [
    ("functions.get-weather:0", "get-weather"),
    ("functions.web.search:3", "web.search"),
    ("functions.a.b-c:12", "a.b-c"),
    ("get_weather:0", "get_weather"),
    ("functions.functions.x:1", "functions.x"),  # only one leading "functions." goes
    ("functions.time:zone:7", "time:zone"),  # cut at the LAST :digits
    ("  functions.f:2 ", "f"),
    ("functions.noindex", "noindex"),
])
def test_names(call_id, name):
    assert function_name(call_id) == name
    r = parse("</think>" + SB + call(call_id, "{}") + SE)
    assert r["tool_calls"][0]["id"] == call_id.strip() and r["tool_calls"][0]["function"]["name"] == name
    assert bool(r["problems"]) == (name == "noindex")  # an id without ':index' is noted


def test_multiline_and_non_object_json():
    multi = '{\n  "a": [1,\n 2],\n  "b": null\n}'
    r = parse("</think>" + SB + call("functions.f:0", multi) + call("functions.g:1", "[1, 2]")
              + call("functions.h:2", '"just a string"') + call("functions.k:3", "42") + SE)
    assert [c[2:] for c in calls_of(r)] == [(multi, True), ("[1, 2]", True), ('"just a string"', True), ("42", True)]


def test_invalid_json_is_returned_raw_and_flagged():
    r = parse("</think>" + SB + call("functions.f:0", "{'single': quotes}") + call("functions.g:1", "") + SE)
    assert calls_of(r) == [("functions.f:0", "f", "{'single': quotes}", False), ("functions.g:1", "g", "", False)]
    assert len(r["problems"]) == 2 and "not valid JSON" in r["problems"][0]
    assert not r["truncated"]


def test_unterminated_tool_section():
    r = parse("ok</think>Calling." + SB + call("functions.f:0", '{"a": 1}') + CB + "functions.g:1" + AB + '{"b": ')
    assert r["truncated"] and r["content"] == "Calling."
    assert calls_of(r) == [("functions.f:0", "f", '{"a": 1}', True), ("functions.g:1", "g", '{"b":', False)]
    assert any("ended inside the tool-call section" in p for p in r["problems"])
    r = parse("</think>" + SB + CB + "functions.f:0")  # cut inside the id
    assert r["truncated"] and calls_of(r) == [("functions.f:0", "f", "", False)]
    r = parse("</think>" + SB + call("functions.f:0", "{}") + "<|im_end|>")  # <|im_end|> before the section end
    assert r["truncated"] and calls_of(r) == [("functions.f:0", "f", "{}", True)]


def test_missing_end_think_is_all_reasoning_and_truncated():
    r = parse("I was thinking and then the budget ran o")
    assert r["reasoning_content"] == "I was thinking and then the budget ran o" and r["content"] == ""
    assert r["truncated"] and "no </think>" in r["problems"][0]


def test_tool_section_ends_the_reasoning():
    r = parse("I need the weather." + SB + call("functions.get_weather:0", "{}") + SE + "<|im_end|>")
    assert r["reasoning_content"] == "I need the weather." and r["content"] == ""
    assert not r["truncated"] and len(r["tool_calls"]) == 1 and not r["problems"]


def test_content_before_the_tool_section():
    r = parse("hm</think>Let me check that for you.\n" + SB + call("functions.f:0", "{}") + SE)
    assert r["content"] == "Let me check that for you.\n" and len(r["tool_calls"]) == 1


def test_whitespace_around_every_piece():
    text = ("r</think>c \n" + SB + "\n  " + CB + "  functions.f:0\n " + AB + " \n{\"a\": 1}\t\n " + CE + "\n"
            + CB + "\tfunctions.g:1 " + AB + " {} " + CE + " \n" + SE + "\n")
    r = parse(text)
    assert calls_of(r) == [("functions.f:0", "f", '{"a": 1}', True), ("functions.g:1", "g", "{}", True)]
    assert r["content"] == "c \n\n" and not r["problems"]  # text after the section joins the content


def test_leading_think_is_dropped_and_singular_spelling():
    assert parse("<think>why</think>because")["reasoning_content"] == "why"
    assert parse("<think>why</think>because", starts_in_reasoning=False)["reasoning_content"] == "why"
    assert parse("x<think>why</think>because")["reasoning_content"] == "x<think>why"  # only at the very start
    r = parse("plain answer", starts_in_reasoning=False)
    assert r["reasoning_content"] is None and r["content"] == "plain answer" and not r["truncated"]
    r = parse("</think><|tool_call_section_begin|>" + call("functions.f:0", "{}") + "<|tool_call_section_end|>")
    assert len(r["tool_calls"]) == 1 and r["content"] == ""


def test_irregularities_are_reported_not_dropped():
    r = parse("</think>" + SB + "junk" + call("functions.f:0", "{}") + SE + "<|im_end|>more text")
    assert any("junk" in p for p in r["problems"]) and any("more text" in p for p in r["problems"])
    r = parse("</think>" + SB + CB + "functions.f:0" + AB + "{}" + CB + "functions.g:1" + AB + "[]" + CE + SE)
    assert calls_of(r) == [("functions.f:0", "f", "{}", True), ("functions.g:1", "g", "[]", True)]
    assert any("not closed" in p for p in r["problems"])
    r = parse("</think>" + SB + CB + "functions.f:0" + CE + SE)
    assert calls_of(r) == [("functions.f:0", "f", "", False)] and any("has no" in p for p in r["problems"])


# ---------------------------------------------------------------------------------------------------
# Ids: only real special tokens are markers
# ---------------------------------------------------------------------------------------------------
def _ids(tok, *pieces):
    out = []
    for piece in pieces:
        out += [tok.special_id(piece)] if piece in tok.special_tokens else tok.encode(piece)
    return out


def test_ids_literal_markers_in_json_are_text(tok):
    args = '{"s": "<|tool_call_end|><|tool_calls_section_end|></think>"}'
    ids = _ids(tok, "reason", "</think>", "ans", SB, CB, "functions.f:0", AB, args, CE, SE, "<|im_end|>")
    r = parse(ids, tok)
    assert r["reasoning_content"] == "reason" and r["content"] == "ans"
    assert calls_of(r) == [("functions.f:0", "f", args, True)] and not r["problems"]
    assert calls_of(parse(tok.decode(ids))) != calls_of(r)  # the text form cannot tell: that is why ids matter


def test_ids_other_specials_are_text_and_eos_stops(tok):
    ids = _ids(tok, "</think>", "see ", "<|media_pad|>", "[EOS]", "ignored")
    r = parse(ids, tok)
    assert r["content"] == "see <|media_pad|>" and any("ignored" in p for p in r["problems"])


def test_ids_split_utf8_characters(tok):
    ids = tok.encode("é中文🙂 done")
    pieces = [[i] for i in ids]
    parser = StreamParser(tok, starts_in_reasoning=False)
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    assert "".join(d["text"] for d in deltas) == "é中文🙂 done" == parser.result()["content"]


def test_input_errors(tok):
    with pytest.raises(ToolParseError, match="needs the tokenizer"):
        parse([1, 2, 3])
    parser = StreamParser(tok)
    parser.feed("text")
    with pytest.raises(ToolParseError, match="started as text"):
        parser.feed([1, 2])
    parser.finish()
    with pytest.raises(ToolParseError, match="after finish"):
        parser.feed("more")
    with pytest.raises(ToolParseError, match=r"ids\[1\] of this chunk is 'x'"):
        parse([1, "x"], tok)
    with pytest.raises(ToolParseError, match="takes a str or a sequence of token ids, got NoneType"):
        parse(None)
    with pytest.raises(ToolParseError, match="got bytes"):
        parse(b"</think>")


def test_long_arguments_token_by_token(tok):
    """A coding agent writes whole files as arguments, fed one token at a time (whitespace inside kept)."""
    body = json.dumps({"path": "a.py", "content": "def f():\n    return 1\n\n" * 300}, indent=2)
    ids = tok.encode("</think>" + SB + CB + "functions.write:0" + AB, allow_special=True) + tok.encode(" \n" + body + "\n ") \
        + [tok.special_id(CE), tok.special_id(SE)]
    parser = StreamParser(tok)
    deltas = [d for i in ids for d in parser.feed([i])] + parser.finish()
    assert parser.result()["tool_calls"][0]["function"]["arguments"] == body
    assert "".join(d["text"] for d in deltas if d["type"] == "arguments") == body


# ---------------------------------------------------------------------------------------------------
# Streaming == whole, for every cut
# ---------------------------------------------------------------------------------------------------
words = st.one_of(st.text(max_size=8), st.sampled_from(["<", "<|", "<|tool_ca", "{", "}", "<div>", " ", "\n", "é"]))
pieces = st.one_of(words, st.sampled_from(sorted(MARKERS)), st.sampled_from(["functions.f:0", '{"a": 1}', "<think>"]))


@st.composite
def outputs(draw):
    """Mostly well-formed outputs with optional damage, plus some free-form marker soup."""
    if draw(st.integers(0, 3)) == 0:
        return "".join(draw(st.lists(pieces, max_size=12)))
    text = draw(st.sampled_from(["", "<think>"])) + draw(words)
    if draw(st.booleans()):
        text += "</think>" + draw(words)
    if draw(st.booleans()):
        text += draw(st.sampled_from(["", " ", "\n"])) + SB
        for k in range(draw(st.integers(0, 3))):
            ws = draw(st.sampled_from(["", " ", "\n "]))
            args = draw(st.one_of(st.just("{}"), st.builds(json.dumps, st.dictionaries(st.text(max_size=4),
                                                                                        st.text(max_size=6), max_size=2)),
                                  words))
            text += ws + CB + ws + f"functions.{draw(st.sampled_from(['f', 'a.b-c', 'x']))}:{k}" + ws + AB + ws + args + ws
            if draw(st.integers(0, 5)):
                text += CE
        if draw(st.integers(0, 4)):
            text += SE
    if draw(st.booleans()):
        text += "<|im_end|>"
    return text


def _cuts(draw, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=8))))


def _stream(parser, chunks):
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    return deltas, parser.result()


def _check_deltas(deltas, result):
    joined = {"reasoning": "", "content": ""}
    args: dict[int, str] = {}
    for d in deltas:
        if d["type"] in joined:
            joined[d["type"]] += d["text"]
        elif d["type"] == "tool_call":
            assert d["index"] == len(args)
            assert (d["id"], d["name"]) == (result["tool_calls"][d["index"]]["id"],
                                            result["tool_calls"][d["index"]]["function"]["name"])
            args[d["index"]] = ""
        else:
            args[d["index"]] += d["text"]
    assert joined["reasoning"] == (result["reasoning_content"] or "")
    assert joined["content"] == result["content"]
    assert [args[k] for k in sorted(args)] == [c["function"]["arguments"] for c in result["tool_calls"]]


@settings(max_examples=150)
@given(data=st.data())
def test_stream_text_any_split_equals_parse(data):
    text = data.draw(outputs())
    start = data.draw(st.booleans())
    cuts = _cuts(data.draw, len(text))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    whole = parse(text, starts_in_reasoning=start)
    deltas, streamed = _stream(StreamParser(starts_in_reasoning=start), chunks)
    assert streamed == whole
    _check_deltas(deltas, whole)


@settings(max_examples=80)
@given(data=st.data())
def test_stream_ids_any_split_equals_parse(tok, data):
    ids = tok.encode(data.draw(outputs()), allow_special=True)
    cuts = _cuts(data.draw, len(ids))
    chunks = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    whole = parse(ids, tok)
    deltas, streamed = _stream(StreamParser(tok), chunks)
    assert streamed == whole
    _check_deltas(deltas, whole)


# ---------------------------------------------------------------------------------------------------
# render(parse(output)) reproduces the assistant turn
# ---------------------------------------------------------------------------------------------------
free_text = st.text(max_size=10)
assistant = st.builds(
    lambda r, c, calls: {"role": "assistant", "reasoning_content": r, "content": c, "tool_calls": calls},
    free_text, free_text,
    st.lists(st.builds(lambda n, k, a: {"id": f"functions.{n}:{k}", "type": "function",
                                        "function": {"name": n, "arguments": a}},
                       st.sampled_from(["get_weather", "web.search-v2", "x"]), st.integers(0, 9),
                       st.one_of(st.builds(json.dumps, st.dictionaries(st.text(max_size=5), free_text, max_size=3)),
                                 st.text(max_size=8).map(str.strip))), max_size=3))


@settings(max_examples=60)
@given(message=assistant)
def test_round_trip_ids(tok, message):
    """Ids: anything the user or model typed, marker look-alikes included, survives the trip."""
    user = {"role": "user", "content": "q"}
    prompt = render_ids([user], tok)
    full = render_ids([user, message], tok, add_generation_prompt=False)
    assert full[:len(prompt)] == prompt  # the prompt ends with <think>: the model continues from there
    parsed = parse(full[len(prompt):], tok)
    assert render_ids([user, parsed], tok, add_generation_prompt=False) == full
    assert render([user, parsed], add_generation_prompt=False) == render([user, message], add_generation_prompt=False)


@settings(max_examples=60)
@given(message=assistant)
def test_round_trip_text(message):
    user = {"role": "user", "content": "q"}
    fields = [message["reasoning_content"], message["content"]] + [c["function"]["arguments"] for c in message["tool_calls"]]
    assume(not any(m in f for f in fields for m in MARKERS) and not any(f.endswith("<") for f in fields))
    prompt = render([user])
    full = render([user, message], add_generation_prompt=False)
    parsed = parse(full[len(prompt):])
    assert render([user, parsed], add_generation_prompt=False) == full
    assert parsed["truncated"] is False
