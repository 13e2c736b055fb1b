"""``python -m kimi_ref.serve`` driven by the official ``openai`` client, on kimi-nano (the shipped checkpoint).

Each model-card example is sent plain and streamed, and both must give what ``python -m kimi_ref.chat``
gives with the same seed: the same reasoning, answer and tool calls, and the same token counts. The
chat runs in this process (``kimi_ref.chat.main``) and is read back from its ``--save`` file. kimi-nano
declares its calculator by default in the chat (its ``tools.json``); for the examples without tools the
chat runs on a copy of kimi-nano without that file, so both sides render the same prompt.

The server under test runs in background threads of this process (``kimi_ref.serve.start``), except for
TP 2, which is the real command line in a subprocess (rank 0 serves, rank 1 follows over gloo).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from kimi_ref.chat import NANO_DIR, load_conversation  # noqa: E402
from kimi_ref.chat import main as chat_main  # noqa: E402
from kimi_ref.serve.requests import RequestError, parse_chat_request  # noqa: E402
from kimi_ref.serve.turn import StopMatcher  # noqa: E402
from kimi_ref.tools import run_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NANO_TOOLS = json.loads((NANO_DIR / "tools.json").read_text())
SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
CARD = [{"role": "system", "content": SYSTEM},  # the model card's chat-completion example
        {"role": "user", "content": [{"type": "text", "text": "which one is bigger, 9.11 or 9.9? think carefully."}]}]
PRESERVE = [  # the model card's preserve-thinking example: earlier reasoning must reach the prompt
    {"role": "user", "content": "Tell me three random numbers."},
    {"role": "assistant", "reasoning_content": "I'll start by listing five numbers: 473, 921, 235, 215, 222, and "
                                               "I'll tell you the first three.", "content": "473, 921, 235"},
    {"role": "user", "content": "What are the other two numbers you have in mind?"}]
MAX_MODEL_LEN = 4096
MAX_BODY = 1 << 20


# ---- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(media_dir):
    from kimi_ref.serve import start

    with start(max_model_len=MAX_MODEL_LEN, max_queue=1, max_body_bytes=MAX_BODY, media_dir=str(media_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def png(media_dir) -> Path:
    """A random 60×40 RGB PNG: 6×4 patches, 3×2 merged rows = 6 prompt positions."""
    import numpy as np
    from PIL import Image

    path = media_dir / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# ---- helpers: the chat CLI, and the client's answers in the chat's saved shape ---------------------------------

STATS = re.compile(r"── prompt (\d+) · reasoning (\d+) · answer (\d+) tokens")


# Said on both sides, not left to either's defaults: the comparison is of the same settings.
SAMPLING = {"temperature": 1.0, "top_p": 0.95}
CHAT_SAMPLING = ["--variant", "k2.7-code", "--temperature", "1.0", "--top-p", "0.95"]


def run_chat(capsys, tmp_path, *args: str) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """``python -m kimi_ref.chat ARGS --save F`` in this process: the saved messages and each turn's counts."""
    save = tmp_path / f"chat{len(list(tmp_path.iterdir()))}.json"
    capsys.readouterr()
    assert chat_main([*CHAT_SAMPLING, *args, "--save", str(save)]) == 0  # a later --temperature wins
    out = capsys.readouterr().out
    return load_conversation(save)[0], [tuple(map(int, m)) for m in STATS.findall(out)]


def chat_shape(message) -> dict:
    """An openai ChatCompletionMessage as the chat CLI saves an assistant message."""
    out = {"role": "assistant", "content": message.content or ""}
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert (message.model_extra or {}).get("reasoning") == reasoning, "the reasoning alias carries the same text"
    if reasoning:
        out["reasoning_content"] = reasoning
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in message.tool_calls]
    return out


def collect(stream) -> tuple[dict, str, object]:
    """A streamed answer joined up: (the message in the chat's shape, finish_reason, usage)."""
    reasoning, alias, content, calls = [], [], [], {}
    finish = usage = None
    first = True
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if first:
                assert delta.role == "assistant"
                first = False
            extra = delta.model_extra or {}
            reasoning.append(extra.get("reasoning_content") or "")
            alias.append(extra.get("reasoning") or "")
            content.append(delta.content or "")
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = call.function.name or entry["name"]
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert reasoning == alias
    message = {"role": "assistant", "content": "".join(content)}
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for _, c in sorted(calls.items())]
    return message, finish, usage


def ask_both(client, **kwargs):
    """The same request plain and streamed; both answers must agree. Returns the plain response."""
    kwargs = {**SAMPLING, **kwargs}
    plain = client.chat.completions.create(model="kimi-nano", **kwargs)
    streamed, finish, usage = collect(client.chat.completions.create(
        model="kimi-nano", stream=True, stream_options={"include_usage": True}, **kwargs))
    assert streamed == chat_shape(plain.choices[0].message)
    assert finish == plain.choices[0].finish_reason
    assert usage.model_dump() == plain.usage.model_dump()
    return plain


def check_counts(response, stats: tuple[int, int, int]) -> None:
    """usage against the chat's "prompt P · reasoning R · answer A" (the chat does not count <|im_end|>)."""
    prompt, reasoning, answer = stats
    usage = response.usage
    ended = response.choices[0].finish_reason != "length"
    assert (usage.prompt_tokens, usage.completion_tokens_details.reasoning_tokens) == (prompt, reasoning)
    assert usage.completion_tokens == reasoning + answer + ended
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---- the model card's examples against the chat CLI ----------------------------------------------------------

def test_model_card_chat_example(client, capsys, tmp_path):
    # kimi-nano was trained with its calculator always declared and writes calls even without it: declare it on
    # both sides (the chat does by default), and let the chat answer once, as the server does
    plain = ask_both(client, messages=CARD, tools=NANO_TOOLS, max_tokens=40, seed=1)
    messages, stats = run_chat(capsys, tmp_path, "--system", SYSTEM, "--prompt", CARD[1]["content"][0]["text"],
                               "--seed", "1", "--max-new-tokens", "40", "--max-tool-rounds", "0")
    assert chat_shape(plain.choices[0].message) == messages[-1]
    answered = plain.choices[0].message.content or plain.choices[0].message.tool_calls
    assert answered and messages[-1]["reasoning_content"], "an answer (or a call) after the reasoning"
    check_counts(plain, stats[0])
    assert plain.model == "kimi-nano" and plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")


def test_model_card_preserve_thinking_example(client, capsys, tmp_path):
    from kimi_ref.chat import save_conversation
    from kimi_ref.chat_template import render_ids
    from kimi_ref.tokenizer import Tokenizer

    # kimi-nano may answer this with a calculator call: declare its calculator on both sides (the chat does by
    # default), let the chat answer once, as the server does, and leave room for a whole call
    plain = ask_both(client, messages=PRESERVE, tools=NANO_TOOLS, max_tokens=96, seed=2)
    history = tmp_path / "history.json"
    save_conversation(history, PRESERVE[:2])
    messages, stats = run_chat(capsys, tmp_path, "--load", str(history),
                               "--prompt", PRESERVE[2]["content"], "--seed", "2", "--max-new-tokens", "96",
                               "--max-tool-rounds", "0")
    assert chat_shape(plain.choices[0].message) == messages[-1]
    check_counts(plain, stats[0])
    # K2.7-Code keeps the earlier turn's reasoning: the prompt is longer than K2.6's default would be.
    tok = Tokenizer.from_pretrained(NANO_DIR)
    kept = render_ids(PRESERVE, tok, tools=NANO_TOOLS, variant="k2.7-code")
    dropped = render_ids(PRESERVE, tok, tools=NANO_TOOLS, variant="k2.6", preserve_thinking=False)
    assert plain.usage.prompt_tokens == len(kept) > len(dropped)
    # The K2.6/K2.7 cards' key, "reasoning", is read the same way.
    alias = [PRESERVE[0], {"role": "assistant", "reasoning": PRESERVE[1]["reasoning_content"],
                           "content": PRESERVE[1]["content"]}, PRESERVE[2]]
    again = client.chat.completions.create(model="kimi-nano", messages=alias, tools=NANO_TOOLS, max_tokens=96, seed=2,
                                           **SAMPLING)
    assert chat_shape(again.choices[0].message) == messages[-1]
    # The K2.6 card's switch, sent to K2.7-Code (where it is forced on anyway), changes nothing.
    switched = client.chat.completions.create(model="kimi-nano", messages=PRESERVE, tools=NANO_TOOLS, max_tokens=96,
                                              seed=2, **SAMPLING,
                                              extra_body={"chat_template_kwargs": {"thinking": True,
                                                                                   "preserve_thinking": True}})
    assert chat_shape(switched.choices[0].message) == messages[-1]


def test_visual_content(client, capsys, tmp_path, png):
    question = "What is in the picture?"
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": question}]
    plain = ask_both(client, messages=[{"role": "user", "content": parts}], tools=NANO_TOOLS, max_tokens=24, seed=4)
    messages, stats = run_chat(capsys, tmp_path, "--image", str(png), "--prompt", question, "--seed", "4",
                               "--max-new-tokens", "24", "--max-tool-rounds", "0")
    assert chat_shape(plain.choices[0].message) == messages[1]
    check_counts(plain, stats[0])
    # A local file under --allowed-local-media-path is the same image (by path and by file:// URL).
    for url in (str(png), png.as_uri()):
        local = [{"type": "image_url", "image_url": {"url": url}}, parts[1]]
        same = client.chat.completions.create(model="kimi-nano", messages=[{"role": "user", "content": local}],
                                              tools=NANO_TOOLS, max_tokens=24, seed=4, **SAMPLING)
        assert chat_shape(same.choices[0].message) == messages[1]


def _tool_loop(client, stream: bool) -> list[dict]:
    """K2-Thinking's multi-step loop with the openai client: ask, run each call, send the results, until an answer."""
    messages: list[dict] = [{"role": "user", "content": "What is 17*23?"}]
    for _ in range(3):
        kwargs = dict(messages=messages, tools=NANO_TOOLS, temperature=0, max_tokens=64)
        if stream:
            message, finish, _ = collect(client.chat.completions.create(model="kimi-nano", stream=True, **kwargs))
        else:
            response = client.chat.completions.create(model="kimi-nano", **kwargs)
            message, finish = chat_shape(response.choices[0].message), response.choices[0].finish_reason
        messages.append(message)
        if finish != "tool_calls":
            return messages
        for call in message["tool_calls"]:  # Kimi's guide sends the function's name with each result
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                             "content": run_tool(call, lambda q: "", ["calculator"])})
    raise AssertionError(f"no answer after 3 rounds: {messages}")


def test_tool_loop_calculator_then_answer(client, capsys, tmp_path):
    plain, streamed = _tool_loop(client, stream=False), _tool_loop(client, stream=True)
    assert plain == streamed
    call = plain[1]["tool_calls"][0]
    assert call["id"] == "functions.calculator:0" and json.loads(call["function"]["arguments"]) == {"expression": "17*23"}
    assert plain[2]["content"] == "391" and "391" in plain[3]["content"]
    messages, _ = run_chat(capsys, tmp_path, "--prompt", "What is 17*23?", "--temperature", "0",
                           "--max-new-tokens", "64")
    assert plain == messages


def test_stop_strings_cut_the_answer(client):
    # kimi-nano answers a greeting in words when its calculator is declared (it was never trained without it)
    hello = {"messages": [{"role": "user", "content": "Hello!"}], "tools": NANO_TOOLS}
    full = client.chat.completions.create(model="kimi-nano", **hello, max_tokens=40, seed=1, **SAMPLING)
    content = full.choices[0].message.content
    assert len(content) > 4, full
    stop = content[len(content) // 2:len(content) // 2 + 2]
    cut = ask_both(client, **hello, max_tokens=40, seed=1, stop=[stop, "never in it"])
    assert cut.choices[0].message.content == content[:content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.model_extra["reasoning_content"] == full.choices[0].message.model_extra[
        "reasoning_content"], "stop strings apply to the answer, not the reasoning"
    capped = client.chat.completions.create(model="kimi-nano", messages=CARD, max_completion_tokens=3, seed=1)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 3


def test_models_and_health(client, server):
    (card,) = client.models.list().data
    assert card.id == "kimi-nano" and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve("kimi-nano").id == "kimi-nano"
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "kimi-nano"


# ---- bad requests: an OpenAI-shaped error naming the field, and the server keeps serving ---------------------

def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.base_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "functions.calculator:0", "type": "function",
     "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}
BAD_REQUESTS = {
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "tool result without its call": ({"messages": [USER, CALL, {"role": "tool", "tool_call_id": "functions.calculator:7",
                                                                  "content": "2"}]}, 400, "messages[2].tool_call_id"),
    "tool result with no call at all": ({"messages": [USER, {"role": "tool", "tool_call_id": "x:0", "content": "2"}]},
                                        400, "messages[1].tool_call_id"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "seven " * MAX_MODEL_LEN}]}, 400, "messages"),
    "max_tokens over the context": ({"messages": [USER], "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    "image that does not decode": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]},
        400, "messages[0].content[0].image_url"),
    "broken base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400, "messages[0].content[0].image_url"),
    "remote image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400,
        "messages[0].content[0].image_url"),
    "local file outside the folder": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, 400, "messages[0].content[0].image_url"),
    "tool_choice required": ({"messages": [USER], "tools": NANO_TOOLS, "tool_choice": "required"}, 400, "tool_choice"),
    "tool_choice naming a function": ({"messages": [USER], "tools": NANO_TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "calculator"}}}, 400, "tool_choice"),
    "n > 1": ({"messages": [USER], "n": 2}, 400, "n"),
    "unknown field": ({"messages": [USER], "max_token": 5}, 400, "max_token"),
    "temperature out of range": ({"messages": [USER], "temperature": 7}, 400, "temperature"),
    "stop that is not text": ({"messages": [USER], "stop": [3]}, 400, "stop[0]"),
    "no messages": ({"messages": []}, 400, "messages"),
    "a video part": ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a"}}]}]},
                     400, "messages[0].content[0].type"),
    "thinking off for K2.7-Code": ({"messages": [USER], "chat_template_kwargs": {"thinking": False}}, 400,
                                   "chat_template_kwargs.thinking"),
    "unknown model": ({"messages": [USER], "model": "gpt-4o"}, 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_named_and_the_server_keeps_serving(case, server, client):
    body, status, param = BAD_REQUESTS[case]
    got, error = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
    assert got == status and set(error) == {"error"}, error
    assert error["error"]["param"] == param and error["error"]["message"], error
    assert "Traceback" not in error["error"]["message"]
    ok = client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2, seed=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_malformed_json_oversize_bodies_and_unknown_routes(server, client):
    status, error = raw(server, "POST", "/v1/chat/completions", b'{"messages": [', {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, error = raw(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "must be a JSON object" in error["error"]["message"]
    # Too large, sent by the openai client itself: it reads a 413, not a reset connection.
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="kimi-nano", max_tokens=1,
                                       messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    status, error = raw(server, "GET", "/v1/embeddings")
    assert status == 404 and error["error"]["type"] == "not_found_error"
    status, error = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in error
    assert client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=1).choices


# ---- one at a time: a bounded queue, and a client that leaves stops its generation --------------------------

def _status(server) -> dict:
    return raw(server, "GET", "/health")[1]


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# A generation that would run for a minute unless stopped: <|im_end|> ignored, a large max_tokens, and tools
# declared (without tools, <|tool_calls_section_begin|> would end it).
ENDLESS = dict(model="kimi-nano", messages=[USER], max_tokens=MAX_MODEL_LEN - 64, tools=NANO_TOOLS, seed=0,
               extra_body={"ignore_eos": True})


def test_queue_is_bounded_and_a_closed_stream_stops_its_generation(server, client):
    before = _status(server)
    stream = client.chat.completions.create(stream=True, **ENDLESS)
    next(iter(stream))
    _wait_for(lambda: _status(server)["running"] == 1)
    waiting: dict = {}
    queued = threading.Thread(target=lambda: waiting.setdefault(
        "r", client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2, seed=0)))
    queued.start()
    _wait_for(lambda: _status(server)["waiting"] == 1)
    with pytest.raises(openai.APIStatusError) as full:  # --max-queue 1: a third request is refused at once
        client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2)
    assert full.value.status_code == 503 and full.value.body["code"] == "queue_full"
    stream.close()  # the client leaves: its generation stops, the waiting request runs
    queued.join(timeout=30)
    assert not queued.is_alive() and waiting["r"].choices[0].finish_reason in ("stop", "length")
    _wait_for(lambda: _status(server)["running"] == 0)  # the answer is sent a moment before the engine is free
    assert _status(server)["cancelled"] == before["cancelled"] + 1


def test_a_plain_request_whose_client_leaves_is_stopped(server):
    before = _status(server)
    host, port = server.base_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"messages": [USER], "ignore_eos": True, "max_tokens": ENDLESS["max_tokens"], "tools": NANO_TOOLS}
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    _wait_for(lambda: _status(server)["running"] == 1)
    conn.close()
    _wait_for(lambda: _status(server)["running"] == 0, timeout=10)
    assert _status(server)["cancelled"] == before["cancelled"] + 1


class _FailingModel:
    """The served model, except that every forward fails (as an out-of-memory would)."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")


def test_a_failed_generation_is_a_500_and_the_server_goes_on(server, client, monkeypatch):
    monkeypatch.setattr(server.engine, "model", _FailingModel(server.engine.model))
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2)
    assert caught.value.body["message"] == "the generation failed: RuntimeError: out of memory (simulated)"
    with pytest.raises(openai.APIError, match="out of memory"):  # streamed: an error event after the headers
        collect(client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2, stream=True))
    monkeypatch.undo()
    assert client.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=2).choices


def test_api_key(server):
    from kimi_ref.serve import start

    with start(model=server.engine.model, api_key="sesame") as guarded:
        denied = openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
        allowed = openai.OpenAI(base_url=guarded.base_url, api_key="sesame", max_retries=0, timeout=30)
        assert allowed.chat.completions.create(model="kimi-nano", messages=[USER], max_tokens=1).choices


# ---- TP 2 on gloo: the command line, rank 0 serving, rank 1 following ----------------------------------------

def test_tp2_gives_the_tokens_of_tp1(png):
    # float32 on both sides: bf16 sums the two ranks' partial products with errors near 1e-2, which can move a
    # sampled token across a boundary; float32's near 1e-6 cannot at these seeds (as in the chat's TP test).
    from kimi_ref.serve import start

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_ref.serve", "--tp", "2", "--device", "cpu", "--port", "0",
                             "--dtype", "float32", "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    tp1 = start(dtype="float32")
    client = openai.OpenAI(base_url=tp1.base_url, api_key="none", max_retries=0, timeout=60)
    try:
        lines: list[str] = []  # the "serving ..." line, printed once the server listens (waited for, with a limit)
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        line = lines[0] if lines else "(no line within 120 s)"
        match = re.search(r"serving kimi-nano on (http://127\.0\.0\.1:\d+/v1) \(TP 2, cpu\)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        tp2 = openai.OpenAI(base_url=match.group(1), api_key="none", max_retries=0, timeout=60)
        image = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "What is it?"}]
        answers = []
        for kwargs in (dict(messages=CARD, max_tokens=40, seed=1),
                       dict(messages=[{"role": "user", "content": image}], tools=NANO_TOOLS, max_tokens=24, seed=4)):
            one = client.chat.completions.create(model="kimi-nano", **kwargs)
            two = tp2.chat.completions.create(model="kimi-nano", **kwargs)
            answers.append(chat_shape(one.choices[0].message))
            assert chat_shape(two.choices[0].message) == answers[-1]
            assert two.usage.model_dump() == one.usage.model_dump()
        streamed, _, _ = collect(tp2.chat.completions.create(model="kimi-nano", stream=True, messages=CARD,
                                                             max_tokens=40, seed=1))
        assert streamed == answers[0]
        proc.send_signal(signal.SIGINT)  # Ctrl-C: rank 0 stops serving and tells rank 1 to exit
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        tp1.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answer_after_heartbeats(tp, device, ckpt):
    """Every rank: rank 0 idles through many heartbeats, then answers one request; the others follow."""
    import queue

    from kimi_ref.checkpoint import load_model
    from kimi_ref.config import load_config
    from kimi_ref.serve.engine import Engine, Job, follow
    from kimi_ref.serve.prompt import Defaults, PromptBuilder
    from kimi_ref.serve.turn import Answer
    from kimi_ref.tokenizer import Tokenizer

    model = load_model(ckpt, device=device, dtype="float32", tp=tp, progress=False)
    if tp.rank != 0:
        follow(model, tp, device)
        return None
    tok = Tokenizer.from_pretrained(ckpt)
    builder = PromptBuilder(tok, load_config(ckpt), ckpt, "k2.7-code", 4096, Defaults(1.0, 0.95, 24))
    engine = Engine(model, tok, tp, device, max_queue=1, heartbeat_s=0.02)
    engine.start()
    deadline = time.monotonic() + 30  # some NOOP headers first: the followers must read each one and stay in step
    while engine.heartbeats < 5 and tp.world_size > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    events: queue.Queue = queue.Queue()
    engine.submit(Job(builder.prepare(parse_chat_request(json.dumps({"messages": CARD, "seed": 1}).encode())),
                      events.put))
    while not isinstance(event := events.get(timeout=60), Answer):
        pass
    engine.close()
    return event.message, event.usage, engine.heartbeats


def test_followers_keep_step_through_heartbeats():
    from kimi_ref.launch import launch

    *one, none = launch(_answer_after_heartbeats, 1, "cpu", str(NANO_DIR))
    *two, heartbeats = launch(_answer_after_heartbeats, 2, "cpu", str(NANO_DIR), timeout_s=60)
    assert two == one and one[0].content is not None
    assert none == 0 and heartbeats >= 5, "an idle rank 0 sends heartbeats, and only with followers to hear them"


def test_command_line_refusals(capsys):
    from kimi_ref.serve import main

    assert main(["--tp", "3"]) == 2 and "--tp 3 does not divide the model" in capsys.readouterr().err
    assert main(["--variant", "k9"]) == 2 and "--variant 'k9'" in capsys.readouterr().err
    assert main(["--allowed-local-media-path", "/nonexistent"]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:  # without the extra: what to install, not a traceback
        patch.setitem(sys.modules, "uvicorn", None)
        assert main([]) == 2 and "pip install -e '.[serve]'" in capsys.readouterr().err


# ---- pieces without a server ----------------------------------------------------------------------------------

@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=3), max_size=3),
       st.lists(st.integers(0, 30), max_size=6))
def test_stop_matcher_cuts_at_the_first_stop_however_the_text_arrives(text, stops, cuts):
    matcher = StopMatcher(stops)
    pieces, start = [], 0
    for cut in sorted(cuts) + [len(text)]:
        pieces.append(matcher.feed(text[start:max(start, cut)]))
        start = max(start, cut)
    pieces.append(matcher.flush())
    hits = [text.find(s) for s in stops if s in text]
    assert "".join(pieces) == (text[:min(hits)] if hits else text)
    assert matcher.matched == bool(hits)


def test_request_fields_are_checked_by_name():
    ok = parse_chat_request(json.dumps({"messages": [{"role": "developer", "content": "be brief"}, USER],
                                        "max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "user": "me",
                                        "thinking": {"type": "enabled"}}).encode())
    assert ok.messages[0]["role"] == "system" and ok.max_tokens == 7 and ok.stop == ["x"] and ok.thinking is True
    for body, param in [({"messages": [USER], "stream": "yes"}, "stream"),
                        ({"messages": [USER], "seed": 1.5}, "seed"),
                        ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
                        ({"messages": [USER], "top_p": 0}, "top_p"),
                        ({"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options"),
                        ({"messages": [USER], "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
                        ({"messages": [USER], "chat_template_kwargs": {"effort": 1}}, "chat_template_kwargs.effort"),
                        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
                        ({"messages": [CALL | {"tool_calls": [{"id": "a:0", "function": {"name": "f", "arguments": {}}}]}]},
                         "messages[0].tool_calls[0].function.arguments")]:
        with pytest.raises(RequestError) as caught:
            parse_chat_request(json.dumps(body).encode())
        assert caught.value.param == param and caught.value.status == 400, caught.value.message


def test_the_answer_budget():
    from kimi_ref.config import load_config
    from kimi_ref.serve.prompt import Defaults, PromptBuilder
    from kimi_ref.tokenizer import Tokenizer

    tok, config = Tokenizer.from_pretrained(NANO_DIR), load_config(NANO_DIR)
    request = parse_chat_request(json.dumps({"messages": [USER]}).encode())
    prompt = len(PromptBuilder(tok, config, NANO_DIR, "k2.7-code", 4096, Defaults(1.0, 0.95, 7)).prepare(request).ids)
    for limit, default, budget in [(4096, 7, 7), (prompt + 3, 7, 3), (4096, None, 4096 - prompt)]:
        builder = PromptBuilder(tok, config, NANO_DIR, "k2.7-code", limit, Defaults(1.0, 0.95, default))
        assert builder.prepare(request).max_new_tokens == budget
    with pytest.raises(RequestError) as caught:
        PromptBuilder(tok, config, NANO_DIR, "k2.7-code", prompt, Defaults(1.0, 0.95, 7)).prepare(request)
    assert caught.value.code == "context_length_exceeded"


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2 ** 70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=12)
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "video", 3])},
                              optional={"text": _JSON | st.text(max_size=8), "image_url": _JSON | st.fixed_dictionaries(
                                  {"url": st.sampled_from(["data:image/png;base64,AAAA", "data:,x", "x.png",
                                                           "http://h/x.png", "file:///etc/passwd"])})})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "system", "developer", "x", None])},
                                 optional={"content": st.none() | st.text(max_size=12) | st.lists(_PART, max_size=2) | _JSON,
                                           "tool_call_id": _JSON, "name": _JSON, "reasoning_content": _JSON,
                                           "tool_calls": st.lists(_JSON, max_size=2) | _JSON})
_BODY = st.fixed_dictionaries({"messages": st.lists(_MESSAGE, max_size=3) | _JSON},
                              optional={key: _JSON for key in ("max_tokens", "temperature", "top_p", "seed", "stop",
                                                               "tools", "tool_choice", "stream", "stream_options",
                                                               "chat_template_kwargs", "thinking", "n")})


@pytest.fixture(scope="module")
def builder(media_dir):
    from kimi_ref.config import load_config
    from kimi_ref.serve.prompt import Defaults, PromptBuilder
    from kimi_ref.tokenizer import Tokenizer

    return PromptBuilder(Tokenizer.from_pretrained(NANO_DIR), load_config(NANO_DIR), NANO_DIR, "k2.7-code", 64,
                         Defaults(1.0, 0.95, 8), media_dir)


@given(st.one_of(_BODY, _JSON, st.binary(max_size=40)))
def test_any_body_is_a_request_or_a_named_refusal(builder, body):
    """Random JSON, random bytes and near-valid requests: a prepared generation, or a RequestError; nothing else."""
    raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        prepared = builder.prepare(parse_chat_request(raw_body))
    except RequestError as e:
        assert e.message and 400 <= e.status < 500
        return
    assert 1 <= prepared.max_new_tokens and prepared.prompt_tokens + prepared.max_new_tokens <= 64


def test_the_checkpoint_decides_the_servers_variant_and_sampling(tmp_path, capsys):
    """As for the chat (issue 22): a K2-Thinking-layout checkpoint is served with its own template variant,
    and generation_config.json sets the defaults; flags still win."""
    from kimi_ref.serve import cli
    from weights_tools.make_tiny import make_tiny

    ckpt = make_tiny(tmp_path / "flat", layout="flat")
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    settings = cli._settings(cli._parser().parse_args(["--ckpt", str(ckpt), "--port", "0", "--device", "cpu"]))
    assert (settings.variant, settings.temperature, settings.top_p) == ("k2-thinking", 0.6, 0.9)
    assert "variant k2-thinking" in capsys.readouterr().err
    settings = cli._settings(cli._parser().parse_args(["--ckpt", str(ckpt), "--port", "0", "--device", "cpu",
                                                       "--temperature", "0", "--variant", "k2.5"]))
    assert (settings.variant, settings.temperature, settings.top_p) == ("k2.5", 0.0, 0.9)
    assert (settings.eos_token_ids, settings.max_length) == ((), None)


def test_generation_config_eos_ids_and_max_length_bind_the_server(tmp_path):
    """generation_config.json's eos_token_id ends a served answer beside <|im_end|> (not under ignore_eos),
    and its max_length caps prompt + answer below --max-model-len, named as the cap in the refusal."""
    from kimi_ref.config import load_config
    from kimi_ref.serve import cli
    from kimi_ref.serve.prompt import Defaults, PromptBuilder
    from kimi_ref.serve.server import ServeSettings, context_limit
    from kimi_ref.tokenizer import Tokenizer
    from weights_tools.make_tiny import make_tiny

    ckpt = make_tiny(tmp_path / "flat", layout="flat")
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11], "max_length": 40}))
    settings = cli._settings(cli._parser().parse_args(["--ckpt", str(ckpt), "--port", "0", "--device", "cpu",
                                                       "--max-model-len", "64"]))
    assert (settings.eos_token_ids, settings.max_length, settings.max_model_len) == ((7, 11), 40, 64)
    config = load_config(ckpt)
    assert context_limit(settings, config) == (40, "generation_config.json's max_length (prompt and answer together)")
    assert context_limit(ServeSettings(str(ckpt), max_model_len=32, max_length=40), config)[0] == 32
    assert context_limit(ServeSettings(str(ckpt)), config)[0] == config.max_position_embeddings

    tok = Tokenizer.from_pretrained(ckpt)
    limit, source = context_limit(settings, config)
    builder = PromptBuilder(tok, config, ckpt, "k2-thinking", limit, Defaults(1.0, 0.95, None, (7, 11)),
                            context_from=source)
    request = parse_chat_request(json.dumps({"messages": [USER]}).encode())
    prepared = builder.prepare(request)
    assert {7, 11, tok.special_tokens["<|im_end|>"]} <= set(prepared.stop_ids)
    assert prepared.prompt_tokens + prepared.max_new_tokens == 40
    ignoring = builder.prepare(parse_chat_request(json.dumps({"messages": [USER], "ignore_eos": True}).encode()))
    assert not {7, 11, tok.special_tokens["<|im_end|>"]} & set(ignoring.stop_ids)
    with pytest.raises(RequestError, match="generation_config.json's max_length .* is 40 tokens") as caught:
        builder.prepare(parse_chat_request(json.dumps({"messages": [USER], "max_tokens": 39}).encode()))
    assert caught.value.param == "max_tokens"
