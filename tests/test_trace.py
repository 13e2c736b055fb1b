"""Traces and their diff: kimi_ref == the oracle == HF activation by activation, and a bug is found where it is.

On three checkpoints — kimi-nano (shipped), a ``make_tiny`` checkpoint and one written by HF's own
``save_pretrained`` — the fp32 kimi_ref trace shows no activation past the float32 row against the
float64 oracle nor against HF's DeepseekV3. A bug injected into one module (a wrong RMSNorm eps, the
softmax scale of the absorbed width, the router bias dropped) is reported at that layer and activation and nowhere
earlier. TP 2 and TP 1 traces agree. The command lines refuse to overwrite and name what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kimi_ref
from kimi_ref.chat import NANO_DIR
from kimi_ref.config import fixture_path, load_config, tiny_config
from weights_tools import diff, trace
from weights_tools.trace_file import TraceError, canonical_order, load_trace, save_trace


IDS = [[5, 17, 300, 42, 1000, 7, 2048, 99, 3]]
SMALL_IDS = [[5, 17, 200, 42, 100, 7, 3]]


def _write(path: Path, tensors: dict, dtype: str, ids=IDS, **header) -> Path:
    return save_trace(path, tensors, {"input_ids": ids, "dtype": dtype, **header}, force=True)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from weights_tools import make_tiny

    return make_tiny.make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", "kimi_k25", seed=0)


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    """A random DeepseekV3ForCausalLM saved by HF itself (flat deepseek_v3 config, dense experts)."""
    transformers = pytest.importorskip("transformers")  # a test-only peer
    from weights_tools.hf_peer import hf_config

    config = tiny_config(load_config(fixture_path("kimi_k2_thinking")), vocab_size=256)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config(config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # HF inits norms to 1 and the bias to 0: make every one matter
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    out = tmp_path_factory.mktemp("hf") / "ckpt"
    model.save_pretrained(out)
    return out


def _traces(ckpt: Path, ids, tmp: Path) -> dict[str, object]:
    pytest.importorskip("transformers")
    paths = {"kimi": _write(tmp / "kimi.st", trace.trace_kimi(ckpt, ids), "float32", ids, source="kimi_ref"),
             "oracle": _write(tmp / "oracle.st", trace.trace_oracle(ckpt, ids), "float64", ids, source="oracle"),
             "hf": _write(tmp / "hf.st", trace.trace_hf(ckpt, ids), "float32", ids, source="hf")}
    return {k: load_trace(v) for k, v in paths.items()}


@pytest.mark.parametrize("which", ["nano", "make_tiny", "hf_saved"])
def test_kimi_ref_fp32_agrees_with_oracle_and_hf_at_every_activation(which, tiny_ckpt, hf_saved, tmp_path):
    ckpt, ids = {"nano": (NANO_DIR, IDS), "make_tiny": (tiny_ckpt, IDS), "hf_saved": (hf_saved, SMALL_IDS)}[which]
    t = _traces(ckpt, ids, tmp_path)
    names = list(t["kimi"].tensors)
    assert names == list(t["oracle"].tensors) == list(t["hf"].tensors) == canonical_order(names)
    layers = {n.split(".")[1] for n in names if n.startswith("layers.")}
    assert names[0] == "embed" and names[-2:] == ["final_norm", "logits"] and len(layers) >= 2
    assert any(n.endswith("router_experts") for n in names) and any(n.endswith("q_latent") for n in names)
    for other in ("oracle", "hf"):
        c = diff.compare(t["kimi"], t[other])
        assert c.tolerance == 1e-5 and not c.only_in_a and not c.only_in_b
        assert c.first_past is None, diff.report(c)
        assert all(flipped == 0 for flipped, _ in c.flips.values()), c.flips
        assert len(c.rows) == len([n for n in names if not n.endswith("router_experts")])
    # HF against the oracle too: three independent implementations, one answer
    assert diff.compare(t["hf"], t["oracle"]).first_past is None


def _bugged_trace(ckpt: Path, ids, bug) -> dict[str, torch.Tensor]:
    model = kimi_ref.load_model(ckpt, dtype=torch.float32, progress=False)
    bug(model)
    return trace.record_kimi(model, torch.tensor(ids))


BUGS = {
    # (what is broken, where the diff must first light up)
    "post_attention_layernorm eps 1e-5 -> 1e-1 in layer 2": (
        lambda m: setattr(m.model.layers[2].post_attention_layernorm, "eps", 1e-1), "layers.2.mlp_in"),
    "softmax scale 576^-1/2 (the absorbed width) in layer 1": (
        lambda m: setattr(m.model.layers[1].self_attn, "scale", 576 ** -0.5), "layers.1.attn_out"),
    "router bias dropped in layer 3": (
        lambda m: m.model.layers[3].mlp.gate.e_score_correction_bias.zero_(), "layers.3.mlp_out"),
}


@pytest.mark.parametrize("bug", list(BUGS), ids=list(BUGS))
def test_an_injected_bug_is_found_at_its_layer_and_activation(bug, tmp_path):
    """On kimi-nano as trained; each bug is one that ports of DeepSeek-V3-style models have had."""
    with torch.no_grad():
        bugged = _bugged_trace(NANO_DIR, IDS, BUGS[bug][0])
    a = load_trace(_write(tmp_path / "bug.st", bugged, "float32", source="kimi_ref (bugged)"))
    b = load_trace(_write(tmp_path / "oracle.st", trace.trace_oracle(NANO_DIR, IDS), "float64", source="oracle"))
    c = diff.compare(a, b)
    assert c.first_past is not None and c.first_past.name == BUGS[bug][1], diff.report(c)
    assert c.first_past.rel_error > 10 * c.tolerance  # not a borderline call
    assert "<< first past tolerance" in diff.report(c)


def test_router_flips_are_counted_as_sets(tmp_path):
    base = {"embed": torch.zeros(1, 4, 2), "layers.1.router_experts": torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]]])}
    other = dict(base, **{"layers.1.router_experts": torch.tensor([[[1, 0], [2, 3], [4, 6], [6, 7]]])})
    ids = [[1, 2, 3, 4]]
    c = diff.compare(load_trace(_write(tmp_path / "a.st", base, "float32", ids)),
                     load_trace(_write(tmp_path / "b.st", other, "float32", ids)))
    assert c.flips == {1: (1, 4)}  # order within a token does not count, a different expert does
    assert "layer 1: 1/4 (25.0%)" in diff.report(c)


def test_tolerance_row_is_the_less_precise_side_and_ulps_count_bf16_steps(tmp_path):
    ids = [[1, 2]]
    ref = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]]], dtype=torch.float64)
    one_ulp = ref.to(torch.bfloat16).clone()
    one_ulp[0, 1, 0] = torch.tensor(3.0 + 2**-6, dtype=torch.bfloat16)  # bf16 spacing at 3 is 2^-6
    a = load_trace(_write(tmp_path / "a.st", {"embed": one_ulp}, "bfloat16", ids))
    b = load_trace(_write(tmp_path / "b.st", {"embed": ref}, "float64", ids))
    c = diff.compare(a, b)
    assert c.precision == torch.bfloat16 and c.tolerance == 2e-2
    assert c.rows[0].max_ulp == 1 and c.rows[0].rel_error == pytest.approx(2**-6 / 3.0)
    worse = one_ulp.clone()
    worse[0, 0, 1] = -2.5
    c = diff.compare(load_trace(_write(tmp_path / "w.st", {"embed": worse}, "bfloat16", ids)), b)
    assert c.first_past is not None and c.first_past.name == "embed"


def test_triton_backend_trace_equals_torch(tmp_path):
    """--backend triton on the CPU: the kernels in the interpreter (IEEE fp32 dots) or their torch
    fallbacks; either way within the float32 row of the torch path, activation by activation."""
    torch_run = trace.trace_kimi(NANO_DIR, SMALL_IDS)
    triton_run = trace.trace_kimi(NANO_DIR, SMALL_IDS, backend="triton")
    c = diff.compare(load_trace(_write(tmp_path / "triton.st", triton_run, "float32", SMALL_IDS)),
                     load_trace(_write(tmp_path / "torch.st", torch_run, "float32", SMALL_IDS)))
    assert c.first_past is None, diff.report(c)


def test_tp2_trace_equals_tp1(tmp_path):
    one = trace.trace_kimi(NANO_DIR, IDS)
    two = trace.trace_kimi(NANO_DIR, IDS, tp=2)
    assert list(one) == list(two)
    c = diff.compare(load_trace(_write(tmp_path / "tp2.st", two, "float32", source="kimi_ref", tp=2)),
                     load_trace(_write(tmp_path / "tp1.st", one, "float32", source="kimi_ref", tp=1)))
    assert c.first_past is None, diff.report(c)
    assert all(flipped == 0 for flipped, _ in c.flips.values())


# ---- the command lines ---------------------------------------------------------------------------------------


def test_trace_and_diff_command_lines(tmp_path, capsys):
    out = tmp_path / "nano_f32.safetensors"
    args = [str(NANO_DIR), "--prompt", "What is 12 + 30?", "--out", str(out)]
    assert trace.main(args) == 0 and out.is_file()
    header = load_trace(out).header
    assert header["source"] == "kimi_ref" and header["dtype"] == "float32" and header["backend"] == "torch"
    assert header["prompt"] == "What is 12 + 30?" and header["checkpoint"] == str(NANO_DIR.resolve())
    assert header["input_ids"][0] == kimi_ref.tokenizer.Tokenizer.from_pretrained(NANO_DIR).encode("What is 12 + 30?")
    assert {"kimi_ref", "torch", "numpy"} <= set(header["versions"])
    before = out.read_bytes()
    assert trace.main(args) == 2 and "already exists (pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    oracle = tmp_path / "oracle.safetensors"
    assert trace.main([str(NANO_DIR), "--prompt", "What is 12 + 30?", "--oracle", "--out", str(oracle)]) == 0
    capsys.readouterr()
    png = tmp_path / "err.png"
    assert diff.main([str(out), str(oracle), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "every activation is within tolerance (1.0e-05)" in printed and "layers.3" not in printed
    assert "3      residual" in printed and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert diff.main([str(out), str(oracle), "--plot", str(png)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert diff.main([str(out), str(oracle), "--plot", str(png), "--force"]) == 0
    assert diff.main([str(out), str(oracle), "--plot", str(tmp_path / "no_dir" / "e.png")]) == 2
    assert "no_dir does not exist" in capsys.readouterr().err
    bf16 = tmp_path / "bf16.safetensors"
    assert trace.main([str(NANO_DIR), "--ids", "5,17,300", "--dtype", "bfloat16", "--out", str(bf16)]) == 0
    assert load_trace(bf16).tensors["layers.1.residual"].dtype == torch.bfloat16  # stored as computed
    assert trace.main([str(NANO_DIR), "--ids", "5,17,300", "--dtype", "bfloat16", "--out", str(bf16), "--force"]) == 0


def test_command_line_errors(tmp_path, tiny_ckpt, hf_saved, capsys):
    out = str(tmp_path / "t.st")
    cases = [
        ([str(NANO_DIR), "--out", out], "exactly one of --prompt TEXT and --ids"),
        ([str(NANO_DIR), "--ids", "1,x", "--out", out], "--ids must be comma-separated integers"),
        ([str(hf_saved), "--prompt", "hi", "--out", out], "no tiktoken.model to turn --prompt into tokens; pass --ids"),
        ([str(NANO_DIR), "--ids", "1", "--oracle", "--dtype", "bfloat16", "--out", out], "the oracle is float64"),
        ([str(NANO_DIR), "--ids", "1", "--hf", "--tp", "2", "--out", out], "--backend, --tp and --device are kimi_ref's"),
        ([str(NANO_DIR), "--ids", "1,99999", "--out", out], "outside the vocabulary"),
        ([str(NANO_DIR), "--ids", "1", "--tp", "3", "--out", out], "--tp 3 does not divide the model"),
        ([str(tmp_path / "nowhere"), "--ids", "1", "--out", out], "nowhere"),
        ([str(NANO_DIR), "--ids", "1", "--out", str(tmp_path / "no_dir" / "t.st")], "no_dir does not exist"),
    ]
    for argv, message in cases:
        assert trace.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not Path(out).exists()


def test_diff_errors_name_the_file_and_what_was_expected(tmp_path, capsys):
    a = _write(tmp_path / "a.st", {"embed": torch.ones(1, 2, 3)}, "float32", [[1, 2]])
    b = _write(tmp_path / "b.st", {"embed": torch.ones(1, 2, 3)}, "float32", [[1, 3]])
    c = _write(tmp_path / "c.st", {"embed": torch.ones(1, 2, 4)}, "float32", [[1, 2]])
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    (tmp_path / "junk.st").write_bytes(b"not a safetensors file")
    cases = [((a, b), "traced different token ids"), ((a, c), "activation 'embed': shape (1, 2, 3)"),
             ((a, plain), "no 'kimi_ref_trace' metadata"), ((a, tmp_path / "junk.st"), "not a safetensors file"),
             ((a, tmp_path / "none.st"), "no such trace file")]
    for (x, y), message in cases:
        assert diff.main([str(x), str(y)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(TraceError, match=r"'dtype' is 'int8', expected one of"):
        save_trace(tmp_path / "d.st", {"embed": torch.ones(1, 2, 3)}, {"input_ids": [[1, 2]], "dtype": "int8"})
    with pytest.raises(TraceError, match=r"activation 'embed' has shape \(2, 3\); every activation starts with"):
        load_trace(save_trace(tmp_path / "e.st", {"embed": torch.ones(2, 3)}, {"input_ids": [[1, 2]], "dtype": "float32"}))
    with pytest.raises(TraceError, match=r"already exists \(pass --force"):
        save_trace(a, {"embed": torch.ones(1, 2, 3)}, {"input_ids": [[1, 2]], "dtype": "float32"})


def test_another_engine_can_write_a_trace(tmp_path, capsys):
    """Only the documented header fields, written with the safetensors library alone: the diff reads it."""
    from safetensors.numpy import save_file

    ids = [[3, 1, 4]]
    ours = trace.trace_oracle(NANO_DIR, ids)
    theirs = {"logits": ours["logits"].numpy().astype(np.float16), "embed": ours["embed"].numpy().astype(np.float16)}
    path = tmp_path / "engine.safetensors"
    save_file(theirs, str(path), metadata={"kimi_ref_trace": json.dumps({"format": 1, "input_ids": ids,
                                                                          "dtype": "float16"})})
    oracle = _write(tmp_path / "o.st", ours, "float64", ids)
    assert diff.main([str(path), str(oracle)]) == 0
    printed = capsys.readouterr().out
    assert "(float16, kimi_ref/tolerances.py)" in printed and "only in B (not compared): layers.0.attn_in" in printed
    t = load_trace(path)
    assert list(t.tensors) == ["embed", "logits"]  # forward order, whatever order the file holds


def test_chapter_14_solutions(tmp_path):
    from chapter_solutions import load_solutions

    sol = load_solutions("14_numerics")
    oracle = load_trace(_write(tmp_path / "o.st", trace.trace_oracle(NANO_DIR, IDS), "float64"))
    bugged = _bugged_trace(NANO_DIR, IDS, BUGS["post_attention_layernorm eps 1e-5 -> 1e-1 in layer 2"][0])
    c = diff.compare(load_trace(_write(tmp_path / "b.st", bugged, "float32")), oracle)
    assert sol.first_step(c).name == "layers.2.mlp_in"
    clean = diff.compare(load_trace(_write(tmp_path / "f.st", trace.trace_kimi(NANO_DIR, IDS), "float32")), oracle)
    assert sol.first_step(clean) is None  # noise grows; it does not step
    a = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    assert sol.flip_fraction(a, torch.tensor([[[1, 0], [2, 3], [4, 6], [7, 5]]])) == 0.5
    assert sol.flip_fraction(a, a.flip(-1)) == 0.0
    assert sol.flip_fraction(a, a) == diff.expert_flips(a, a) / 4
    with pytest.raises(ValueError, match="do not pair up"):
        sol.flip_fraction(a, a[:, :2])
