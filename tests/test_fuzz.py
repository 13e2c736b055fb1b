"""Fuzzing every reader of outside input: random bytes and random structured garbage, one property.

Each reader either returns a result or raises its documented error type with a message -- never
another exception, and never a hang: every case runs under an alarm (``CASE_SECONDS``). The readers:
the safetensors header, config.json, the index, the tokenizer's rank file, chat-template messages,
the tool-call parser (whole and streamed), the calculator, the image loader, and what the chat reads
from a checkpoint (tokenizer_config.json, generation_config.json, chat_template.jinja). The table of what a
user sees is docs/reliability.md.

Budget: the CI profile runs 20 examples per test (tests/conftest.py); the whole file takes seconds.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kimi_ref.chat_template import ChatTemplateError, render
from kimi_ref.checkpoint import Checkpoint, CheckpointError, read_header
from kimi_ref.checkpoint_chat import ChatSetupError, chat_setup
from kimi_ref.template_proof import TemplateMismatch, prove
from kimi_ref.config import ConfigError, KimiConfig, fixture_path, load_config
from kimi_ref.tokenizer import TokenizerError, load_ranks
from kimi_ref.tool_parsing import MARKERS, StreamParser, ToolParseError, parse
from kimi_ref.tools import calculator

CASE_SECONDS = 10  # generous on a loaded 2-core CI machine; a hang would be minutes


class Hang(Exception):
    pass


@contextmanager
def bounded(seconds: float = CASE_SECONDS):
    """Fail (not wait) if the body runs longer than ``seconds``."""
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def raises_only(errors, fn, *args, **kwargs):
    """Run ``fn``; a documented error must carry a message; anything else fails the test (as itself)."""
    with bounded():
        try:
            return fn(*args, **kwargs)
        except errors as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return e


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One directory per module: hypothesis runs many cases per test, and each case rewrites its files."""
    return tmp_path_factory.mktemp("fuzz")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


# ---- safetensors headers ---------------------------------------------------------------------------------

@st.composite
def safetensors_files(draw) -> bytes:
    """Random bytes, or a plausible header with damaged entries, with or without data after it."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=64))
    entry = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["BF16", "F32", "I32", "U8", "F8_E4M3", "bogus"]) | json_values,
        "shape": st.lists(st.integers(-3, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-3, 2**40), max_size=3) | json_values,
    })
    header = draw(st.dictionaries(st.text(max_size=6), entry | json_values, max_size=3))
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    length = draw(st.sampled_from([len(raw), len(raw) + 1, 2**63, 0]))
    return length.to_bytes(8, "little") + raw + draw(st.binary(max_size=32))


@given(data=safetensors_files())
@example(data=b'>\x00\x00\x00\x00\x00\x00\x00{"": {"dtype": "BF16", "shape": null, "data_offsets": [0, 0]}}')  # found here
@example(data=b'B\x00\x00\x00\x00\x00\x00\x00{"": {"dtype": "BF16", "shape": [], "data_offsets": [null, null]}}')
def test_safetensors_header_reader(scratch, data):
    path = scratch / "x.safetensors"
    path.write_bytes(data)
    raises_only(CheckpointError, read_header, path)


# ---- config.json and the index ---------------------------------------------------------------------------

def _damaged_config(draw) -> bytes:
    real = json.loads(fixture_path(draw(st.sampled_from(["kimi_k25", "kimi_k2_thinking"]))).read_text())
    section = real.get("text_config", real)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(section)))
        if draw(st.booleans()):
            section[key] = draw(json_values)
        else:
            del section[key]
    return json.dumps(real).encode()


@st.composite
def config_files(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    return _damaged_config(draw)


@given(data=config_files())
@example(data=json.dumps({**json.loads(fixture_path("kimi_k2_thinking").read_text()), "pad_token_id": []}).encode())
def test_config_reader(scratch, data):
    path = scratch / "config.json"
    path.write_bytes(data)
    result = raises_only(ConfigError, load_config, path)
    assert isinstance(result, (KimiConfig, ConfigError))


@given(index=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode()),
                       st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
                           lambda m: json.dumps({"weight_map": m, "metadata": {"total_size": 1}}).encode())))
def test_index_reader(scratch, index):
    ckpt = scratch / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_bytes(fixture_path("kimi_k2_thinking").read_bytes())
    (ckpt / "model.safetensors.index.json").write_bytes(index)
    result = raises_only((CheckpointError, ConfigError), Checkpoint.open, ckpt)
    if isinstance(result, Checkpoint):
        assert result.problems  # an index that names no real shard is never "sound"


# ---- the tokenizer's rank file ---------------------------------------------------------------------------

@given(data=st.one_of(st.binary(max_size=200),
                      st.lists(st.tuples(st.binary(max_size=6).map(lambda b: __import__("base64").b64encode(b)),
                                         st.integers(-2, 10).map(lambda i: str(i).encode())), max_size=8).map(
                          lambda rows: b"\n".join(a + b" " + r for a, r in rows))))
def test_rank_file_reader(scratch, data):
    path = scratch / "tiktoken.model"
    path.write_bytes(data)
    raises_only(TokenizerError, load_ranks, path)


# ---- chat-template messages ------------------------------------------------------------------------------

message = st.one_of(
    json_values,
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | json_values},
                          optional={"content": json_values | st.text(max_size=20),
                                    "reasoning_content": json_values, "tool_calls": json_values,
                                    "tool_call_id": json_values, "name": json_values}))


@pytest.mark.filterwarnings("ignore:tools")  # tools that are not OpenAI dicts: declared as JSON, with a warning
@given(messages=st.lists(message, max_size=4) | json_values,
       tools=st.none() | st.lists(json_values, max_size=2),
       variant=st.sampled_from(["k2.5", "k2.6", "k2.7-code", "k2-thinking", "k2-instruct"]))
def test_chat_template_messages(messages, tools, variant):
    result = raises_only(ChatTemplateError, render, messages, tools=tools, variant=variant)
    assert isinstance(result, (str, ChatTemplateError))


# ---- the tool-call parser --------------------------------------------------------------------------------

soup = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(sorted(MARKERS)), st.sampled_from(["<", "<|", "{"])),
                max_size=16).map("".join)


@given(text=soup | st.text(max_size=80), cuts=st.lists(st.integers(0, 80), max_size=6))
def test_tool_call_parser_text(text, cuts):
    whole = raises_only((), parse, text)
    parser = StreamParser()
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    with bounded():
        for a, b in zip(bounds, bounds[1:]):
            parser.feed(text[a:b])
        parser.finish()
    assert parser.result() == whole
    assert set(parser.malformed_calls()) <= set(range(len(whole["tool_calls"])))


@pytest.fixture(scope="module")
def tok():
    from kimi_ref.tokenizer import Tokenizer

    return Tokenizer.demo()


@given(ids=st.lists(st.integers(0, 4095), max_size=40), cut=st.integers(0, 40))
def test_tool_call_parser_ids(tok, ids, cut):
    whole = raises_only((), parse, ids, tok)
    parser = StreamParser(tok)
    with bounded():
        parser.feed(ids[:cut])
        parser.feed(ids[cut:])
        parser.finish()
    assert parser.result() == whole


@given(chunk=json_values | st.binary(max_size=8) | st.lists(json_values, max_size=3))
def test_tool_call_parser_bad_input_types(chunk):
    raises_only(ToolParseError, parse, chunk)


# ---- the calculator --------------------------------------------------------------------------------------

arithmetic = st.recursive(
    st.integers(-10**30, 10**30).map(str) | st.floats(allow_nan=False).map(repr) | st.sampled_from(["9", "99", "0.5"]),
    lambda c: st.tuples(c, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), c).map(lambda t: f"({t[0]}{t[1]}{t[2]})")
    | c.map(lambda x: f"-{x}") | c.map(lambda x: f"factorial({x})") | c.map(lambda x: f"sqrt({x})"),
    max_leaves=10)


@given(expression=arithmetic | st.text(max_size=60) | st.sampled_from(["(9**9999)**9999", "10**5000", "-" * 999 + "1"]))
def test_calculator_always_answers(expression):
    start = time.perf_counter()
    result = raises_only((), calculator, expression)
    assert isinstance(result, str) and result
    assert time.perf_counter() - start < 2.0, f"{expression!r} took {time.perf_counter() - start:.1f} s"


# ---- the image loader ------------------------------------------------------------------------------------

@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a real small PNG/JPEG/GIF with bytes flipped or cut."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=128))
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (draw(st.integers(1, 9)), draw(st.integers(1, 9))), (200, 10, 10)).save(
        buf, format=draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"])))
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` × ``height`` pixels (a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@given(data=image_bytes())
@example(data=_png_header(20_000, 20_000))  # found here: Pillow's DecompressionBombError escaped
@example(data=_png_header(9_000, 9_000))    # under Pillow's own limit, over ours: refused before decoding
def test_image_loader(scratch, data):
    from kimi_ref.moonvit import load_image

    raises_only(ValueError, load_image, data)
    path = scratch / "x.png"
    path.write_bytes(data)
    raises_only(ValueError, load_image, path)


# ---- what the chat reads from a checkpoint -----------------------------------------------------------------

template_pieces = st.sampled_from(["<|im_middle|>", "<|im_end|>", "<think>", "tools_ts_str", "preserve_thinking",
                                   "{{ messages }}", "{% if thinking is false %}", "{% endif %}", "{{", "{%",
                                   "| default(false)", "{{ messages[0].content }}", "{{ raise_exception('no') }}",
                                   "{{ 1/0 }}", "{{ 'a' + 1 }}", "{{ range(10**10)|list }}", "{{ messages.pop() }}"])
json_files = st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode()))


@st.composite
def tokenizer_configs(draw) -> bytes:
    if draw(st.booleans()):
        return draw(json_files)
    config = {"added_tokens_decoder": draw(st.dictionaries(
        st.sampled_from(["3842", "3843", "3900", "x", "-1"]),
        st.one_of(json_values, st.builds(lambda c: {"content": c}, st.sampled_from(
            ["<|im_end|>", "<think>", "</think>", "[EOS]", "other"]) | json_values)), max_size=4))}
    for key in ("chat_template", "kimi_ref_chat_variant"):
        if draw(st.booleans()):
            config[key] = draw(json_values | st.sampled_from(["k2.5", "k2.7-code"]))
    return json.dumps(config).encode()


@given(tokenizer_config=tokenizer_configs(),
       generation=st.one_of(st.none(), json_files, st.dictionaries(
           st.sampled_from(["temperature", "top_p", "eos_token_id", "max_length", "max_new_tokens", "do_sample"]),
           json_values, max_size=4).map(lambda d: json.dumps(d).encode())),
       template=st.one_of(st.none(), st.lists(template_pieces | st.text(max_size=6), max_size=8).map("".join)),
       variant=st.sampled_from([None, "k2.5", "k2-instruct"]), mode=st.sampled_from(["kimi_ref", "checkpoint"]))
def test_checkpoint_chat_readers(scratch, tokenizer_config, generation, template, variant, mode):
    from kimi_ref.tokenizer import DEMO_DIR

    ckpt = scratch / "chat_setup"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "tiktoken.model").write_bytes((DEMO_DIR / "tiktoken.model").read_bytes())
    (ckpt / "tokenizer_config.json").write_bytes(tokenizer_config)
    for name, data in (("generation_config.json", generation),
                       ("chat_template.jinja", None if template is None else template.encode())):
        (ckpt / name).unlink(missing_ok=True)
        if data is not None:
            (ckpt / name).write_bytes(data)
    raises_only(ChatSetupError, chat_setup, ckpt, variant, mode, layout="kimi_k25")
    if template is not None:  # the proof itself, on whatever the template is
        raises_only((ChatTemplateError, TemplateMismatch), prove, template, variant or "k2.5")


def test_bounded_catches_a_hang():
    """The alarm that bounds every case really stops a runaway computation."""
    with pytest.raises(Hang):
        with bounded(0.2):
            while True:
                pass

