"""Tensor and pipeline parallelism end to end on the CPU (gloo, spawned ranks): TP = 2, 4, 8 and
TP × PP = 2 × 2, 1 × 3, 4 × 2 agree with TP = 1.

For each TP size the ranks load only their slices of a tiny checkpoint (real layout, INT4 experts) and
compute, in float32: the logits of a prompt, a greedy continuation through the latent KV cache, and a
seeded top-p sample. Rank 0's results must equal the single-process ones: logits within the float32
row of ``tolerances.py``, and the very same tokens.

The shipped tiny config has 4 heads, so TP 8 needs a variant with 8 heads (:func:`write_tiny`);
vocabulary 4096, 8 experts and the MLP widths divide 8 already. Its 3 layers split 2 + 1 (PP 2) and
1 + 1 + 1 (PP 3). Two torchrun "nodes" on localhost: tests/test_multinode.py.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from kimi_ref import parallel
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.launch import LaunchError, check_device, launch, rank_device, sub_tp, torchrun_env
from kimi_ref.parallel import PP, TPError
from tolerances import assert_close
from chapter_solutions import load_solutions

PROMPT = [5, 17, 300, 42, 1000, 7, 2048, 99, 3]


def write_tiny(out: Path, **overrides) -> Path:
    """A tiny checkpoint written by weights_tools.make_tiny, with ``tiny_config`` sizes overridden."""
    from weights_tools import make_tiny

    config = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=make_tiny.TINY_VOCAB, **overrides)
    with mock.patch.object(make_tiny, "tiny_checkpoint_config", lambda layout="kimi_k25": config):
        return make_tiny.make_tiny(out, "kimi_k25", seed=0, force=True)


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny8"), num_attention_heads=8)


def _rank_results(tp, device, ckpt: str, prompt: list[int]):
    """Run on every rank; rank 0's return value comes back from launch()."""
    import kimi_ref
    from kimi_ref.generate import generate

    model = kimi_ref.load_model(ckpt, device=device, dtype=torch.float32, tp=tp, progress=False)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device))
    greedy = generate(model, prompt, max_new_tokens=6, temperature=0)
    sampled = generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=0.95, seed=1234)
    return logits.cpu(), greedy.tokens, sampled.tokens, greedy.finish_reason


LAYOUTS = [(2, 2), (1, 3), (4, 2)]  # (TP, PP): an even and an uneven split of 3 layers, one layer per stage


def _layout_results(world, device, ckpt: str, prompt: list[int], tp_size: int, pp_size: int):
    """TP × PP on ranks 0..T·P-1 of ``world`` (every rank calls it): rank 0 returns what _rank_results does,
    with the logits the last stage computed (sent to rank 0 through parallel.send/recv)."""
    import kimi_ref
    from kimi_ref.generate import generate

    tp, pp = parallel.make_layout(world, tp_size, pp_size)
    if tp is None:
        return None
    model = kimi_ref.load_model(ckpt, device=device, dtype=torch.float32, tp=tp, pp=pp, progress=False)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device))
    assert (logits is not None) == pp.last
    if not pp.last and world.rank == 0:  # rank 0's peer on the last stage sends its logits home
        logits = parallel.recv(torch.empty(1, len(prompt), model.config.vocab_size), pp.peer(pp.stages - 1), pp)
    elif pp.last and tp.rank == 0 and not pp.first:
        parallel.send(logits, pp.peer(0), pp)
    greedy = generate(model, prompt, max_new_tokens=6, temperature=0)
    sampled = generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=0.95, seed=1234)
    held = sorted(int(k) for k in model.model.layers.keys())
    return None if logits is None else logits.cpu(), greedy.tokens, sampled.tokens, greedy.finish_reason, held


def _every_tp_size(tp, device, ckpt: str, prompt: list[int]):
    """One launch of 8 ranks runs TP 1, 2, 4 and 8 (sub-groups of ranks 0..n-1) and the TP × PP layouts:
    7 worker starts, not 22."""
    results = {}
    for n in (1, 2, 4, 8):
        sub = sub_tp(tp, n)
        if sub is not None:
            out = _rank_results(sub, device, ckpt, prompt)
            if tp.rank == 0:
                results[n] = out
    for layout in LAYOUTS:
        out = _layout_results(tp, device, ckpt, prompt, *layout)
        if tp.rank == 0:
            results[layout] = out
    return results


@pytest.fixture(scope="module")
def by_tp(ckpt8):
    return launch(_every_tp_size, 8, "cpu", str(ckpt8), PROMPT, timeout_s=300)


@pytest.fixture(scope="module")
def single(by_tp):
    # TP 1 inside the launch ran in rank 0's process without any group; check it equals a plain run too.
    return by_tp[1]


def test_tp1_inside_launch_is_a_plain_single_process_run(ckpt8, single):
    plain = _rank_results(parallel.SINGLE, "cpu", str(ckpt8), PROMPT)
    assert torch.equal(plain[0], single[0]) and plain[1:] == single[1:]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_tp_matches_single_process(by_tp, single, world_size):
    logits, greedy, sampled, reason = by_tp[world_size]
    assert_close(logits, single[0], torch.float32, what=f"TP {world_size} logits vs TP 1")
    assert greedy == single[1], f"TP {world_size} greedy tokens differ from TP 1"
    assert sampled == single[2], f"TP {world_size} seeded sampled tokens differ from TP 1"
    assert reason == single[3] == "length" and len(greedy) == 6


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}xpp{l[1]}")
def test_pipeline_stages_match_single_process(by_tp, single, layout):
    logits, greedy, sampled, reason, held = by_tp[layout]
    assert_close(logits, single[0], torch.float32, what=f"TP {layout[0]} × PP {layout[1]} logits vs TP 1")
    assert greedy == single[1], f"TP {layout[0]} × PP {layout[1]} greedy tokens differ from TP 1"
    assert sampled == single[2], f"TP {layout[0]} × PP {layout[1]} seeded sampled tokens differ from TP 1"
    assert reason == single[3]
    assert held == list(parallel.stage_layers(3, layout[1])[0])  # rank 0 holds only stage 0's layers


def test_stage_holds_its_block_only():
    """Stage 1 of 2 of the 3-layer tiny model: layer 2 (keyed by its global index), the final norm and
    lm_head; no embedding, no vision tower; its cache covers its own layer only."""
    from kimi_ref.model import KimiForCausalLM

    config = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=4096)
    assert [list(r) for r in parallel.stage_layers(61, 2)] == [list(range(31)), list(range(31, 61))]
    assert [len(r) for r in parallel.stage_layers(61, 3)] == [21, 20, 20]
    last = KimiForCausalLM(config, pp=PP(stage=1, stages=2), device="meta")
    keys = last.state_dict().keys()
    assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == {"2"}
    assert "lm_head.weight" in keys and "model.norm.weight" in keys
    assert not any(k.startswith(("model.embed_tokens.", "vision_tower.", "mm_projector.")) for k in keys)
    first = KimiForCausalLM(config, pp=PP(stage=0, stages=2), device="meta")
    keys = first.state_dict().keys()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys and "model.norm.weight" not in keys
    assert any(k.startswith("vision_tower.") for k in keys)
    assert first.model.layers[1] is list(first.model.layers)[1]
    with pytest.raises(IndexError, match="layer 2 is not in this block"):
        first.model.layers[2]


def test_a_stage_reads_only_its_shards(ckpt8, monkeypatch):
    """The tiny checkpoint keeps one shard per layer, one for embedding / norm / lm_head, two for vision:
    stage 1 of 2 (layer 2, norm, lm_head) opens only the shards of layer 2 and of the head."""
    import json

    import kimi_ref
    from kimi_ref import checkpoint

    weight_map = json.loads((ckpt8 / "model.safetensors.index.json").read_text())["weight_map"]
    opened, real_open = [], checkpoint.safe_open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", recording_open)  # every shard read goes through it
    model = kimi_ref.load_model(ckpt8, dtype=torch.float32, pp=PP(stage=1, stages=2), progress=False)
    want = {weight_map["language_model.model.layers.2.input_layernorm.weight"], weight_map["language_model.lm_head.weight"]}
    assert set(opened) == want and len(want) < len(set(weight_map.values()))
    assert [layer.layer_idx for layer in model.model.layers] == [2] and model.model.embed_tokens is None


def test_bad_layouts_are_refused(ckpt8):
    import kimi_ref

    config = load_config(ckpt8 / "config.json")
    with pytest.raises(TPError, match="--pp 4 asks for more pipeline stages than the model has decoder layers "
                                      r"\(num_hidden_layers = 3\)"):
        parallel.validate_layout(config, 1, 4)
    with pytest.raises(TPError, match=r"--tp 2 × --pp 2 = 4 ranks, but there are 8 processes"):
        parallel.validate_layout(config, 2, 2, world_size=8)
    with pytest.raises(TPError, match="--pp .* positive integer"):
        parallel.validate_layout(config, 1, 0)
    with pytest.raises(TPError, match="--tp 3 does not divide"):
        parallel.validate_layout(config, 3, 1)
    with pytest.raises(TPError, match="more pipeline stages"):
        kimi_ref.load_model(ckpt8, pp=PP(stage=0, stages=5), progress=False)


def test_chat_refuses_bad_layouts(monkeypatch, capsys):
    """Before any rank starts: more stages than layers (kimi-nano has 4), and a torchrun world that
    disagrees with --tp × --pp."""
    from kimi_ref import chat

    assert chat.main(["--pp", "5", "--device", "cpu", "--prompt", "hi"]) == 2
    assert "--pp 5 asks for more pipeline stages than the model has decoder layers" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert chat.main(["--tp", "2", "--pp", "2", "--device", "cpu", "--prompt", "hi"]) == 2
    assert ("torchrun started 2 processes (WORLD_SIZE), but --tp 2 × --pp 2 = 4; they must be equal"
            in capsys.readouterr().err)


def test_separate_tp2_launch(ckpt8, single):
    # The plain path users take: a launch of exactly 2 ranks on the default group.
    logits, greedy, sampled, _ = launch(_rank_results, 2, "cpu", str(ckpt8), PROMPT, timeout_s=120)
    assert_close(logits, single[0], torch.float32, what="TP 2 (own launch) logits vs TP 1")
    assert (greedy, sampled) == (single[1], single[2])


@pytest.fixture(scope="module")
def ckpt_bias(tmp_path_factory) -> Path:
    """The tiny checkpoint with attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases."""
    from weights_tools import make_tiny

    config = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=make_tiny.TINY_VOCAB).replace(attention_bias=True)
    with mock.patch.object(make_tiny, "tiny_checkpoint_config", lambda layout="kimi_k25": config):
        return make_tiny.make_tiny(tmp_path_factory.mktemp("bias"), "kimi_k25", seed=0, force=True)


def test_tp2_with_attention_bias_matches_single_process(ckpt_bias):
    """o_proj's bias is added once, after the all-reduce: a bias added on every rank before it would be
    counted twice at TP 2 (and the replicated q_a/kv_a biases must not be split or summed)."""
    import kimi_ref

    model = kimi_ref.load_model(ckpt_bias, progress=False)
    assert all(float(layer.self_attn.o_proj.bias.detach().abs().max()) > 0.01 for layer in model.model.layers)
    one = _rank_results(parallel.SINGLE, "cpu", str(ckpt_bias), PROMPT)
    two = launch(_rank_results, 2, "cpu", str(ckpt_bias), PROMPT, timeout_s=120)
    assert_close(two[0], one[0], torch.float32, what="TP 2 logits with attention_bias vs TP 1")
    assert two[1:3] == one[1:3], "TP 2 tokens with attention_bias differ from TP 1"


def test_tp_changes_something(single):
    # The check above could pass vacuously if every rank computed everything: make sure it does not.
    # A TP-8 model holds 1/8 of the vocabulary rows of the embedding on each rank.
    from kimi_ref.model import KimiForCausalLM

    config = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=4096, num_attention_heads=8)
    model = KimiForCausalLM(config, tp=parallel.TP(rank=3, world_size=8), device="meta")
    assert model.model.embed_tokens.weight.shape[0] == 4096 // 8
    assert len(single[1]) == 6 and len(set(single[1] + single[2])) > 1  # not a degenerate constant output


def _fails_on_rank_1(tp, device):
    if tp.rank == 1:
        raise RuntimeError("worker failure for the test")
    buf = torch.zeros(1)
    parallel.all_reduce(buf, tp)  # rank 1 never joins: gloo notices the closed connection
    return "unreachable"


def test_dead_worker_is_reported():
    with pytest.raises((LaunchError, RuntimeError)):
        launch(_fails_on_rank_1, 2, "cpu", timeout_s=30)


def test_tp_size_not_dividing_the_model_is_refused(ckpt8):
    import kimi_ref

    with pytest.raises(TPError, match="--tp 3 does not divide the model: num_attention_heads = 8"):
        kimi_ref.load_model(ckpt8, tp=parallel.TP(rank=0, world_size=3), progress=False)
    with pytest.raises(TPError, match="positive integer"):
        launch(_rank_results, 0, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(LaunchError, match="torch sees no CUDA GPU"):
        check_device("cuda", 1)
    with pytest.raises(LaunchError, match="not a device torch knows"):
        check_device("gpu0", 1)
    with pytest.raises(LaunchError, match="only 'cpu' and 'cuda'"):
        check_device("meta", 1)


def test_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == (1, 2, 1)
    with pytest.raises(LaunchError, match="torchrun started 2 processes .* but --tp is 4"):
        launch(_rank_results, 4, "cpu")
    with pytest.raises(LaunchError, match=r"torchrun started 2 processes .* but --tp 2 × --pp 2 is 4"):
        launch(_rank_results, 4, "cpu", flags="--tp 2 × --pp 2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LaunchError, match="must be integers"):
        torchrun_env()
    assert rank_device("cpu", 3) == "cpu" and rank_device("cuda", 3) == "cuda:3"


def test_shard_dims_follow_the_layout():
    # The layout table in parallel.py, as the model uses it (the chapter draws the same table).
    assert parallel.shard_dim("model.layers.1.self_attn.q_b_proj.weight") == 0
    assert parallel.shard_dim("model.layers.1.self_attn.o_proj.weight") == 1
    assert parallel.shard_dim("model.layers.1.self_attn.kv_a_proj_with_mqa.weight") is None
    assert parallel.shard_dim("model.layers.1.mlp.experts.5.down_proj.weight_packed") is None
    assert parallel.shard_dim("model.layers.1.mlp.shared_experts.down_proj.weight") == 1
    assert parallel.shard_dim("lm_head.weight") == 0


def test_solutions_chapter_10(ckpt8):
    sol = load_solutions("10_parallel")
    config = load_config(fixture_path("kimi_k25"))
    # Exercise 1: valid TP sizes for the real model are the divisors of every split width.
    assert sol.valid_tp_sizes(config, 16) == [1, 2, 4, 8, 16]
    # Exercise 2: bytes each all-reduce moves for one decode token at d = 7168 in bf16, per layer.
    assert sol.allreduce_bytes_per_token(config, bytes_per_value=2) == 2 * 7168 * 2
    # Exercise 3: rank 0 holds R + S/N values (R replicated, S split): (c1 - c8) / (c1 - c2) = (7/8) / (1/2).
    small = tiny_config(config, vocab_size=4096, num_attention_heads=8)
    c = {n: sol.rank_stored_values(small, n) for n in (1, 2, 4, 8)}
    assert c[1] > c[2] > c[4] > c[8]
    assert (c[1] - c[8]) * 4 == (c[1] - c[2]) * 7
    # Exercise 4: at batch 1 each of P stages works 1/P of the time; P sequences in flight fill the bubble.
    assert sol.stage_busy_fraction(2, 1) == 0.5 and sol.stage_busy_fraction(2, 2) == 1.0
    assert sol.stage_busy_fraction(4, 3) == 0.75 and sol.stage_busy_fraction(4, 9) == 1.0
    with pytest.raises(ValueError, match="at least 1"):
        sol.stage_busy_fraction(0, 1)
