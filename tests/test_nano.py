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


def _calls(ex) -> list[str]:
    return [json.loads(m["tool_calls"][0]["function"]["arguments"])["expression"]
            for m in ex.messages if m.get("tool_calls")]


def test_phrasing_families_are_disjoint():
    for table in (nano_data.FRAMES["train"], nano_data.FRAMES["heldout"]):
        assert table["noun"] and table["verb"]
    for form in ("noun", "verb"):
        assert not set(nano_data.FRAMES["train"][form]) & set(nano_data.FRAMES["heldout"][form])
    assert not set(nano_data.UNIT_FRAMES["train"]) & set(nano_data.UNIT_FRAMES["heldout"])
    follow = {split: {text for text, _, _ in nano_data.FOLLOWUPS[split]} for split in nano_data.SPLITS}
    assert not follow["train"] & follow["heldout"]
    for _, lines, _, _ in nano_data.CHAT:
        assert lines["heldout"] and not {l.lower() for l in lines["train"]} & {l.lower() for l in lines["heldout"]}


def test_heldout_questions_never_in_training():
    train = {m["content"].lower() for i in range(4000) for m in nano_data.example(i).messages if m["role"] == "user"}
    held = [m["content"].lower() for i in range(400) for m in nano_data.example(i, "heldout").messages
            if m["role"] == "user"]
    assert len(held) > 400 and not set(held) & train


# The held-out set is the test: retuning the training data must never move it. These are the first 300
# held-out conversations as the issue-17 run measured them (change this only with a note saying why).
HELDOUT_SHA256 = "e84dcef6e7466d3aeebf7e8d13e14702f2f29e6837276b1aceeddefe7a90b45d"


def test_heldout_set_is_pinned():
    import hashlib

    digest = hashlib.sha256()
    for i in range(300):
        ex = nano_data.example(i, "heldout", 0)
        digest.update(json.dumps([ex.messages, ex.kind, ex.grade], sort_keys=True).encode())
    assert digest.hexdigest() == HELDOUT_SHA256


def test_template_takes_out_numbers_case_and_punctuation():
    assert nano_data.template("Find 1,234 + 5?") == "find N + N"
    assert nano_data.template("what is -2.5 TIMES 7") == "what is -N times N"
    assert nano_data.template("Divide it by 3, please.") == nano_data.template("divide it by 17 please")
    assert nano_data.template("Divide it by 3") != nano_data.template("Divide that by 3")


def test_training_never_asks_a_heldout_template():
    """Every held-out question's template is known, and no training question has one (the training words
    around a question -- openers, closers, asides, pronouns -- can combine into a held-out phrasing; such a
    draw is made again)."""
    known = nano_data.heldout_templates()
    held = {nano_data.template(m["content"]) for i in range(3000)
            for m in nano_data.example(i, "heldout").messages if m["role"] == "user"}
    assert held <= known, sorted(held - known)[:5]
    train = {nano_data.template(m["content"]) for i in range(5000)
             for m in nano_data.example(i).messages if m["role"] == "user"}
    assert len(train) > 3000 and not train & known, sorted(train & known)[:5]
    # and the check bites: a held-out phrasing dressed as training would be caught
    assert nano_data.template("okay, now multiply it by 12") in known


def test_data_covers_the_scope():
    """Operands of 1 to 6 digits, every operation, negative numbers and decimals; chat never calls a tool."""
    import re

    examples = [nano_data.example(i) for i in range(3000)]
    expressions = [e for ex in examples if ex.kind == "calc" for e in _calls(ex)]
    operand_digits = {len(n) for e in expressions for n in re.findall(r"\d+", e)}
    assert set(range(1, 7)) <= operand_digits
    for needle in ("+", "-", "*", "/", "%", "**", "sqrt(", "/100", "(", "."):
        assert any(needle in e for e in expressions), needle
    assert any(e.startswith("-") for e in expressions)  # a negative operand
    results = [ex.grade["answer"] for ex in examples if ex.grade["answer"] is not None]
    assert any(r.startswith("-") for r in results) and any("." in r for r in results) and max(map(len, results)) > 12
    for ex in examples:
        if ex.kind == "chat":
            assert ex.grade == {"answer": None, "tool": False} and not _calls(ex)
        else:
            assert ex.grade["tool"] and _calls(ex)
    units = [e for ex in examples if ex.kind == "units" for e in _calls(ex)]
    assert any("*" in e for e in units) and any("/" in e for e in units)


def test_answers_are_right():
    for i in range(500):
        for split in nano_data.SPLITS:
            ex = nano_data.example(i, split)
            results = [m["content"] for m in ex.messages if m["role"] == "tool"]
            assert [nano_data.calculator(e) for e in _calls(ex)] == results
            if ex.grade["answer"] is not None:
                assert ex.grade["answer"] == results[-1] and results[-1] in ex.messages[-1]["content"]


def test_grader_reads_numbers_by_value():
    from weights_tools.nano_eval import _MARKERS, _last_number, same_number

    assert same_number("36", "36.0") and same_number("-5", "-5.00") and not same_number("36", "360")
    assert not same_number("1,234", "1234") and not same_number("error: x", "1")
    assert _last_number("1000-1 = 999.") == "999" and _last_number("7-12 = -5.") == "-5"
    assert _last_number("100/8 = 12.5.") == "12.5" and _last_number("Hello!") is None
    assert _MARKERS.search("99.</think>") and _MARKERS.search("x<|im_end|>") and not _MARKERS.search("a < b | c")


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
    assert len(log["cpu_seconds"]) == 2
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



def test_tail_average_is_the_mean_of_the_last_updates():
    import torch

    from weights_tools import train_nano

    config = train_nano.nano_config(toy=True)
    seen: list[dict] = []  # after_step sees each update's own weights

    def keep(step, model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        last, _ = train_nano.train(config, steps=4, batch_size=2, seed=3, progress=lambda s: None, average_last=0)
        averaged, log = train_nano.train(config, steps=4, batch_size=2, seed=3, progress=lambda s: None,
                                         after_step=keep, average_last=0.5)
    finally:
        torch.set_num_threads(threads)
    assert log["config"]["averaged_updates"] == 2 and len(seen) == 4
    moved = 0
    for name, value in averaged.state_dict().items():
        assert torch.equal(last.state_dict()[name], seen[-1][name]), name  # the hook changed nothing
        if value.is_floating_point():
            mean = ((seen[2][name].double() + seen[3][name].double()) / 2).to(value.dtype)
            assert torch.equal(value, mean), name
            moved += not torch.equal(value, seen[-1][name])
        else:
            assert torch.equal(value, seen[-1][name]), name
    assert moved > 0  # the mean is not the last update's weights
    assert any("e_score_correction_bias" in name for name in seen[-1])  # buffers are averaged too


def test_tail_average_refuses_what_it_cannot_average():
    from weights_tools import train_nano

    model = train_nano.build_model(train_nano.nano_config(toy=True), 0)
    for count in (0, 11):
        with pytest.raises(ValueError, match=r"needs 1 to 10 updates .* found " + str(count)):
            train_nano.TailAverage(model, 10, count)
    tail = train_nano.TailAverage(model, 10, 2)
    tail.add(7, model)  # before the tail: not counted
    tail.add(8, model)
    with pytest.raises(RuntimeError, match="saw 1 of its 2 updates"):
        tail.load_into(model)
    assert train_nano.tail_count(2400, 0.1) == 240 and train_nano.tail_count(3, 0.1) == 1
    with pytest.raises(ValueError, match=r"--average-last \(average_last\) must be a fraction .* found 1.5"):
        train_nano.tail_count(10, 1.5)  # the CLI refuses it before training: tests/test_reliability.py


# ---- the shipped kimi-nano ------------------------------------------------------------------------------
# Greedy decoding and the real tool loop (weights_tools.nano_eval), on two sets: the held-out conversations
# (phrased from a family of templates never trained on) and the hand-written questions of
# tests/nano_questions.py. The bars are issue 17's: on both sets at least 95% right final answers and right
# calculator calls, every output well formed, chit-chat never calling a tool, and INT4 within 2 points of the
# bf16 experts. The shipped model reaches 95.2% / 95.2% held out (79 of 83) and 95.3% / 95.3% hand-written
# (41 of 43); kimi_ref/data/nano/README.md names the misses. A model one question worse fails here.

HELDOUT = 100  # the set kimi_ref/data/nano/README.md reports on
ISSUE_17_TARGET = 0.95
BARS = {which: {"answer": ISSUE_17_TARGET, "tool_call": ISSUE_17_TARGET, "no_tool": 1.0}
        for which in ("heldout", "handwritten")}


@pytest.fixture(scope="module")
def nano():
    from kimi_ref.chat import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="module")
def nano_scores(nano):
    import torch

    import kimi_ref
    from nano_questions import kinds, questions
    from weights_tools import nano_eval

    tokenizer = Tokenizer.from_pretrained(nano)
    int4_model = kimi_ref.load_model(nano, dtype=torch.bfloat16, progress=False)
    dense_model = nano_eval.dense_twin(nano, int4_model)
    return {(name, which): run(model, tokenizer)
            for name, model in (("int4", int4_model), ("dense", dense_model))
            for which, run in (("heldout", lambda m, t: nano_eval.evaluate(m, t, n=HELDOUT)),
                               ("handwritten", lambda m, t: nano_eval.score(m, t, questions(), kinds())))}


def test_handwritten_questions_are_right(nano):
    from nano_questions import HANDWRITTEN, ISSUE_QUOTED, questions

    from weights_tools.nano_eval import same_number

    assert len(HANDWRITTEN) >= 40
    config = json.loads((nano / "train_log.json").read_text())["config"]  # every conversation it trained on
    seen = config["steps"] * config["batch"]
    assert config["seed"] == 0 and seen > 10_000
    generated = {m["content"] for split, n in (("train", seen), ("heldout", 2000)) for i in range(n)
                 for m in nano_data.example(i, split).messages if m["role"] == "user"}
    for question in questions()[ISSUE_QUOTED:]:
        if question.results:  # an arithmetic question the model has been trained on would test memory only
            assert question.turns[0] not in generated, question
    for question in questions():
        if question.answer is not None:
            assert len(question.results) == len(question.turns) and same_number(question.results[-1], question.answer)
        else:
            assert question.results == ()


def test_nano_ships_in_the_real_layout(nano):
    result = subprocess.run([sys.executable, "-m", "weights_tools.verify", str(nano)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((nano / "tools.json").read_text()) == nano_data.TOOLS


def test_loading_nano_does_no_work_on_the_meta_device(nano):
    """Modules built on the meta device (checkpoint loading) skip their random init: nn.init there costs
    nothing useful and pulled in torch._dynamo (~2 s of a 2.5 s load)."""
    code = ("import sys, torch, kimi_ref; kimi_ref.load_model(sys.argv[1], dtype=torch.bfloat16, progress=False); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(nano)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["heldout", "handwritten"])
def test_nano_meets_the_bar(nano_scores, which):
    result = nano_scores["int4", which]
    scores, why = result["scores"], json.dumps(result["failures"][:3], indent=1, default=str)
    assert scores["well_formed"] == 1.0, (scores, why)
    for key, bar in BARS[which].items():
        assert scores[key] >= bar, (key, scores, why)
    if which == "heldout":
        assert result["counts"]["answer"] >= 75 and result["counts"]["no_tool"] >= 8, result["counts"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["heldout", "handwritten"])
def test_nano_int4_costs_at_most_two_points(nano_scores, which):
    int4, dense = nano_scores["int4", which]["scores"], nano_scores["dense", which]["scores"]
    for key in ("answer", "tool_call", "well_formed"):
        assert int4[key] >= dense[key] - 0.02, (key, int4, dense)


def _chat(prompt: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kimi_ref.chat", "--prompt", prompt, "--seed", "0",
                           "--temperature", "0", "--no-timings"], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("prompt, expression, answer", [("What is 17*23?", "17*23", "391"),
                                                        ("What is 1000 - 1?", "1000-1", "999")])
def test_chat_cli_default_is_nano_and_calls_the_calculator(prompt, expression, answer):
    result = _chat(prompt)
    assert result.returncode == 0, result.stderr
    assert "kimi-nano" in result.stderr
    assert "[reasoning]" in result.stdout and "[tool call] calculator" in result.stdout, result.stdout
    call = result.stdout.split("[tool call] calculator", 1)[1].split("[tool result]", 1)[0]
    assert json.dumps({"expression": expression}) in call, result.stdout
    after_tool = result.stdout.rsplit("[tool result]", 1)[-1]  # the answer written after reading the result
    assert "[answer]" in after_tool and answer in after_tool.split("[answer]", 1)[1], result.stdout


@pytest.mark.slow
def test_readme_setup_check_prints_what_the_readme_shows():
    import re
    import shlex

    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(l for l in text.splitlines() if "# one shot: the set-up check" in l)
    args = shlex.split(line.split("#", 1)[0])[3:]  # after `python -m kimi_ref.chat`
    shown = re.search(r"The set-up check prints[^`]*```text\n(.*?)```", text, re.S).group(1)
    result = subprocess.run([sys.executable, "-m", "kimi_ref.chat", *args, "--no-timings"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown, result.stdout
