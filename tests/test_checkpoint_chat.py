"""The checkpoint decides: variant, special tokens, sampling, and the load-time proof of the chat template.

Each genuine template from ``../shared/reference`` is put into a checkpoint synthesized here (the tiny
checkpoint's config and demo tokenizer, without the variant make_tiny records; never shipped), and the
checkpoint alone must decide the variant, pass the proof, and -- one byte changed -- be refused with a
diff that ``--template checkpoint`` then gets past, rendering exactly what jinja2 renders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kimi_ref import chat as chat_cli
from kimi_ref import session
from kimi_ref.chat_template import ChatTemplateError, render
from kimi_ref.checkpoint_chat import (VARIANT_FIELD, ChatSetupError, VariantUnknown, chat_setup, check_special_tokens,
                                      fingerprint, read_generation_config)
from kimi_ref.template_proof import SUITE, TemplateMismatch, prove, suite_cases
from kimi_ref.tokenizer import Tokenizer
from test_chat_template import TEMPLATE_DIRS, _k26_template_from_k25, jinja_render

LAYOUT_OF = {"k2.5": "kimi_k25", "k2.6": "kimi_k25", "k2.7-code": "kimi_k25", "k2-thinking": "flat",
             "k2-instruct": "flat"}
SMALL_FILES = ("config.json", "tiktoken.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny():
    from weights_tools.make_tiny import tiny_checkpoint

    return {layout: tiny_checkpoint(layout) for layout in ("kimi_k25", "flat")}


def synthesize(tiny: dict, out: Path, layout: str, template: str | None = None, *, whole: bool = False,
               in_tokenizer_config: bool = False) -> Path:
    """A checkpoint of ``layout`` whose tokenizer config records no variant, with ``template`` (if any)
    as chat_template.jinja (or as tokenizer_config.json's chat_template). ``whole``: weights too."""
    src = tiny[layout]
    if whole:
        shutil.copytree(src, out)
    else:
        out.mkdir(parents=True)
        for name in SMALL_FILES:
            shutil.copyfile(src / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config[VARIANT_FIELD]
    if template is not None and in_tokenizer_config:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if template is not None and not in_tokenizer_config:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8", newline="")
    return out


def genuine(reference: Path, variant: str) -> str:
    # Bytes as they are (K2-Instruct's CRLF included): the checkpoint gets the file unchanged.
    return (reference / TEMPLATE_DIRS[variant] / "chat_template.jinja").read_bytes().decode("utf-8")


# ---------------------------------------------------------------------------------------------------
# The variant, from the checkpoint's own files
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["k2.5", "k2-thinking", "k2-instruct"])
def test_each_genuine_template_chooses_its_variant_and_passes_the_proof(reference, tiny, tmp_path, variant):
    ckpt = synthesize(tiny, tmp_path / "ckpt", LAYOUT_OF[variant], genuine(reference, variant))
    setup = chat_setup(ckpt)
    assert setup.variant == variant and setup.template == "kimi_ref"
    assert setup.reason.startswith("chat_template.jinja: ")
    renderings = len(suite_cases(variant))
    assert setup.proof == f"proven: kimi_ref's {variant} template equals the checkpoint's on {renderings} renderings"
    assert renderings >= 10


def test_the_template_in_tokenizer_config_counts_too(reference, tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", genuine(reference, "k2.5"), in_tokenizer_config=True)
    setup = chat_setup(ckpt)
    assert setup.variant == "k2.5" and "tokenizer_config.json (chat_template)" in setup.reason
    assert setup.proof.startswith("proven")


def test_chat_template_jinja_wins_over_tokenizer_config(reference, tiny, tmp_path):
    """HF's order: the .jinja file replaces tokenizer_config.json's chat_template."""
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", genuine(reference, "k2.5"))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'not this one' }}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_setup(ckpt).variant == "k2.5"


def test_k26_and_k27_code_templates_written_from_the_rules(reference, tiny, tmp_path):
    """No K2.6 / K2.7-Code template is public: the K2.6 rules applied to the genuine K2.5 file (as in
    test_chat_template) fingerprint as k2.6; with preserve_thinking forced on, as k2.7-code. Both prove."""
    k26 = _k26_template_from_k25(reference)
    k27 = k26.replace("preserve_thinking | default(false)", "true")
    assert k27 != k26
    for variant, source in (("k2.6", k26), ("k2.7-code", k27)):
        ckpt = synthesize(tiny, tmp_path / variant, "kimi_k25", source)
        setup = chat_setup(ckpt)
        assert setup.variant == variant, setup.reason
        assert setup.proof.startswith("proven"), setup.proof


def test_fingerprint_table():
    assert fingerprint("{{ '<|im_user|>' }}") == (None, fingerprint("x")[1])
    assert "not a Kimi K2 template" in fingerprint("{{ messages }}")[1]
    base = "<|im_middle|><|im_end|>"
    assert fingerprint(base)[0] == "k2-instruct"
    assert fingerprint(base + "<think>")[0] == "k2-thinking"
    assert fingerprint(base + "<think>{{ tools_ts_str }}")[0] == "k2.5"
    k26 = base + "<think>{{ tools_ts_str }}{% set preserve_thinking = preserve_thinking | default(false) %}"
    assert fingerprint(k26)[0] == "k2.7-code"  # no way to switch thinking off: forced on
    assert fingerprint(k26 + "{% if thinking is defined and thinking is false %}")[0] == "k2.6"
    # "preserve_thinking is false" alone is not a thinking switch
    assert fingerprint(k26 + "{% if preserve_thinking is false %}")[0] == "k2.7-code"


def test_kimi_nano_and_make_tiny_record_their_variant(tiny, tmp_path):
    from kimi_ref.chat import NANO_DIR
    from weights_tools.make_tiny import make_tiny

    nano = chat_setup(NANO_DIR)
    assert nano.variant == "k2.7-code" and nano.reason == f"tokenizer_config.json: {VARIANT_FIELD} = 'k2.7-code'"
    assert chat_setup(tiny["kimi_k25"]).variant == "k2.7-code"
    assert chat_setup(tiny["flat"]).variant == "k2-thinking"
    out = make_tiny(tmp_path / "k25", "kimi_k25", variant="k2.5")
    assert json.loads((out / "tokenizer_config.json").read_text())[VARIANT_FIELD] == "k2.5"
    assert chat_setup(out).variant == "k2.5"
    # The nano's training data uses the variant it records
    from weights_tools import nano_data

    assert nano_data.VARIANT == nano.variant


def test_no_template_and_no_record_is_said_plainly(tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25")
    with pytest.raises(VariantUnknown, match=r"cannot tell which Kimi template .* ships no chat template .* pass --variant"):
        chat_setup(ckpt)
    setup = chat_setup(ckpt, "k2.6")
    assert setup.variant == "k2.6" and "chosen by --variant (the checkpoint does not say" in setup.reason


def test_an_unrecognised_template_is_said_plainly(tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", "{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(VariantUnknown, match="an unrecognised template .*not a Kimi K2 template.*--template checkpoint"):
        chat_setup(ckpt)


def test_files_that_disagree_are_refused(reference, tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "flat", "flat", genuine(reference, "k2.5"))
    with pytest.raises(ChatSetupError, match=r"config.json has the flat layout, but the chat template says k2.5"):
        chat_setup(ckpt)
    assert chat_setup(ckpt, "k2.5").variant == "k2.5"  # --variant: the user says it is intended
    ckpt = synthesize(tiny, tmp_path / "rec", "kimi_k25", genuine(reference, "k2.5"))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config[VARIANT_FIELD] = "k2.7-code"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatSetupError, match="says kimi_ref_chat_variant 'k2.7-code', but .*chat_template.jinja is a k2.5"):
        chat_setup(ckpt)
    config[VARIANT_FIELD] = "k3"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatSetupError, match="kimi_ref_chat_variant 'k3' is not one of"):
        chat_setup(ckpt)


def test_variant_override_of_k27_code_says_it_was_not_trained_for_that(tiny):
    setup = chat_setup(tiny["kimi_k25"], "k2.6")
    assert setup.variant == "k2.6" and "the checkpoint says k2.7-code" in setup.reason
    assert any("not trained on" in note for note in setup.notes)


# ---------------------------------------------------------------------------------------------------
# The proof: one byte changed is refused with a diff; --template checkpoint renders what jinja2 renders
# ---------------------------------------------------------------------------------------------------
ONE_BYTE = {"k2.5": ("## Return of", "## Return 0f"), "k2-thinking": ("created by", "created bY"),
            "k2-instruct": ("helpful assistant", "helpful assistanT")}


@pytest.mark.parametrize("variant", sorted(ONE_BYTE))
def test_one_byte_changed_is_refused_with_a_diff(reference, tiny, tmp_path, variant):
    old, new = ONE_BYTE[variant]
    source = genuine(reference, variant)
    assert old in source
    changed = source.replace(old, new, 1)  # one byte, at the first place it is written
    ckpt = synthesize(tiny, tmp_path / "ckpt", LAYOUT_OF[variant], changed)
    with pytest.raises(ChatSetupError) as info:
        chat_setup(ckpt)
    text, diff = str(info.value), info.value.details
    assert "\n" not in text  # one line; the diff beside it
    assert f"kimi_ref's {variant} template and the checkpoint's differ on the conversation '" in text
    assert "first difference at character" in text and "--template checkpoint" in text
    assert diff.startswith("--- kimi_ref\n+++ checkpoint template\n@@ ")
    assert any(line.startswith("+") and new in line for line in diff.splitlines()[2:])
    assert any(line.startswith("-") and old in line for line in diff.splitlines()[2:])

    setup = chat_setup(ckpt, template="checkpoint")
    assert setup.template == "checkpoint" and setup.variant == variant
    tok = Tokenizer.from_pretrained(ckpt)
    for case, thinking, preserve in suite_cases(variant):
        flags = {"thinking": thinking, "add_generation_prompt": case.add_generation_prompt}
        if preserve is not None:
            flags["preserve_thinking"] = preserve
        expected = jinja_render(reference, variant, list(case.messages), list(case.tools) if case.tools else None,
                                source=changed.replace("\r\n", "\n"), **flags)
        got = setup.render(list(case.messages), list(case.tools) if case.tools else None, thinking=thinking,
                           preserve_thinking=preserve, add_generation_prompt=case.add_generation_prompt)
        assert got == expected
        ids = setup.render_ids(list(case.messages), tok, list(case.tools) if case.tools else None, thinking=thinking,
                               preserve_thinking=preserve, add_generation_prompt=case.add_generation_prompt)
        assert ids == tok.encode(expected, allow_special=True)
    tool_case = next(case for case in SUITE if case.name == "tool calls and results")
    assert new in setup.render([{"role": "user", "content": "x"}] if variant != "k2.5" else list(tool_case.messages))


def test_the_suite_reaches_every_template_branch(reference):
    """Each single-byte edit of a rendered literal in the K2.5 file is caught by some conversation."""
    source = genuine(reference, "k2.5")
    for old, new in [("<think></think>{{render_content", "<think> </think>{{render_content"),
                     ("<|kimi_k25_video_placeholder|>", "<|kimi_k25_video_placeholdr|>"),
                     ("<|media_begin|>image", "<|media_begin|>imag"), ("tojson(separators=(',', ':'))", "tojson"),
                     ("<|tool_calls_section_end|>", "<|tool_calls_section_end|>."),
                     ("message.get('name') or  message['role']", "message['role']")]:
        assert old in source, old
        with pytest.raises(TemplateMismatch):
            prove(source.replace(old, new, 1), "k2.5")


def test_checkpoint_template_refuses_typed_special_tokens(reference, tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", genuine(reference, "k2.5"))
    setup = chat_setup(ckpt, template="checkpoint")
    tok = Tokenizer.from_pretrained(ckpt)
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].content holds the text '<\|im_end\|>'"):
        setup.render_ids([{"role": "user", "content": "bye<|im_end|>"}], tok)
    # kimi_ref's own template keeps it text
    assert chat_setup(ckpt).render_ids([{"role": "user", "content": "bye<|im_end|>"}], tok)


def test_without_jinja2_the_proof_is_skipped_and_says_so(reference, tiny, tmp_path, monkeypatch):
    import kimi_ref.checkpoint_chat as checkpoint_chat
    import kimi_ref.template_proof as proof

    monkeypatch.setattr(proof, "jinja_available", lambda: False)
    monkeypatch.setattr(checkpoint_chat, "jinja_available", lambda: False)  # imported by name there
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", genuine(reference, "k2.5"))
    setup = chat_setup(ckpt)
    assert setup.variant == "k2.5" and "check against the checkpoint's template was skipped: jinja2 is not installed" \
        in setup.proof
    with pytest.raises(ChatSetupError, match="renders through jinja2, an optional extra"):
        chat_setup(ckpt, template="checkpoint")


def test_template_checkpoint_without_a_template_is_refused(tiny):
    with pytest.raises(ChatSetupError, match="--template checkpoint: .* ships no chat template"):
        chat_setup(tiny["kimi_k25"], template="checkpoint")


# ---------------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------------
def _edit_decoder(ckpt: Path, edit) -> None:
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    edit(config["added_tokens_decoder"])
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_moved_special_id_is_refused(reference, tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", genuine(reference, "k2.5"))
    assert check_special_tokens(ckpt, "k2.5") == []

    def move(decoder):  # <|im_end|> (3842 in the demo vocabulary) moved to a reserved slot
        decoder["3900"] = decoder.pop("3842")

    _edit_decoder(ckpt, move)
    with pytest.raises(ChatSetupError, match=r"special token '<\|im_end\|>' has id 3900, but kimi_ref's table puts "
                                             r"it at 3842 \(3840 BPE ranks \+ 2\)"):
        chat_setup(ckpt)


def test_a_renamed_or_missing_special_token_is_refused(tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25")

    def rename(decoder):
        decoder["3863"]["content"] = "</thinking>"

    _edit_decoder(ckpt, rename)
    problems = check_special_tokens(ckpt, "k2.7-code")
    assert any("id 3863 is named '</thinking>', but kimi_ref's table has '</think>' there" in p for p in problems)
    assert any("the k2.7-code template needs the special token '</think>' (kimi_ref's id 3863)" in p for p in problems)
    assert not any("</think>" in p for p in check_special_tokens(ckpt, "k2-instruct") if "needs" in p)


# ---------------------------------------------------------------------------------------------------
# generation_config.json
# ---------------------------------------------------------------------------------------------------
def test_generation_config_values_and_errors(tiny, tmp_path):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25")
    assert read_generation_config(ckpt) == {}
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.8, "eos_token_id": 3841, "max_length": 100, "do_sample": True, "bos": 1}))
    assert read_generation_config(ckpt) == {"temperature": 0.6, "top_p": 0.8, "eos_token_id": (3841,),
                                            "max_length": 100, "do_sample": True}
    s = chat_setup(ckpt, "k2.7-code").sampling
    assert (s.temperature, s.top_p, s.max_length, s.eos_token_ids) == (0.6, 0.8, 100, (3841,))
    assert s.sources["temperature"].endswith("generation_config.json")
    for bad, match in [({"temperature": "hot"}, "temperature must be a number >= 0, found 'hot'"),
                       ({"top_p": 0}, r"top_p must be a number in \(0, 1\], found 0"),
                       ({"eos_token_id": []}, "eos_token_id must be a token id or a non-empty list"),
                       ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer > 0"),
                       ({"do_sample": "yes"}, "do_sample must be true or false")]:
        (ckpt / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ChatSetupError, match="generation_config.json: " + match):
            read_generation_config(ckpt)
    (ckpt / "generation_config.json").write_text("{not json")
    with pytest.raises(ChatSetupError, match="generation_config.json: not valid JSON"):
        read_generation_config(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert chat_setup(ckpt, "k2.7-code").sampling.temperature == 0.0  # HF: no sampling = greedy


def test_k27_code_gets_its_fixed_settings_by_default(tiny):
    s = chat_setup(tiny["kimi_k25"]).sampling
    assert (s.temperature, s.top_p) == (1.0, 0.95) and s.sources["temperature"] == "K2.7-Code's fixed settings"


@pytest.fixture()
def recorded(monkeypatch):
    """chat.generate, wrapped: every call's keyword arguments (and the prompt) are recorded."""
    calls = []
    real = session.generate

    def spy(model, ids, **kwargs):
        calls.append({"ids": list(ids), **kwargs})
        return real(model, ids, **kwargs)

    monkeypatch.setattr(session, "generate", spy)  # rank 0 generates from its Session
    return calls


def test_generation_config_reaches_generate(tiny, tmp_path, recorded, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny["kimi_k25"], ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.5, "top_p": 0.7, "eos_token_id": [3841, 100], "max_new_tokens": 3}))
    assert chat_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--seed", "0", "--no-timings"]) == 0
    call = recorded[-1]
    assert (call["temperature"], call["top_p"], call["max_new_tokens"]) == (0.5, 0.7, 3)
    assert {3842, 3841, 100} <= set(call["stop_ids"])
    err = capsys.readouterr().err
    assert f"temperature 0.5 ({ckpt / 'generation_config.json'})" in err
    assert "not what it was trained for" not in err  # the checkpoint's own file, not an override

    # The command line beats the file (and, away from K2.7-Code's settings, says so); max_length caps prompt + answer
    prompt_len = len(recorded[-1]["ids"])
    (ckpt / "generation_config.json").write_text(json.dumps({"max_length": prompt_len + 2}))
    assert chat_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--temperature", "0.3", "--max-new-tokens", "50",
                          "--no-timings"]) == 0
    call = recorded[-1]
    assert (call["temperature"], call["top_p"], call["max_new_tokens"]) == (0.3, 0.95, 2)
    notes = [line for line in capsys.readouterr().err.splitlines() if "not what it was trained for" in line]
    assert notes == ["note: K2.7-Code was trained for temperature 1.0 and top-p 0.95 (thinking on, earlier reasoning "
                     "kept); temperature 0.3, top-p 0.95 is not what it was trained for"]
    assert chat_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--temperature", "1", "--top-p", "0.95",
                          "--no-timings"]) == 0
    assert "not what it was trained for" not in capsys.readouterr().err
    (ckpt / "generation_config.json").write_text(json.dumps({"max_length": prompt_len}))
    assert chat_cli.main(["--ckpt", str(ckpt), "--prompt", "hi"]) == 2
    assert f"generation_config.json's max_length is {prompt_len} (prompt and answer together)" in capsys.readouterr().err


def test_cli_template_checkpoint_prompts_are_what_jinja2_renders(reference, tiny, tmp_path, recorded, capsys):
    source = genuine(reference, "k2.5")
    assert source.count("<|im_assistant|>assistant<|im_middle|>\n") == 1  # the generation prompt
    changed = source.replace("<|im_assistant|>assistant<|im_middle|>\n", "<|im_assistant|>assistant!<|im_middle|>\n")
    ckpt = synthesize(tiny, tmp_path / "ckpt", "kimi_k25", changed, whole=True)
    args = ["--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0", "--no-timings"]
    assert chat_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "differ on the conversation" in err and "--template checkpoint" in err and not recorded
    assert "+++ checkpoint template" in err and err.rstrip().splitlines()[-1].startswith("kimi_ref.chat: error: ")

    assert chat_cli.main(args + ["--template", "checkpoint"]) == 0
    err = capsys.readouterr().err
    assert "(variant k2.5: chat_template.jinja: TypeScript tool declarations" in err
    assert "the checkpoint's own template" in err and "through jinja2" in err
    msgs = [{"role": "user", "content": "hi"}]
    expected = jinja_render(reference, "k2.5", msgs, source=changed, thinking=True)
    assert expected != render(msgs, variant="k2.5") and "assistant!" in expected
    assert recorded[-1]["ids"] == Tokenizer.from_pretrained(ckpt).encode(expected, allow_special=True)


def test_cli_says_which_variant_and_why(reference, tiny, tmp_path, recorded, capsys):
    ckpt = synthesize(tiny, tmp_path / "ckpt", "flat", genuine(reference, "k2-thinking"), whole=True)
    assert chat_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1", "--no-timings"]) == 0
    err = capsys.readouterr().err
    assert "(variant k2-thinking: chat_template.jinja: <think> blocks, tools declared as JSON (K2-Thinking))" in err
    assert "proven: kimi_ref's k2-thinking template equals the checkpoint's" in err
    expected = render([{"role": "user", "content": "hi"}], variant="k2-thinking")
    assert recorded[-1]["ids"] == Tokenizer.from_pretrained(ckpt).encode(expected, allow_special=True)
    assert chat_cli.main(["--ckpt", str(ckpt), "--variant", "k2.5", "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "the chat template says k2-thinking" not in capsys.readouterr().err  # --variant wins; layout not re-checked


# ---------------------------------------------------------------------------------------------------
# python -m weights_tools.verify runs the same check
# ---------------------------------------------------------------------------------------------------
def test_verify_runs_the_same_check(reference, tiny, tmp_path, capsys):
    from weights_tools.verify import main as verify

    good = synthesize(tiny, tmp_path / "good", "kimi_k25", genuine(reference, "k2.5"), whole=True)
    assert verify([str(good)]) == 0
    assert "chat: proven" in capsys.readouterr().out.replace("chat: prompts rendered by kimi_ref's template; ", "chat: ")
    bad = synthesize(tiny, tmp_path / "bad", "kimi_k25", genuine(reference, "k2.5").replace("## Return of", "## Return"),
                     whole=True)
    assert verify([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "problem(s)" in out and "differ on the conversation 'tool calls and results'" in out and "+++ checkpoint" in out
    unknown = synthesize(tiny, tmp_path / "unknown", "kimi_k25", whole=True)
    assert verify([str(unknown)]) == 0
    assert "cannot tell which Kimi template" in capsys.readouterr().out
    assert verify([str(unknown), "--variant", "k2.5"]) == 0
