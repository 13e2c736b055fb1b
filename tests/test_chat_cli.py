"""``python -m kimi_ref.chat`` end to end in a subprocess, plus its safe demo tools and file formats.

A random tiny model never closes its reasoning or calls a tool, so the CLI tests use **scripted
checkpoints**: the tiny checkpoint (real layout, INT4 experts, real loader, real TP) with its weights
edited into a bigram machine that, under greedy decoding, writes a chosen text after ``<think>``:

* every ``input_layernorm`` / ``post_attention_layernorm`` gain is 0, so attention and MLP read zeros
  and add nothing: the final hidden state is ``norm(embed[last token])``;
* ``lm_head`` has one non-zero row per step of the script: the row of token b is a large multiple of
  the direction of ``norm(embed[a])``, where a is the token before b. So ``argmax`` after a is b.

The script's tokens must all differ (a bigram knows only the last token). The generation prompt ends
with ``<think>``, so the model writes the script, reasoning first.
"""

from __future__ import annotations

import ast
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kimi_ref.chat import (BUILTIN_TOOLS, ChatError, calculator, current_time, image_part, load_conversation,
                           load_tools, main, run_tool, save_conversation)
from kimi_ref.checkpoint import INDEX_FILE, flat_name
from kimi_ref.config import load_config
from kimi_ref.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
ANSWER_SCRIPT = "Let me think.</think>Hello there!<|im_end|>"
TOOL_SCRIPT = ('Use the tool.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0'
               '<|tool_call_argument_begin|>{"expression": "6*7"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
LOOKUP_SCRIPT = ('Ask them</think><|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0'
                 '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


def scripted_checkpoint(out: Path, script: str, base: Path | None = None) -> Path:
    """Copy a tiny checkpoint to ``out`` and edit it to write ``script`` after ``<think>`` (see module doc)."""
    if base is None:
        from weights_tools.make_tiny import tiny_checkpoint

        base = tiny_checkpoint()
    shutil.copytree(base, out)
    config = load_config(out)
    tok = Tokenizer.from_pretrained(out)
    chain = [tok.special_id("<think>")] + tok.encode(script, allow_special=True)
    assert len(set(chain)) == len(chain), "a bigram script needs distinct tokens"
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    shards: dict[str, dict[str, torch.Tensor]] = {f: load_file(out / f) for f in sorted(set(weight_map.values()))}
    by_key = {flat_name(name, config): (file, name) for name, file in weight_map.items()}

    def tensor(key: str) -> torch.Tensor:
        file, name = by_key[key]
        return shards[file][name]

    for key in by_key:
        if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensor(key).zero_()
    tensor("model.norm.weight").fill_(1.0)
    embed = tensor("model.embed_tokens.weight").float()
    head = tensor("lm_head.weight")
    head.zero_()
    for a, b in zip(chain, chain[1:]):
        h = embed[a] / embed[a].pow(2).mean().sqrt()  # what the final RMSNorm makes of it (gain 1)
        head[b] = (30.0 * h / h.norm()).to(head.dtype)
    for file, tensors in shards.items():
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def answer_ckpt(tmp_path_factory) -> Path:
    return scripted_checkpoint(tmp_path_factory.mktemp("answer") / "ckpt", ANSWER_SCRIPT)


@pytest.fixture(scope="module")
def tool_ckpt(tmp_path_factory) -> Path:
    return scripted_checkpoint(tmp_path_factory.mktemp("tool") / "ckpt", TOOL_SCRIPT)


def chat(*args: str, stdin: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "kimi_ref.chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


# ---- the CLI ------------------------------------------------------------------------------------------


def test_one_shot_prints_reasoning_and_answer(answer_ckpt, tmp_path):
    save = tmp_path / "conv.json"
    r = chat("--ckpt", str(answer_ckpt), "--tp", "2", "--device", "cpu", "--prompt", "Say hello",
             "--temperature", "0", "--max-new-tokens", "32", "--save", str(save))
    assert r.returncode == 0, r.stderr
    assert "[reasoning] Let me think." in r.stdout
    assert "[answer] Hello there!" in r.stdout
    assert r.stdout.index("[reasoning]") < r.stdout.index("[answer]")
    assert "reasoning 5 · answer 3 tokens" in r.stdout  # "Let me think." + </think>; "Hello there!"
    messages, tools = load_conversation(save)
    assert tools == []
    assert messages == [{"role": "user", "content": "Say hello"},
                        {"role": "assistant", "content": "Hello there!", "reasoning_content": "Let me think."}]


def test_piped_multi_turn_keeps_reasoning_in_history(answer_ckpt, tmp_path):
    save = tmp_path / "conv.json"
    r = chat("--ckpt", str(answer_ckpt), "--tp", "2", "--device", "cpu", "--temperature", "0", "--save", str(save),
             stdin="first\n\n/reset\nsecond\nthird\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[answer] Hello there!") == 3
    messages, _ = load_conversation(save)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]  # /reset forgot "first"
    assert [m["content"] for m in messages if m["role"] == "user"] == ["second", "third"]
    prompts = [int(line.split("prompt ")[1].split(" ")[0]) for line in r.stdout.splitlines() if "── prompt" in line]
    # K2.7-Code keeps earlier reasoning: turn 3's prompt holds turn 2's "<think>Let me think.</think>".
    tok = Tokenizer.from_pretrained(answer_ckpt)
    from kimi_ref.chat_template import render_ids

    assert prompts[0] == len(render_ids([{"role": "user", "content": "first"}], tok))
    assert prompts[1] == len(render_ids([{"role": "user", "content": "second"}], tok))
    assert prompts[2] == len(render_ids(messages[:3], tok, preserve_thinking=True))
    assert prompts[2] > prompts[1] + len(tok.encode("Let me think.Hello there!"))
    assert "never read" not in r.stdout


def test_tool_round_trip(tool_ckpt, tmp_path):
    save = tmp_path / "conv.json"
    r = chat("--ckpt", str(tool_ckpt), "--tp", "2", "--device", "cpu", "--temperature", "0", "--tools", "demo",
             "--max-tool-rounds", "1", "--prompt", "What is 6*7?", "--save", str(save))
    assert r.returncode == 0, r.stderr
    assert '[tool call] calculator({"expression": "6*7"})' in r.stdout
    assert "[tool result] functions.calculator:0 -> 42" in r.stdout
    assert "--max-tool-rounds 1 reached" in r.stdout  # the bigram model asks again; the loop is bounded
    messages, tools = load_conversation(save)
    assert [t["function"]["name"] for t in tools] == ["calculator", "current_time"]
    call = {"id": "functions.calculator:0", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
    assert messages[:3] == [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator", "content": "42"},
    ]
    # The saved file continues the conversation: --load renders it back into a prompt.
    r2 = chat("--ckpt", str(tool_ckpt), "--temperature", "0", "--load", str(save), "--max-tool-rounds", "0",
              "--prompt", "and 2+2?", "--save", str(tmp_path / "more.json"))
    assert r2.returncode == 0, r2.stderr
    more, _ = load_conversation(tmp_path / "more.json")
    assert more[:len(messages)] == messages


def test_user_answers_a_tool_that_is_not_built_in(tmp_path, capsys, monkeypatch):
    ckpt = scripted_checkpoint(tmp_path / "ckpt", LOOKUP_SCRIPT)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "lookup", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("sunny, 24 C\n"))
    save = tmp_path / "conv.json"
    assert main(["--ckpt", str(ckpt), "--tools", str(tools), "--temperature", "0", "--max-tool-rounds", "1",
                 "--prompt", "Weather in Paris?", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert 'tool lookup({"city": "Paris"}) — type its result: ' in out
    messages, saved_tools = load_conversation(save)
    assert saved_tools == json.loads(tools.read_text())
    assert messages[2] == {"role": "tool", "tool_call_id": "functions.lookup:0", "name": "lookup",
                           "content": "sunny, 24 C"}


def test_ctrl_c_stops_the_generation_not_the_session():
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    from weights_tools.make_tiny import tiny_checkpoint

    # The random tiny checkpoint: it never says <|im_end|> on purpose, so only Ctrl-C ends this generation.
    proc = subprocess.Popen([sys.executable, "-m", "kimi_ref.chat", "--ckpt", str(tiny_checkpoint()), "--tp", "2",
                             "--device", "cpu", "--max-new-tokens", "100000", "--seed", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        proc.stdin.write("tell me a long story\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("you> ")
        assert proc.stdout.read(len("[reasoning]")) == "[reasoning]"  # streaming has begun
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # rank 0 only, as a terminal's Ctrl-C reaches it (workers ignore it)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    stats = [line for line in out.splitlines() if "── prompt" in line]
    assert len(stats) == 1 and stats[0].endswith("· interrupted"), out[-500:]


def test_default_checkpoint_one_shot():
    # What a fresh install runs: no --ckpt (kimi-nano, shipped in the package), default sampling.
    r = chat("--prompt", "hi", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "kimi-nano" in r.stderr and "[reasoning]" in r.stdout and "── prompt" in r.stdout, r.stdout + r.stderr


def test_tp_that_does_not_divide_is_refused(answer_ckpt):
    r = chat("--ckpt", str(answer_ckpt), "--tp", "3", "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--tp 3 does not divide the model: num_attention_heads = 8" in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "/nonexistent/kimi"], "--ckpt /nonexistent/kimi: no such directory"),
    (["--device", "cuda"], "torch sees no CUDA GPU"),
    (["--tp", "2", "--device", "cuda"], "torch sees no CUDA GPU"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--tools", "/nonexistent/tools.json"], "--tools /nonexistent/tools.json: cannot read the file"),
    (["--variant", "k3"], "--variant 'k3': expected one of"),
    (["--load", "/nonexistent/conv.json"], "/nonexistent/conv.json: cannot read the file"),
])
def test_refusals(args, message, answer_ckpt, capsys):
    # Refusals come before any rank starts, so main() in this process shows exactly what the CLI does.
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base = [] if "--ckpt" in args else ["--ckpt", str(answer_ckpt)]
    extra = [] if "--max-new-tokens" in args else ["--max-new-tokens", "4"]
    assert main([*base, *args, "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimi_ref.chat: error: ") and message in err, err


def test_cpu_threads_default_to_one(answer_ckpt, capsys):
    # kimi-nano's matrices are too small to share between cores: on a busy 2-core machine two threads made
    # one answer take 4-41 s instead of a steady 4-5 s (issue 17). One rank runs in this process.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["--ckpt", str(answer_ckpt), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--ckpt", str(answer_ckpt), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2",
                     "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_missing_checkpoint_pieces_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--ckpt", str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_prompt_over_the_context_is_refused(tmp_path, capsys, monkeypatch):
    from test_parallel import write_tiny

    ckpt = write_tiny(tmp_path / "short", max_position_embeddings=64)
    assert main(["--ckpt", str(ckpt), "--prompt", "word " * 80, "--max-new-tokens", "4"]) == 2
    assert "but the model's context (max_position_embeddings) is 64" in capsys.readouterr().err
    # In the REPL the turn is refused, the history is left as it was and the session goes on.
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 80 + "\nhi\n"))
    save = tmp_path / "conv.json"
    assert main(["--ckpt", str(ckpt), "--max-new-tokens", "2", "--temperature", "0", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "refused: the prompt is" in out and out.count("── prompt") == 1
    assert [m["content"] for m in load_conversation(save)[0] if m["role"] == "user"] == ["hi"]


# ---- images ------------------------------------------------------------------------------------------------
# The plain tiny kimi_k25 checkpoint (random weights, a tiny MoonViT): the scripted ones zero every norm,
# so they would not look at an image. float32, so TP 1 and TP 2 agree to rounding far below any argmax gap.


@pytest.fixture(scope="module")
def vision_ckpt() -> Path:
    from weights_tools.make_tiny import tiny_checkpoint

    return tiny_checkpoint()


def write_png(path: Path, height: int = 40, width: int = 60, seed: int = 0) -> Path:
    """A random RGB PNG; 60×40 pixels pad to 84×56 = 6×4 patches = 3×2 merged rows = 6 LLM tokens."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _image_prompt_length(ckpt: Path, messages: list[dict], rows: int) -> int:
    """What the chat reports as "prompt N": the rendered ids with each image's placeholder expanded."""
    from kimi_ref.chat_template import render_ids

    return len(render_ids(messages, Tokenizer.from_pretrained(ckpt), preserve_thinking=True)) + rows - 1


def test_image_one_shot_same_tokens_at_tp1_and_tp2(vision_ckpt, tmp_path):
    image = write_png(tmp_path / "pic.png")
    user = {"role": "user", "content": [image_part(str(image)), {"type": "text", "text": "What is this?"}]}
    answers = {}
    for tp in (1, 2):
        save = tmp_path / f"tp{tp}.json"
        r = chat("--ckpt", str(vision_ckpt), "--tp", str(tp), "--device", "cpu", "--dtype", "float32",
                 "--image", str(image), "--prompt", "What is this?", "--temperature", "0", "--max-new-tokens", "4",
                 "--save", str(save))
        assert r.returncode == 0, r.stderr
        assert f"[image] {image} · 6×4 patches -> 6 tokens" in r.stdout, r.stdout
        assert f"── prompt {_image_prompt_length(vision_ckpt, [user], 6)} ·" in r.stdout, r.stdout
        messages, _ = load_conversation(save)
        assert messages[0] == user, "--save keeps the image part, its url the image's path"
        assert messages[1]["role"] == "assistant" and len(messages) == 2
        answers[tp] = messages[1]
    assert answers[1] == answers[2]


def test_image_rides_with_the_first_repl_line_and_every_later_prefill(vision_ckpt, tmp_path, capsys, monkeypatch):
    image = write_png(tmp_path / "pic.png")
    save = tmp_path / "conv.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    assert main(["--ckpt", str(vision_ckpt), "--dtype", "float32", "--image", str(image), "--temperature", "0",
                 "--max-new-tokens", "2", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert out.count("[image]") == 1
    messages, _ = load_conversation(save)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [image_part(str(image)), {"type": "text", "text": "first"}]
    assert messages[2]["content"] == "second"
    # Both prefills count the image's 6 rows: the second turn re-reads the whole conversation.
    lengths = [_image_prompt_length(vision_ckpt, messages[:1], 6), _image_prompt_length(vision_ckpt, messages[:3], 6)]
    assert [line.split(" · ")[0] for line in out.splitlines() if "── prompt" in line] == \
        [f"── prompt {n}" for n in lengths]
    # --load brings the image back (from its saved path) for the next prefill.
    assert main(["--ckpt", str(vision_ckpt), "--dtype", "float32", "--load", str(save), "--prompt", "third",
                 "--temperature", "0", "--max-new-tokens", "1"]) == 0
    messages.append({"role": "user", "content": "third"})
    assert f"── prompt {_image_prompt_length(vision_ckpt, messages, 6)} ·" in capsys.readouterr().out


def test_image_sources_path_file_url_and_data_url_agree(vision_ckpt, tmp_path):
    import base64

    from kimi_ref.media import ImageTable, MediaError, message_images, open_source

    image = write_png(tmp_path / "pic.png")
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    sources = [str(image), image.as_uri(), data_url]
    table = ImageTable(sources + [str(image)], vision_ckpt)
    assert table.sources == sources, "duplicates are preprocessed once"
    (pv, grid), *others = table.entries
    assert grid == (1, 4, 6)
    for other_pv, other_grid in others:
        assert other_grid == grid and torch.equal(other_pv, pv)
    media = table.media(table.indices([data_url, str(image)]))
    assert media[1] == [grid, grid] and torch.equal(media[0], torch.cat([pv, pv]))
    assert table.media([]) is None
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "y"}, {"role": "user", "content": [image_part("b.png")]}]
    assert message_images(messages) == ["a.png", "b.png"]
    with pytest.raises(MediaError, match="only base64 data: URLs"):
        ImageTable(["data:image/png,abc"], vision_ckpt)
    for no_payload in ("data:image/png;base64", "data:"):  # no comma: nothing to decode, said so
        with pytest.raises(MediaError, match="only base64 data: URLs are supported, like data:image/png;base64"):
            open_source(no_payload)
    with pytest.raises(MediaError, match="https://example.com/cat.png: send it inline"):
        open_source("https://example.com/cat.png", remote="send it inline")
    with pytest.raises(MediaError, match="must name its image as a string"):
        message_images([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def _no_preprocessor(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "no_pre"
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    return out


def _flat(ckpt: Path, tmp_path: Path) -> Path:
    from weights_tools.make_tiny import tiny_checkpoint

    return tiny_checkpoint("flat")


def _remote_image_history(tmp_path: Path) -> list[str]:
    conv = tmp_path / "remote.json"
    save_conversation(conv, [{"role": "user", "content": [image_part("https://example.com/cat.png")]},
                             {"role": "assistant", "content": "a cat"}])
    return ["--load", str(conv)]


@pytest.mark.parametrize("case, message", [
    ("flat", "has no vision tower (its config.json has no vision_config"),
    ("missing", "image: no image file at "),
    ("not_an_image", "is not an image Pillow can read"),
    ("no_preprocessor", "preprocessor_config.json: not found; images need the checkpoint's preprocessor_config.json"),
    ("remote", "the chat does not download images"),
])
def test_image_refusals(case, message, vision_ckpt, tmp_path, capsys):
    ckpt, image = vision_ckpt, write_png(tmp_path / "pic.png")
    extra: list[str] = []
    if case == "flat":
        ckpt = _flat(ckpt, tmp_path)
    elif case == "missing":
        image = tmp_path / "nope.png"
    elif case == "not_an_image":
        image = tmp_path / "notes.png"
        image.write_text("not a picture")
    elif case == "no_preprocessor":
        ckpt = _no_preprocessor(ckpt, tmp_path)
    elif case == "remote":
        extra = _remote_image_history(tmp_path)
    args = ["--ckpt", str(ckpt), "--image", str(image), *extra, "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimi_ref.chat: error: ") and message in err and "Traceback" not in err, err


def test_image_prompt_over_the_context_is_refused(tmp_path, capsys):
    from test_parallel import write_tiny

    ckpt = write_tiny(tmp_path / "short", max_position_embeddings=64)
    small = write_png(tmp_path / "small.png", 28, 28)              # 1 row: the prompt fits
    big = write_png(tmp_path / "big.png", 224, 224)                # 8×8 = 64 rows: it cannot
    args = ["--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0"]
    assert main([*args, "--image", str(small)]) == 0
    capsys.readouterr()
    assert main([*args, "--image", str(big)]) == 2
    err = capsys.readouterr().err
    assert "but the model's context (max_position_embeddings) is 64" in err, err


# ---- built-in tools ------------------------------------------------------------------------------------

_int = st.integers(-50, 50).map(str)


def _expr(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "//", "%", "/"]), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        children.map(lambda c: f"-{c}"),
    )


@given(st.recursive(_int, _expr, max_leaves=8))
def test_calculator_agrees_with_python_arithmetic(expression):
    # The reference evaluates the same AST with Python itself (in the test only; chat never evals).
    try:
        expected = eval(compile(ast.parse(expression, mode="eval"), "<test>", "eval"), {"__builtins__": {}})
    except ZeroDivisionError:
        assert calculator(expression) == "error: calculator: division by zero"
        return
    assert calculator(expression) == str(expected)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only numbers"),
    ("x + 1", "only numbers"),
    ("(1).real", "only numbers"),
    ("2 ** 100000", "result too large"),
    ("1 +", "is not arithmetic"),
    ("'a' * 3", "only numbers"),
    ("1e308 * 10", "not a finite number"),
    ("1" * 2000, "at most 1000"),
])
def test_calculator_refuses_everything_else(expression, message):
    result = calculator(expression)  # a result the model reads, never an exception
    assert result.startswith("error: calculator: ") and message in result, result


def test_current_time():
    now = datetime.datetime.fromisoformat(current_time())
    assert now.tzinfo is not None and abs((now - datetime.datetime.now().astimezone()).total_seconds()) < 60
    assert datetime.datetime.fromisoformat(current_time("UTC")).utcoffset() == datetime.timedelta(0)
    assert current_time("Mars/Base").startswith("error: current_time: unknown timezone 'Mars/Base'")


def test_run_tool_reports_errors_to_the_model():
    def call(name, arguments):
        return {"id": f"functions.{name}:0", "type": "function", "function": {"name": name, "arguments": arguments}}

    assert run_tool(call("calculator", '{"expression": "1/0"}'), input) == "error: calculator: division by zero"
    assert run_tool(call("calculator", "{not json"), input).startswith("error: the arguments are not valid JSON")
    assert run_tool(call("calculator", "[1]"), input).startswith("error: the arguments must be a JSON object")
    assert run_tool(call("calculator", '{"expr": "1"}'), input).startswith("error: calculator was called with ['expr']")
    assert run_tool(call("current_time", ""), input)  # no arguments at all is fine
    assert set(BUILTIN_TOOLS) == {"calculator", "current_time"}


def test_tools_file_and_conversation_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"type": "function", "function": {}}]')
    with pytest.raises(ChatError, match="tool 0 must look like"):
        load_tools(str(bad))
    bad.write_text("{")
    with pytest.raises(ChatError, match="not valid JSON"):
        load_tools(str(bad))
    assert [t["function"]["name"] for t in load_tools("demo")] == ["calculator", "current_time"]
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi", "reasoning_content": "r"}]
    save_conversation(tmp_path / "c.json", messages, load_tools("demo"))
    assert load_conversation(tmp_path / "c.json") == (messages, load_tools("demo"))
    (tmp_path / "list.json").write_text(json.dumps(messages))
    assert load_conversation(tmp_path / "list.json") == (messages, [])
    (tmp_path / "x.json").write_text('{"messages": [1]}')
    with pytest.raises(ChatError, match="OpenAI chat format"):
        load_conversation(tmp_path / "x.json")


def test_printer_keeps_sections_apart():
    from kimi_ref.session import _Printer

    out = io.StringIO()
    printer = _Printer(out)
    for d in [{"type": "reasoning", "text": "hm"}, {"type": "reasoning", "text": "m."}, {"type": "content", "text": "Hi"},
              {"type": "tool_call", "index": 0, "id": "functions.a:0", "name": "a"}, {"type": "arguments", "index": 0, "text": "{}"},
              {"type": "tool_call", "index": 1, "id": "functions.b:1", "name": "b"}, {"type": "arguments", "index": 1, "text": "{\"x\": 1}"}]:
        printer.delta(d)
    printer.end()
    assert out.getvalue() == '[reasoning] hmm.\n[answer] Hi\n[tool call] a({})\n[tool call] b({"x": 1})\n'
