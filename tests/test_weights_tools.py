"""The ``python -m weights_tools.*`` command lines, each run in a subprocess as a user would.

* make_tiny: both layouts; the files are a function of the seed (byte-identical across processes).
* inspect: layers, experts, dtypes and bytes per component, from the headers.
* verify: 0 on a sound checkpoint; 1 and every problem, named, on a broken one.
* memory_plan: per-rank bytes for the real config at TP 8 and 256K context equal an independent count
  from the sources §5 shapes.
* dequantize: one expert to bf16, equal to the float64 oracle's dequantization.
Error paths run in-process through each tool's ``main(argv)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_ref.checkpoint import INDEX_FILE
from kimi_ref.config import fixture_path, load_config
from kimi_ref.oracle.checkpoint import load_weights
from weights_tools import dequantize, inspect, make_tiny, memory_plan, verify

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny.make_tiny(tmp_path_factory.mktemp("wt") / "k25", "kimi_k25", seed=0)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---- make_tiny -------------------------------------------------------------------------------------------


def test_make_tiny_cli_is_deterministic(tmp_path):
    r = run_cli("weights_tools.make_tiny", str(tmp_path / "a"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "kimi_k25 layout, seed 3" in r.stdout
    make_tiny.make_tiny(tmp_path / "b", "kimi_k25", seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "same seed, different bytes"
    make_tiny.make_tiny(tmp_path / "c", "kimi_k25", seed=4)
    c = _files(tmp_path / "c")
    shards = [k for k in a if k.endswith(".safetensors")]
    assert len(shards) == 6 and all(a[k] != c[k] for k in shards), "the seed does not change the weights"
    assert a["config.json"] == c["config.json"]


def test_make_tiny_cli_flat_layout(tmp_path):
    r = run_cli("weights_tools.make_tiny", str(tmp_path / "flat"), "--layout", "flat")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "flat" / INDEX_FILE).read_text())
    assert "lm_head.weight" in index["weight_map"]
    assert not any(n.startswith(("language_model.", "vision_tower.", "mm_projector.")) for n in index["weight_map"])
    assert verify.problems(tmp_path / "flat")[1] == []


def test_make_tiny_refuses(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert make_tiny.main([str(tmp_path / "x")]) == 2
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_tiny.main([str(tmp_path / "y"), "--layout", "kimi_k3"])
    with pytest.raises(make_tiny.MakeTinyError, match="--layout must be one of"):
        make_tiny.make_tiny(tmp_path / "z", "kimi_k3")


# ---- inspect ---------------------------------------------------------------------------------------------


def test_inspect_cli(tiny):
    r = run_cli("weights_tools.inspect", str(tiny))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "kimi_k25 layout" in out and "layers: 3 (dense MLP: 0; MoE: 1..2), d = 64, vocabulary 4096" in out
    assert "8 routed (top-2, width 32) + 1 shared" in out
    assert "INT4 Linear modules (weight_packed): 48" in out  # 2 MoE layers × 8 experts × 3 projections
    assert "6 shard(s), 222 tensors" in out
    # routed experts, from the headers: 48 × (packed 32·8·4 or 64·4·4 B, scale 32·2·2 or 64·1·2 B, shape 8 B)
    per_expert = 2 * (32 * 8 * 4 + 32 * 2 * 2 + 8) + (64 * 4 * 4 + 64 * 1 * 2 + 8)
    row = next(line for line in out.splitlines() if line.startswith("routed_experts"))
    assert row.split()[1] == "144" and row.split()[2] == f"{16 * per_expert / 1e3:.2f}"
    assert "vision_tower" in out and "mm_projector" in out


def test_inspect_reports_problems(tiny, tmp_path, capsys):
    path = tmp_path / "c"
    shutil.copytree(tiny, path)
    (path / "model-00005-of-000006.safetensors").unlink()
    assert inspect.main([str(path)]) == 1  # it printed the summary, and says the checkpoint is not sound
    assert "problem(s) found in the index/headers: run python -m weights_tools.verify" in capsys.readouterr().out
    assert inspect.main([str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ---- verify ----------------------------------------------------------------------------------------------


def test_verify_cli(tiny, tmp_path):
    r = run_cli("weights_tools.verify", str(tiny))
    assert r.returncode == 0 and "OK: all 222 tensors match" in r.stdout, r.stdout + r.stderr
    path = tmp_path / "broken"
    shutil.copytree(tiny, path)
    index = json.loads((path / INDEX_FILE).read_text())
    name = "language_model.model.layers.2.mlp.experts.7.down_proj.weight_scale"
    shard = path / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.ones(64, 2, dtype=torch.bfloat16)  # down_proj [64, 32]: one scale per row, not two
    save_file(tensors, str(shard))
    (path / "model-00006-of-000006.safetensors").unlink()
    r = run_cli("weights_tools.verify", str(path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "problem(s):" in r.stdout
    assert f"tensor '{name}' in {shard}: shape [64, 2], expected [64, 1]: scale width 2 != in_features/32 = 32/32 = 1" in r.stdout
    assert f"{path / 'model-00006-of-000006.safetensors'}: shard missing from disk" in r.stdout


# ---- memory_plan -----------------------------------------------------------------------------------------


def _independent_rank_bytes(tp: int) -> dict[str, int]:
    """Per-rank bytes at the real K2.5 shapes (sources §5), counted here without kimi_ref."""
    bf, layers, moe_layers = 2, 61, 60
    d, vocab = 7168, 163840
    attention = bf * (1536 * d + 1536 + 12288 // tp * 1536 + 576 * d + 512 + 16384 // tp * 512 + d * 8192 // tp)
    expert = 2 * (2048 * 896 * 4 + 2048 * 224 * 2 + 8) + (d * 256 * 4 + d * 64 * 2 + 8)
    vit = 1152 * 3 * 14 * 14 + 1152 + 64 * 64 * 1152 + 27 * (
        4 * 1152 + 3456 * 1152 + 3456 + 1152 * 1152 + 1152 + 4304 * 1152 + 4304 + 1152 * 4304 + 1152) + 2 * 1152
    projector = 2 * 1152 + 4608 * 4608 + 4608 + 7168 * 4608 + 7168
    return {
        "routed_experts": moe_layers * (384 // tp) * expert,
        "attention": layers * attention,
        "shared_experts": moe_layers * bf * 3 * 2048 // tp * d,
        "router": moe_layers * (bf * 384 * d + 4 * 384),
        "dense_mlp": bf * 3 * 18432 // tp * d,
        "norms": bf * (layers * 2 * d + d),
        "embed_tokens": bf * vocab // tp * d,
        "lm_head": bf * vocab // tp * d,
        "vision_tower": bf * vit,
        "mm_projector": bf * projector,
    }


def test_memory_plan_real_config_tp8():
    config = load_config(fixture_path("kimi_k25"))
    want = _independent_rank_bytes(8)
    assert memory_plan.weight_bytes(config, 8) == want
    p = memory_plan.plan(config, 8, 262_144)
    assert p.kv_cache == 262_144 * 61 * (512 + 64) * 2  # replicated latent cache, bf16
    assert p.total == sum(want.values()) + p.kv_cache + p.activations["peak"] + memory_plan.OVERHEAD
    assert p.fits["H200 141GB"] > 0 > p.fits["H100 80GB"]  # fits 8×H200 at 256K; 8×80 GB does not
    assert 0 < memory_plan.max_context(config, 8, 1, 1024, memory_plan.GPUS["H100 80GB"]) < 262_144
    # The weights of all ranks together are the whole checkpoint plus the replicated parts, 7 more times.
    replicated = sum(want[c] for c in ("router", "norms", "vision_tower", "mm_projector"))
    replicated += 61 * 2 * (1536 * 7168 + 1536 + 576 * 7168 + 512)
    total_ckpt = sum(s for s in _independent_rank_bytes(1).values())
    assert 8 * sum(want.values()) - 7 * replicated == total_ckpt


def test_memory_plan_cli(tiny, capsys):
    r = run_cli("weights_tools.memory_plan", "--config", str(fixture_path("kimi_k25")), "--tp", "8", "--context", "262144")
    assert r.returncode == 0, r.stderr
    want = sum(_independent_rank_bytes(8).values())
    assert f"weights             {want / 1e9:6.2f} GB" in r.stdout
    assert "8 × H200 141GB" in r.stdout and "fits" in r.stdout and "does NOT fit" in r.stdout
    assert "KV cache per token: 70,272 B" in r.stdout  # 61 × 576 × 2
    # A checkpoint directory works too; bad sizes are refused with the reason.
    assert memory_plan.main([str(tiny), "--tp", "2", "--context", "128"]) == 0
    assert "TP=2, context 128 tokens" in capsys.readouterr().out
    assert memory_plan.main([str(tiny), "--tp", "3"]) == 2
    assert "--tp 3 does not divide the model" in capsys.readouterr().err
    assert memory_plan.main(["--config", str(fixture_path("kimi_k25")), "--context", "10000000"]) == 2
    assert "exceeds max_position_embeddings 262144" in capsys.readouterr().err


def test_memory_plan_pipeline_stages():
    """TP 8 × PP 2 on the real config: the stages' weights add up to TP 8's, each holding its block; the
    cache is split 31 + 30 layers; the plan judges the stage that needs the most."""
    config = load_config(fixture_path("kimi_k25"))
    whole = memory_plan.weight_bytes(config, 8)
    first = memory_plan.weight_bytes(config, 8, pp_size=2, stage=0)
    last = memory_plan.weight_bytes(config, 8, pp_size=2, stage=1)
    assert {c: first.get(c, 0) + last.get(c, 0) for c in whole} == whole
    assert "lm_head" not in first and "embed_tokens" not in last and "vision_tower" not in last
    assert first["dense_mlp"] == whole["dense_mlp"] and "dense_mlp" not in last  # layer 0 is stage 0's
    assert last["routed_experts"] == first["routed_experts"]  # 30 MoE layers each: 1..30 and 31..60
    p = memory_plan.plan(config, 8, 262_144, pp=2)
    assert p.stage == 0 and p.kv_cache == 262_144 * 31 * 576 * 2
    assert p.total == max(p.stage_totals) and len(p.stage_totals) == 2
    h100 = memory_plan.GPUS["H100 80GB"]
    assert memory_plan.plan(config, 8, 262_144).total > h100 > p.total  # one node does not fit, two do
    assert memory_plan.max_context(config, 8, 1, 1024, h100, pp=2) == 262_144


def test_link_traffic_per_token():
    """Bytes per decoded token between two nodes of 8, counted here from the module doc's rules."""
    config = load_config(fixture_path("kimi_k25"))
    d, V, L = 7168, 163840, 61
    pp2 = memory_plan.link_traffic(config, 8, 2)
    assert pp2.total_bytes == 8 * (40 + 16 + 2 * d) + 8 and pp2.messages == 4
    tp16 = memory_plan.link_traffic(config, 16, 1)
    edge = (1 + 2 * L) * 2 * 15 / 16 * 2 * d + 15 / 16 * V * 4 + 2 * 15 / 16 * 40
    assert tp16.total_bytes == pytest.approx(2 * edge) and tp16.link_bytes == pytest.approx(edge)
    assert tp16.seconds() > 30 * pp2.seconds()
    assert memory_plan.link_traffic(config, 8, 1).total_bytes == 0  # one node: nothing crosses
    assert memory_plan.link_traffic(config, 4, 2).total_bytes == 0  # both stages on one node of 8


def test_memory_plan_pp_cli(capsys):
    config = str(fixture_path("kimi_k25"))
    assert memory_plan.main(["--config", config, "--tp", "8", "--pp", "2", "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "TP=8 × PP=2" in out and "stages: 0: layers 0..30" in out and "1: layers 31..60" in out
    assert "16 × 80GiB GPU (80.00 GiB each): fits" in out and "longest context at batch 1: 262,144 tokens" in out
    assert "TP 8 × PP 2: 115.14 kB over all links" in out and "TP 16: " in out
    assert memory_plan.parse_bytes("141GB") == 141 * 10**9 and memory_plan.parse_bytes("81559MiB") == 81559 * 2**20
    assert memory_plan.main(["--config", config, "--gpu-mem", "80 potatoes"]) == 2
    assert "--gpu-mem '80 potatoes': expected a size such as 80GiB" in capsys.readouterr().err
    assert memory_plan.main(["--config", config, "--tp", "8", "--pp", "62"]) == 2
    assert "--pp 62 asks for more pipeline stages than the model has decoder layers" in capsys.readouterr().err


def test_machines_table_in_the_docs_is_the_tools():
    """docs/full_weight_run.md shows `memory_plan --machines` for the real config, as the tool prints it now."""
    config = load_config(fixture_path("kimi_k25"))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "full_weight_run.md").read_text(encoding="utf-8")
    begin, end = "<!-- memory_plan --machines: begin -->\n", "\n<!-- memory_plan --machines: end -->"
    assert begin in doc and end in doc, "the table's markers are missing from docs/full_weight_run.md"
    shown = doc.split(begin, 1)[1].split(end, 1)[0]
    assert shown == memory_plan.machines_table(config, config.max_position_embeddings), \
        "regenerate it: python -m weights_tools.memory_plan --config kimi_ref/data/configs/kimi_k25.json --machines"


# ---- dequantize ------------------------------------------------------------------------------------------


def test_dequantize_cli_matches_oracle(tiny, tmp_path):
    out = tmp_path / "expert.safetensors"
    r = run_cli("weights_tools.dequantize", str(tiny), "--layer", "1", "--expert", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "layer 1 expert 3 gate_proj.weight: [32, 64] torch.bfloat16" in r.stdout
    got = load_file(str(out))
    _, weights = load_weights(tiny)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        ref = weights[f"model.layers.1.mlp.experts.3.{proj}.weight"]
        w = got[f"{proj}.weight"]
        assert w.dtype == torch.bfloat16
        assert np.array_equal(w.double().numpy(), torch.from_numpy(ref).to(torch.bfloat16).double().numpy()), proj
        exact = dequantize.dequantize_expert(tiny, 1, 3, torch.float32)[f"{proj}.weight"]
        assert np.array_equal(exact.double().numpy(), ref), f"{proj}: float32 dequantization is exact"


def test_dequantize_errors(tiny, capsys):
    assert dequantize.main([str(tiny), "--layer", "0", "--expert", "0"]) == 2
    assert "--layer 0 has no routed experts; MoE layers are 1..2" in capsys.readouterr().err
    assert dequantize.main([str(tiny), "--layer", "1", "--expert", "8"]) == 2
    assert "--expert 8 is outside 0..7" in capsys.readouterr().err


def test_write_checkpoint_checks_the_tensors(tiny, tmp_path):
    """``write_checkpoint`` (also used by train_nano) writes exactly the config's list, or refuses."""
    config = load_config(tiny)
    tensors = {}
    for shard in sorted(set(json.loads((tiny / INDEX_FILE).read_text())["weight_map"].values())):
        tensors.update(load_file(str(tiny / shard)))
    out = make_tiny.write_checkpoint(tmp_path / "again", config, dict(reversed(list(tensors.items()))))
    assert _files(out) == _files(tiny)  # the dict's order does not matter
    name = "language_model.model.norm.weight"
    bad = {**tensors, name: tensors[name].float()}
    with pytest.raises(make_tiny.MakeTinyError, match=f"wrong .*{name}: torch.float32 \\[64\\], expected BF16 \\[64\\]"):
        make_tiny.write_checkpoint(tmp_path / "bad", config, bad)
    with pytest.raises(make_tiny.MakeTinyError, match="unexpected \\['extra.weight'\\]"):
        make_tiny.write_checkpoint(tmp_path / "bad", config, {**tensors, "extra.weight": torch.zeros(1)})
