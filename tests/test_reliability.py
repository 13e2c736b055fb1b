"""Nothing lost, nothing hung (issue 16): every case of docs/reliability.md, proved.

* writes: no overwrite without --force, never into a checkpoint being read, atomic, --force replaces a
  checkpoint as a whole; a read-only directory gives every writing command a one-line error;
* the tool loop: a bounded calculator, cut-off / malformed / undeclared calls answered, not run;
* the parser: misplaced markers reported and shown marked;
* command lines: one line, exit codes 2 / 1 / 130; verify --scan; load_model's dtype and device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_ref.chat import load_conversation, main as chat_main
from kimi_ref.checkpoint import INDEX_FILE, CheckpointError
from kimi_ref.tool_parsing import StreamParser, parse
from kimi_ref.tools import calculator, run_tool
from test_chat_cli import LOOKUP_SCRIPT, TOOL_SCRIPT, chat, scripted_checkpoint
from weights_tools import dequantize, inspect, make_demo_vocab, make_tiny, train_nano, verify
from weights_tools.safe_write import OutputError, write_file

REPO = Path(__file__).resolve().parents[1]
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (and the parent's other entries) -> a digest: to prove nothing changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    """Temporary names safe_write leaves only if it failed to clean up."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A fresh tiny checkpoint per test (they are damaged or replaced here)."""
    return make_tiny.make_tiny(tmp_path / "ckpt")


def one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), err


# ---- writes ------------------------------------------------------------------------------------------------


def test_dequantize_never_writes_into_the_checkpoint(tiny, capsys):
    before = snapshot(tiny)
    shard = sorted(tiny.glob("*.safetensors"))[1]
    for target, extra in ((tiny / "config.json", []), (shard, ["--force"]), (tiny / "new.safetensors", [])):
        assert dequantize.main([str(tiny), "--layer", "1", "--expert", "0", "--out", str(target), *extra]) == 2
        one_error_line(capsys.readouterr().err, str(target), "inside the checkpoint directory")
    assert snapshot(tiny) == before


def test_dequantize_failing_half_way_changes_nothing(tiny, tmp_path, monkeypatch, capsys):
    before = snapshot(tiny)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # some bytes, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dequantize, "save_file", half_written)
    out = tmp_path / "out" / "e.safetensors"
    out.parent.mkdir()
    assert dequantize.main([str(tiny), "--layer", "1", "--expert", "0", "--out", str(out)]) == 1
    one_error_line(capsys.readouterr().err, str(out), "No space left on device")
    assert snapshot(tiny) == before and list(out.parent.iterdir()) == []


def test_verify_notes_a_shard_the_index_does_not_name(tiny, capsys):
    shutil.copyfile(sorted(tiny.glob("*.safetensors"))[0], tiny / "model-00009-of-000009.safetensors")
    assert verify.main([str(tiny)]) == 0  # loading ignores it, so the checkpoint is sound ...
    out = capsys.readouterr().out
    assert f"note: {tiny / 'model-00009-of-000009.safetensors'} is on disk but not in the index" in out  # ... but said


def test_dequantize_out_needs_force_to_replace(tiny, tmp_path, capsys):
    out = tmp_path / "expert.safetensors"
    out.write_text("mine")
    assert dequantize.main([str(tiny), "--layer", "1", "--expert", "0", "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, str(out), "already exists (pass --force")
    assert out.read_text() == "mine"
    assert dequantize.main([str(tiny), "--layer", "1", "--expert", "0", "--out", str(out), "--force"]) == 0
    assert sorted(load_file(str(out))) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert oct(out.stat().st_mode & 0o777) == "0o644" and leftovers(tmp_path) == []


def test_make_tiny_force_replaces_the_whole_checkpoint(tiny, tmp_path, capsys):
    (tiny / "README.md").write_text("notes about this checkpoint")
    assert make_tiny.main([str(tiny), "--layout", "flat"]) == 2  # non-empty, no --force
    one_error_line(capsys.readouterr().err, "is not empty (pass --force")
    assert make_tiny.main([str(tiny), "--layout", "flat", "--force"]) == 0
    fresh = make_tiny.make_tiny(tmp_path / "fresh", "flat")
    assert sorted(p.name for p in tiny.iterdir()) == sorted([p.name for p in fresh.iterdir()] + ["README.md"])
    assert (tiny / "README.md").read_text() == "notes about this checkpoint"  # notes are kept; stale shards are not
    assert verify.main([str(tiny)]) == 0
    assert leftovers(tmp_path) == []


def test_force_never_deletes_other_work(tiny, capsys):
    (tiny / "photos").mkdir()
    (tiny / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(tiny)
    assert make_tiny.main([str(tiny), "--force"]) == 2
    one_error_line(capsys.readouterr().err, "not a checkpoint's (photos/)")
    assert snapshot(tiny) == before


def test_an_interrupted_checkpoint_write_leaves_the_old_one_whole(tiny, tmp_path, monkeypatch, capsys):
    before = snapshot(tiny)
    real = make_tiny._write_files

    def half_then_ctrl_c(*args):
        real(*args)              # every file written under the temporary name...
        raise KeyboardInterrupt                      # ...and the rename never happens

    monkeypatch.setattr(make_tiny, "_write_files", half_then_ctrl_c)
    assert make_tiny.main([str(tiny), "--force", "--layout", "flat"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(tiny) == before and leftovers(tmp_path) == []
    assert verify.main([str(tiny)]) == 0


def test_ctrl_c_between_the_two_renames_puts_the_old_checkpoint_back(tiny, tmp_path, monkeypatch):
    from weights_tools import safe_write

    before = snapshot(tiny)
    real = os.replace
    renames = []

    def replace_then_ctrl_c(src, dst):
        renames.append((src, dst))
        real(src, dst)
        if len(renames) == 1:  # the old checkpoint is aside, the new one not yet in place
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        safe_write.write_dir(tiny, lambda d: (d / "config.json").write_text("{}"), force=True)
    monkeypatch.setattr(os, "replace", real)
    assert snapshot(tiny) == before and leftovers(tmp_path) == []


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")

    def fail_half_way(tmp: Path) -> None:
        tmp.write_text("new, but not al")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=f"{path}: cannot write \\(No space left on device\\)"):
        write_file(path, fail_half_way, force=True)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_train_nano_refuses_before_training(tiny, tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("train_nano trained before checking where to write")

    monkeypatch.setattr(train_nano, "train", no_training)
    before = snapshot(tiny)
    assert train_nano.main([str(tiny), "--toy", "--steps", "1", "--batch", "1"]) == 2
    one_error_line(capsys.readouterr().err, str(tiny), "is not empty (pass --force")
    assert snapshot(tiny) == before
    (tmp_path / "file").write_text("x")
    assert train_nano.main([str(tmp_path / "file"), "--toy"]) == 2
    one_error_line(capsys.readouterr().err, "exists and is not a directory")
    assert train_nano.main([str(tmp_path / "new"), "--toy", "--steps", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--steps must be at least 1")
    assert train_nano.main([str(tmp_path / "new"), "--toy", "--average-last", "1.5"]) == 2
    one_error_line(capsys.readouterr().err, "--average-last (average_last) must be a fraction of the steps from 0 to 1, found 1.5")


@pytest.fixture(scope="module")
def answer_ckpt(tmp_path_factory) -> Path:
    return scripted_checkpoint(tmp_path_factory.mktemp("answer") / "ckpt", "Hm.</think>Hello!<|im_end|>")


@pytest.mark.parametrize("where, message", [
    ("/nonexistent/c.json", "the directory /nonexistent does not exist"),
    ("existing", "already exists (pass --force"),
    ("inside", "is inside the checkpoint directory"),
])
def test_chat_save_is_checked_before_the_conversation(answer_ckpt, tmp_path, capsys, where, message):
    target = {"existing": tmp_path / "c.json", "inside": answer_ckpt / "c.json"}.get(where, Path(where))
    if where == "existing":
        target.write_text("{}")
    assert chat_main(["--ckpt", str(answer_ckpt), "--prompt", "hi", "--save", str(target)]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "--save", message)
    assert "[reasoning]" not in captured.out  # refused before any generation
    assert not (answer_ckpt / "c.json").exists()


def test_chat_save_continues_its_own_file_and_reports_failures(answer_ckpt, tmp_path, capsys, monkeypatch):
    conv = tmp_path / "c.json"
    base = ["--ckpt", str(answer_ckpt), "--temperature", "0", "--max-new-tokens", "8", "--no-timings"]
    assert chat_main([*base, "--prompt", "one", "--save", str(conv)]) == 0
    assert chat_main([*base, "--prompt", "two", "--load", str(conv), "--save", str(conv)]) == 0  # its own file
    assert [m["content"] for m in load_conversation(conv)[0] if m["role"] == "user"] == ["one", "two"]
    capsys.readouterr()

    import kimi_ref.session as session_module  # Session saves through it after every turn

    def disk_full(*args, **kwargs):
        raise OutputError(f"--save {conv}: cannot write (No space left on device)")

    monkeypatch.setattr(session_module, "save_conversation", disk_full)
    monkeypatch.setattr(sys, "stdin", io.StringIO("three\nfour\n"))
    assert chat_main([*base, "--load", str(conv), "--save", str(conv)]) == 1  # the REPL went on; the exit says so
    out = capsys.readouterr().out
    assert out.count("[answer] Hello!") == 2 and out.count("(not saved: --save") == 2, out


# ---- a read-only filesystem ----------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A directory nobody may write into: a read-only tmpfs as root, chmod 555 otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_every_writing_command_on_a_read_only_directory(read_only, tiny, answer_ckpt, capsys):
    mains = [
        (make_tiny.main, [str(read_only / "x")]),
        (make_tiny.main, [str(read_only)]),
        (dequantize.main, [str(tiny), "--layer", "1", "--expert", "0", "--out", str(read_only / "e.safetensors")]),
        (train_nano.main, [str(read_only / "nano"), "--toy", "--steps", "1", "--batch", "1"]),
        (make_demo_vocab.main, [str(read_only / "tok")]),
        (chat_main, ["--ckpt", str(answer_ckpt), "--prompt", "hi", "--save", str(read_only / "c.json")]),
    ]
    for fn, args in mains:
        assert fn(args) == 2, (fn.__module__, args)
        err = capsys.readouterr().err
        one_error_line(err, str(read_only))
        assert "not writable" in err or "Read-only" in err or "Permission denied" in err, err
    for script in ("bench_kernels.py", "bench_nano_digits.py"):
        extra = ["--smoke"] if script == "bench_kernels.py" else []
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *extra, "--out", str(read_only / "t.md")],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 2, r.stderr
        one_error_line(r.stderr, str(read_only), "not writable")
    assert list(read_only.iterdir()) == []


# ---- the tool loop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, message", [
    ("(9**9999)**9999", "result too large"),
    ("10**5000", "result too large"),
    ("-" * 999 + "1", "nested too deeply"),
    ("2**10**900", "result too large"),
    ("factorial(10**6)", "result too large"),
    ("factorial(3000)", "result too large"),
    ("(10**999)*(10**999)", "result too large"),
    ("9**9**9", "result too large"),
])
def test_calculator_is_bounded_and_never_raises(expression, message):
    start = time.perf_counter()
    result = calculator(expression)
    assert time.perf_counter() - start < 1.0
    assert result.startswith("error: calculator: ") and message in result, result
    call = {"id": "functions.calculator:0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
    assert run_tool(call, ask=None) == result  # the model reads the same line


def test_calculator_still_computes_exactly():
    assert calculator("2**3000 // 2**2990") == "1024"
    assert calculator("factorial(20)") == "2432902008176640000"
    assert calculator("sqrt(144) + abs(-3)") == "15"
    assert calculator("9**999") == str(9**999)


def test_an_undeclared_tool_is_answered_without_asking():
    def ask(question):
        raise AssertionError("the user was asked for a tool nobody declared")

    call = {"id": "functions.lookup:0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    assert run_tool(call, ask, declared=["calculator"]) == \
        "error: there is no tool named 'lookup'; the tools here are calculator"
    assert run_tool(call, ask, declared=[]).startswith("error: there is no tool named 'lookup'; no tools are declared")
    assert run_tool({"function": None}, ask).startswith("error: malformed tool call")


def test_piped_chat_never_reads_a_user_line_as_a_tool_result(tmp_path):
    ckpt = scripted_checkpoint(tmp_path / "ckpt", LOOKUP_SCRIPT)
    save = tmp_path / "c.json"
    r = chat("--ckpt", str(ckpt), "--tools", "demo", "--temperature", "0", "--max-tool-rounds", "1",
             "--save", str(save), stdin="Weather in Paris?\nHi\n")
    assert r.returncode == 0, r.stderr
    messages, _ = load_conversation(save)
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert results and all(c.startswith("error: there is no tool named 'lookup'") for c in results), results
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Weather in Paris?", "Hi"]
    assert "type its result" not in r.stdout


def test_a_cut_off_tool_call_is_reported_not_run(tmp_path):
    from kimi_ref.tokenizer import Tokenizer

    ckpt = scripted_checkpoint(tmp_path / "ckpt", TOOL_SCRIPT)
    whole_call = TOOL_SCRIPT[: TOOL_SCRIPT.index(CE)]  # the arguments are complete; <|tool_call_end|> never comes
    n = len(Tokenizer.from_pretrained(ckpt).encode(whole_call, allow_special=True))
    save = tmp_path / "c.json"
    r = chat("--ckpt", str(ckpt), "--tools", "demo", "--temperature", "0", "--max-new-tokens", str(n),
             "--prompt", "What is 6*7?", "--save", str(save))
    assert r.returncode == 0, r.stderr
    assert "(not running 1 tool call(s): the output was cut off" in r.stdout
    results = [m["content"] for m in load_conversation(save)[0] if m["role"] == "tool"]
    assert results == ["error: not run: the output was cut off before it ended (--max-new-tokens)"]


def test_a_malformed_tool_call_is_reported_not_run(tmp_path):
    script = ('Use it.</think>' + SB + CB + 'functions.calculator:0' + AB + '{"expression": "6*7"}' + SE + "<|im_end|>")
    ckpt = scripted_checkpoint(tmp_path / "ckpt", script)
    save = tmp_path / "c.json"
    r = chat("--ckpt", str(ckpt), "--tools", "demo", "--temperature", "0", "--max-tool-rounds", "1",
             "--prompt", "What is 6*7?", "--save", str(save))
    assert r.returncode == 0, r.stderr
    results = [m["content"] for m in load_conversation(save)[0] if m["role"] == "tool"]
    assert results == [f"error: not run: it is not closed by {CE}"]
    assert "-> 42" not in r.stdout


def test_malformed_calls_are_named_by_the_parser():
    parser = StreamParser()
    parser.feed("r</think>" + SB + CB + "functions.f:0" + AB + '{"a": 1}' + CB + "functions.g:1" + AB + "{bad" + CE
                + CB + "functions.h:2" + AB + "{}" + CE + CB + "functions.k:3" + AB + '{"x"')
    parser.finish()
    assert parser.malformed_calls() == {0: f"it is not closed by {CE}", 1: "its arguments are not valid JSON",
                                        3: "the output ended before the call did"}


# ---- the parser: misplaced markers --------------------------------------------------------------------------


def test_a_second_end_of_thinking_is_reported():
    r = parse("Plan.</think>Answer</think> more<|im_end|>")
    assert r["content"] == "Answer</think> more"  # kept (nothing lost) ...
    assert r["problems"] == ["</think> in the content, where it means nothing: kept as text"]  # ... and reported
    parser = StreamParser()
    deltas = parser.feed("Plan.</think>Answer</think> more") + parser.finish()
    assert {"type": "content", "text": "</think>", "marker": True} in deltas


def test_the_cli_shows_a_misplaced_marker_marked(tmp_path):
    ckpt = scripted_checkpoint(tmp_path / "ckpt", "Think.</think>Hi" + CE + "there<|im_end|>")
    r = chat("--ckpt", str(ckpt), "--temperature", "0", "--prompt", "hello", "--no-timings")
    assert r.returncode == 0, r.stderr
    assert f"[answer] Hi⟦misplaced {CE}⟧there" in r.stdout, r.stdout
    assert f"(output: {CE} in the content, where it means nothing: kept as text)" in r.stdout


# ---- command lines: one line, documented exit codes -----------------------------------------------------------


def test_prompt_interrupted_by_ctrl_c_exits_130():
    from weights_tools.make_tiny import tiny_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_ref.chat", "--ckpt", str(tiny_checkpoint()), "--prompt",
                             "tell me a long story", "--max-new-tokens", "100000", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout.read(len("[reasoning]")) == "[reasoning]"  # generating
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "(interrupted)" in err


def test_non_utf8_config_is_one_line_everywhere(tiny, capsys):
    (tiny / "config.json").write_bytes(b"\xff\xfe{}")
    from weights_tools import memory_plan

    for fn, args in ((inspect.main, [str(tiny)]), (verify.main, [str(tiny)]), (memory_plan.main, [str(tiny)]),
                     (chat_main, ["--ckpt", str(tiny), "--prompt", "hi"])):
        assert fn(args) == 2
        one_error_line(capsys.readouterr().err, f"{tiny / 'config.json'}: not UTF-8 text")


def test_non_utf8_tokenizer_config_is_named(tiny, capsys):
    from kimi_ref.tokenizer import Tokenizer, TokenizerError

    (tiny / "tokenizer_config.json").write_bytes(b'{"added_tokens_decoder": "\xe9"}')
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not UTF-8 text"):
        Tokenizer.from_pretrained(tiny)


def test_verify_scan_names_nan_and_inf_tensors(tiny, capsys):
    assert verify.main([str(tiny), "--scan"]) == 0
    assert "every value finite" in capsys.readouterr().out
    index = json.loads((tiny / INDEX_FILE).read_text())["weight_map"]
    name = next(n for n in index if n.endswith("layers.0.self_attn.kv_a_proj_with_mqa.weight"))
    shard = tiny / index[name]
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert verify.main([str(tiny)]) == 0  # headers and shapes alone cannot see values
    capsys.readouterr()
    assert verify.main([str(tiny), "--scan"]) == 1
    numel = tensors[name].numel()
    assert f"tensor '{name}' in {shard}: {numel - 1} NaN and 1 Inf of {numel} values" in capsys.readouterr().out


def test_ctrl_c_in_a_tool_exits_130(tiny, monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "problems", interrupted)
    assert verify.main([str(tiny)]) == 130
    one_error_line(capsys.readouterr().err, "verify: interrupted")


def test_inspect_exit_status_says_whether_it_found_problems(tiny, capsys):
    assert inspect.main([str(tiny)]) == 0
    sorted(tiny.glob("*.safetensors"))[-1].unlink()
    assert inspect.main([str(tiny)]) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": torch.int8}, "dtype torch.int8 cannot hold the model's weights"),
    ({"dtype": torch.bool}, "dtype torch.bool cannot hold"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"device": "tpu"}, "device 'tpu' is not a device torch knows"),
    ({"device": "meta"}, "device 'meta' holds no values"),
])
def test_load_model_refuses_what_it_cannot_use(tiny, kwargs, message):
    import kimi_ref

    with pytest.raises(CheckpointError, match=message):
        kimi_ref.load_model(tiny, progress=False, **kwargs)


def test_load_model_names_a_missing_gpu(tiny):
    import kimi_ref

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CheckpointError, match="torch has no cuda device on this machine"):
        kimi_ref.load_model(tiny, device="cuda", progress=False)


def test_the_reliability_table_names_real_tests():
    """docs/reliability.md cites a test for every row: each must exist (and the table must cite some)."""
    import re

    table = (REPO / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(?:tests/(test_\w+)\.py::)?(test_\w+)`", table)
    assert len(cited) >= 30
    missing = [f"{module or 'test_reliability'}::{name}" for module, name in cited
               if f"def {name}(" not in (REPO / "tests" / f"{module or 'test_reliability'}.py").read_text()]
    assert not missing, missing
