"""kimi-nano: the generated data, the training script at toy size, and the shipped model's behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from kimi_ref.chat_template import render
from kimi_ref.tokenizer import Tokenizer
from weights_tools import nano_data
from chapter_solutions import load_solutions


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.demo()


# ---- the calculator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [("17*23", "391"), ("(2+3)/2", "2.5"), ("-5-3", "-8"),
                                               ("2*(3+4)", "14"), (" 10 / 4 ", "2.5"), ("7", "7")])
def test_calculator(expression, value):
    assert nano_data.calculator(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "2**100000", "a+1", "1/0", "", "1+",
                                        "[1]*9", "'a'*3"])
def test_calculator_refuses(expression):
    assert nano_data.calculator(expression).startswith("error: calculator: ")  # told to the model, never raised


@given(st.integers(-10**6, 10**6), st.sampled_from("+-*"), st.integers(-10**6, 10**6))
def test_calculator_matches_python(a, op, b):
    expected = a + b if op == "+" else a - b if op == "-" else a * b
    assert nano_data.calculator(f"({a}){op}({b})") == str(expected)


# ---- the data -----------------------------------------------------------------------------------------


def test_examples_are_deterministic_and_kinds_all_occur():
    first = [nano_data.example(i) for i in range(200)]
    again = [nano_data.example(i) for i in range(200)]
    assert [e.messages for e in first] == [e.messages for e in again]
    assert {e.kind for e in first} == set(nano_data.KINDS)
    assert nano_data.example(0, seed=1).messages != nano_data.example(0, seed=0).messages


def test_heldout_questions_never_in_training():
    # (a small product such as "2 times 9" can also be a `mental` question: that closed table is shared)
    train = {e.messages[0]["content"] for e in map(nano_data.example, range(3000)) if e.grade["tool"]}
    held = [nano_data.example(i, "heldout") for i in range(300)]
    tool_questions = [e.messages[0]["content"] for e in held if e.grade["tool"]]
    assert tool_questions and not set(tool_questions) & train


def test_answers_are_right():
    for i in range(300):
        ex = nano_data.example(i)
        tools = [m for m in ex.messages if m["role"] == "tool"]
        calls = [m for m in ex.messages if m.get("tool_calls")]
        for call, result in zip(calls, tools):
            expression = json.loads(call["tool_calls"][0]["function"]["arguments"])["expression"]
            assert nano_data.calculator(expression) == result["content"]
        if ex.grade["answer"] is not None:
            assert str(ex.grade["answer"]) in ex.messages[-1]["content"]


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    im_assistant, im_end = tok.special_id("<|im_assistant|>"), tok.special_id("<|im_end|>")
    for i in range(40):
        ex = nano_data.example(i)
        ids, mask = nano_data.encode(ex.messages, tok)
        assert len(ids) == len(mask)
        # the trained spans, decoded, are each assistant's <think>…</think>content[calls]<|im_end|> minus "<think>"
        spans, current = [], []
        for t, m in zip(ids, mask):
            if m:
                current.append(t)
            elif current:
                spans.append(current)
                current = []
        if current:
            spans.append(current)
        assistants = [m for m in ex.messages if m["role"] == "assistant"]
        assert len(spans) == len(assistants)
        for span in spans:
            assert span[-1] == im_end and im_assistant not in span
        text = tok.decode(ids)
        assert text == render(ex.messages, tools=nano_data.TOOLS, variant=nano_data.VARIANT, add_generation_prompt=False)
        reasoning = tok.decode(spans[0])
        assert reasoning.startswith(assistants[0]["reasoning_content"])


def test_batches_are_consecutive_examples(tok):
    (batch,) = list(nano_data.batches(tok, 3, 1, start=5))
    assert [b[0] for b in batch] == [nano_data.encode(nano_data.example(i).messages, tok)[0] for i in (5, 6, 7)]


# ---- the training script, end to end at toy size -------------------------------------------------------


def test_train_nano_toy_end_to_end(tmp_path):
    out = tmp_path / "nano"
    cmd = [sys.executable, "-m", "weights_tools.train_nano", str(out), "--toy", "--steps", "3", "--batch", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = json.loads((out / "train_log.json").read_text())
    assert log["step"] == [0, 2] and all(l > 0 for l in log["loss"])
    verify = subprocess.run([sys.executable, "-m", "weights_tools.verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ---- chapter 13 solutions -------------------------------------------------------------------------------


def test_chapter_13_solutions(tok):
    import torch

    sol = load_solutions("13_kimi_nano")
    gamma = sol.clip_factor(torch.tensor([50.0, 200.0, 100.0]), 100.0)
    assert torch.equal(gamma, torch.tensor([1.0, 0.5, 1.0]))
    q_nope, k_nope, q_rope, k_rope = sol.split(torch.tensor(0.25))
    # a clipped head's logit shrinks by exactly γ in both parts, and the shared key is untouched
    assert float(q_nope * k_nope) == 0.25 and float(q_rope * k_rope) == 0.25 and float(k_rope) == 1.0
    chat = next(nano_data.example(i) for i in range(100) if nano_data.example(i).kind == "chat")
    calc = next(nano_data.example(i) for i in range(100) if nano_data.example(i).kind == "calc")
    assert 0 < sol.trained_fraction(calc.messages, tok) < 1
    assert 0 < sol.trained_fraction(chat.messages, tok) < 1


def test_training_is_deterministic():
    import torch

    from weights_tools import train_nano

    config = train_nano.nano_config(toy=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, log_a = train_nano.train(config, steps=2, batch_size=2, seed=3, progress=lambda s: None)
        b, log_b = train_nano.train(config, steps=2, batch_size=2, seed=3, progress=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert log_a["loss"] == log_b["loss"]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


# ---- the shipped kimi-nano ------------------------------------------------------------------------------
# Issue 10's bar, on a fixed held-out set (questions never trained on), greedy decoding and the real tool
# loop (weights_tools.nano_eval): >= 90% right answers, >= 90% well-formed calculator calls that ask for the
# right value, >= 90% of answers using the tool's result, and INT4 costing <= 2 points against the bf16 model.

HELDOUT = 100  # the set kimi_ref/data/nano/README.md reports on


@pytest.fixture(scope="module")
def nano():
    from kimi_ref.chat import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="module")
def nano_scores(nano):
    import torch

    import kimi_ref
    from weights_tools import nano_eval

    tokenizer = Tokenizer.from_pretrained(nano)
    int4_model = kimi_ref.load_model(nano, dtype=torch.bfloat16, progress=False)
    int4 = nano_eval.evaluate(int4_model, tokenizer, n=HELDOUT)
    dense = nano_eval.evaluate(nano_eval.dense_twin(nano, int4_model), tokenizer, n=HELDOUT)
    return int4, dense


def test_nano_ships_in_the_real_layout(nano):
    result = subprocess.run([sys.executable, "-m", "weights_tools.verify", str(nano)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((nano / "tools.json").read_text()) == nano_data.TOOLS


@pytest.mark.slow
def test_nano_meets_the_bar(nano_scores):
    int4, _ = nano_scores
    scores, why = int4["scores"], json.dumps(int4["failures"][:2], indent=1)
    assert int4["counts"]["arithmetic"] >= 80 and int4["counts"]["well_formed"] >= 60, int4["counts"]
    for key in ("arithmetic", "well_formed", "tool_call", "uses_result"):
        assert scores[key] >= 0.9, (key, scores, why)
    assert int4["by_kind"]["chat"] >= 0.9, int4["by_kind"]


@pytest.mark.slow
def test_nano_int4_costs_at_most_two_points(nano_scores):
    int4, dense = nano_scores
    for key in ("arithmetic", "well_formed", "tool_call"):
        assert int4["scores"][key] >= dense["scores"][key] - 0.02, (key, int4["scores"], dense["scores"])


@pytest.mark.slow
def test_chat_cli_default_is_nano_and_calls_the_calculator():
    result = subprocess.run([sys.executable, "-m", "kimi_ref.chat", "--prompt", "What is 17*23?", "--seed", "0",
                             "--temperature", "0", "--no-timings"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kimi-nano" in result.stderr
    assert "[reasoning]" in result.stdout and "[tool call] calculator" in result.stdout, result.stdout
    after_tool = result.stdout.rsplit("[tool result]", 1)[-1]  # the answer written after reading the result
    assert "[answer]" in after_tool and "391" in after_tool.split("[answer]", 1)[1], result.stdout
