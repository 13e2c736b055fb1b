"""generate.py: top-p filtering, sampling, the prefill + decode loop, stop tokens, context refusals.

The decode loop is proven against the plain definition (recompute the whole sequence every step, no
cache), and sampling against its distribution. Everything runs in one process on the tiny model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref import moonvit
from kimi_ref.generate import (ContextError, check_context, expanded_length, generate, make_generator, media_rows,
                               sample_next, send_ids, stop_ids_for, top_p_filter)
from kimi_ref.model import KimiForCausalLM
from kimi_ref.tokenizer import Tokenizer
from tolerances import assert_close
from chapter_solutions import load_solutions

REPO = Path(__file__).resolve().parents[1]


def _model(max_position_embeddings: int | None = None, vision: bool = False) -> KimiForCausalLM:
    config = tiny_config(load_config(fixture_path("kimi_k25")), vocab_size=4096, vision=vision,
                         max_position_embeddings=max_position_embeddings)
    torch.manual_seed(0)
    model = KimiForCausalLM(config, dtype=torch.float32)
    with torch.no_grad():  # default init leaves some tensors empty/zero: give every one a real value
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> KimiForCausalLM:
    return _model()


# ---- top-p and sampling ---------------------------------------------------------------------------------

probs_strategy = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40).filter(lambda v: sum(v) > 1e-3)


@given(probs_strategy, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(values, top_p):
    p = torch.tensor(values, dtype=torch.float64)
    p = p / p.sum()
    kept = top_p_filter(p, top_p)
    keep = kept > 0
    assert torch.equal(kept[keep], p[keep]), "kept probabilities are unchanged (renormalized later)"
    assert keep[p.argmax()], "the most likely token is always kept"
    # Oracle: sort descending (stable), keep while the mass before a token is below top_p.
    order = sorted(range(len(values)), key=lambda i: -float(p[i]))
    before, expected = 0.0, set()
    for i in order:
        # top_p = 1 switches the filter off (a running float sum may reach 1.0 before the last token)
        if (before < top_p or top_p >= 1) and p[i] > 0:
            expected.add(i)
        before += float(p[i])
    assert set(torch.nonzero(keep).flatten().tolist()) == expected
    if top_p < 1:
        assert float(p[keep].sum()) >= top_p - 1e-12 or keep.sum() == (p > 0).sum()


def test_top_p_edge_exactly_reached():
    # The nucleus stops as soon as its mass reaches top_p: [0.5, 0.25, 0.25] at 0.5 keeps one token.
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert torch.equal(top_p_filter(p, 0.5), torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(top_p_filter(p, 0.75) > 0, torch.tensor([True, True, False]))  # ties: lower id first
    assert torch.equal(top_p_filter(p, 1.0), p)


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_sampling_follows_the_filtered_distribution():
    # 40 000 draws of a 6-token distribution after temperature and top-p: frequencies within 5 sigma.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    temperature, top_p = 0.7, 0.9
    p = torch.softmax(logits.double() / temperature, -1)
    nucleus = top_p_filter(p, top_p)
    expected = (nucleus / nucleus.sum()).numpy()
    n = 40_000
    draws = sample_next(logits.expand(n, -1), temperature, top_p, make_generator(7)).numpy()
    freq = np.bincount(draws, minlength=6) / n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)
    assert freq[expected == 0].sum() == 0, "a token outside the nucleus was drawn"


def test_seed_decides_the_draws():
    logits = torch.randn(3, 100)
    a = sample_next(logits, 1.0, 0.95, make_generator(1))
    assert torch.equal(a, sample_next(logits, 1.0, 0.95, make_generator(1)))
    draws = {tuple(sample_next(logits, 1.0, 1.0, make_generator(s)).tolist()) for s in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                                 dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError, match="temperature|top_p"):
        sample_next(torch.zeros(1, 4), **{"temperature": 1.0, "top_p": 0.9, **bad})


# ---- the loop ------------------------------------------------------------------------------------------


def test_cached_decode_equals_recomputing_everything(model):
    prompt = [11, 500, 4000, 7, 3000]
    steps: list[torch.Tensor] = []
    original_forward = model.forward

    def recording_forward(input_ids, cache=None, **kw):
        out = original_forward(input_ids, cache, **kw)
        steps.append(out[:, -1].detach().clone())
        return out

    model.forward = recording_forward
    try:
        result = generate(model, prompt, max_new_tokens=8, temperature=0)
    finally:
        del model.forward
    assert result.finish_reason == "length" and len(result.tokens) == 8
    sequence = prompt + result.tokens
    with torch.inference_mode():
        full = model(torch.tensor([sequence]))[0]
    for k, logits in enumerate(steps):  # step k predicted token k from the prompt + k new tokens
        assert_close(logits[0], full[len(prompt) - 1 + k], torch.float32, what=f"decode step {k} vs full forward")
        assert result.tokens[k] == int(full[len(prompt) - 1 + k].argmax())


def test_stop_token_ends_the_answer_and_is_kept(model):
    prompt = [11, 500, 4000]
    free = generate(model, prompt, max_new_tokens=6, temperature=0).tokens
    stop = free[2]
    first = free.index(stop)
    seen: list[int] = []
    result = generate(model, prompt, max_new_tokens=6, temperature=0, stop_ids=[stop], on_token=seen.append)
    assert result.tokens == free[:first + 1] and result.finish_reason == "stop"
    assert seen == result.tokens, "the streaming callback sees every token, in order"


def test_interrupt_stops_after_the_current_token(model):
    calls = []
    result = generate(model, [1, 2, 3], max_new_tokens=50, temperature=0,
                      should_stop=lambda: calls.append(1) or len(calls) >= 3)
    assert result.finish_reason == "interrupted" and len(result.tokens) == 3


def test_seeded_sampling_repeats(model):
    a = generate(model, [1, 2, 3], max_new_tokens=10, seed=5).tokens
    assert a == generate(model, [1, 2, 3], max_new_tokens=10, seed=5).tokens
    assert a != generate(model, [1, 2, 3], max_new_tokens=10, seed=6).tokens


def test_prompt_over_the_context_is_refused_before_running():
    small = _model(max_position_embeddings=16)
    calls = []
    small.forward = lambda *a, **k: calls.append(1)  # must never run
    with pytest.raises(ContextError, match="the prompt is 16 tokens, but the model's context .* is 16"):
        generate(small, list(range(16)), max_new_tokens=4)
    with pytest.raises(ContextError, match="empty"):
        generate(small, [], max_new_tokens=4)
    assert not calls


def test_generation_stops_when_the_context_is_full():
    small = _model(max_position_embeddings=16)
    result = generate(small, list(range(1, 13)), max_new_tokens=100, temperature=0)
    assert len(result.tokens) == 4 and result.finish_reason == "length"


def test_check_context_and_bad_lengths(model):
    check_context(10, 11)
    with pytest.raises(ContextError, match="at most 10 prompt tokens"):
        check_context(11, 11)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(model, [1], max_new_tokens=0)


# ---- images (media=) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_model() -> KimiForCausalLM:
    return _model(vision=True)


def _images(*sizes: tuple[int, int], seed: int = 0):
    """Random RGB images of the given (height, width), preprocessed: (pixel_values, grid_thws)."""
    rng = np.random.default_rng(seed)
    pre = [moonvit.preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), moonvit.default_media_config())
           for h, w in sizes]
    return torch.cat([pv for pv, _ in pre]), [grid for _, grid in pre]


def test_generate_with_images_equals_manual_prefill_then_greedy(vision_model):
    model = vision_model
    pad = model.config.media_placeholder_token_id
    pixel_values, grids = _images((30, 50), (60, 20))          # 28-padded: 2x2 and 1x3 merged rows
    rows = media_rows(grids, model.config.vision.merge_kernel_size)
    assert rows == [(g[1] // 2) * (g[2] // 2) for g in grids] == [4, 3]
    prompt = [11, pad, 500, 7, pad, 3000]
    expanded = len(prompt) + sum(r - 1 for r in rows)
    assert expanded_length(prompt, (pixel_values, grids), model.config) == expanded

    calls: list[tuple[set, torch.Tensor]] = []
    original_forward = model.forward

    def recording_forward(input_ids, cache=None, **kw):
        out = original_forward(input_ids, cache, **kw)
        calls.append(({k for k, v in kw.items() if v is not None}, out[:, -1].detach().clone()))
        return out

    model.forward = recording_forward
    try:
        result = generate(model, prompt, max_new_tokens=5, temperature=0, media=(pixel_values, grids))
    finally:
        del model.forward
    assert result.prompt_tokens == expanded and len(result.tokens) == 5
    assert calls[0][0] == {"pixel_values", "grid_thws"}, "the prefill gets the images"
    assert all(not kw for kw, _ in calls[1:]), "decode steps never see the images again"

    # The same by hand: prefill with the images through the model, then greedy steps on the cache.
    cache = model.new_cache(1, expanded + 5)
    manual: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, pixel_values=pixel_values, grid_thws=grids)[:, -1]
        assert cache.length == expanded
        for k in range(5):
            assert_close(calls[k][1][0], logits[0], torch.float32, what=f"step {k} with images vs manual")
            manual.append(int(logits[0].argmax()))
            logits = model(torch.tensor([[manual[-1]]]), cache)[:, -1]
    assert result.tokens == manual
    # The images are really read: other pixels move the prefill logits.
    with torch.inference_mode():
        moved = model(torch.tensor([prompt]), pixel_values=_images((30, 50), (60, 20), seed=1)[0], grid_thws=grids)
    assert not torch.allclose(moved[0, -1], calls[0][1][0])


def test_image_prompt_over_the_context_is_refused_before_running():
    small = _model(max_position_embeddings=16, vision=True)
    pad = small.config.media_placeholder_token_id
    media = _images((56, 56), (28, 28))                        # 4 rows + 1 row
    calls = []
    small.forward = lambda *a, **k: calls.append(1)  # must never run
    # 12 ids but 12 + 3 + 0 = 15 positions: fits (one left to answer); one more id does not.
    check_context(expanded_length([1] * 10 + [pad, pad], media, small.config), 16)
    with pytest.raises(ContextError, match="the prompt is 16 tokens, but the model's context .* is 16"):
        generate(small, [1] * 11 + [pad, pad], max_new_tokens=4, media=media)
    with pytest.raises(ValueError, match="2 <\\|media_pad\\|> placeholders .* but 1 image\\(s\\)"):
        generate(small, [1, pad, pad], max_new_tokens=4, media=_images((28, 28)))
    assert not calls
    del small.forward  # the class's forward again
    # The budget counts expanded positions too: 15 of 16 filled leaves one token.
    result = generate(small, [1] * 10 + [pad, pad], max_new_tokens=100, temperature=0, media=media)
    assert len(result.tokens) == 1 and result.finish_reason == "length" and result.prompt_tokens == 15


def test_images_need_a_vision_tower(model):
    with pytest.raises(ValueError, match="no vision tower"):
        generate(model, [1, 2, 3], max_new_tokens=2, media=_images((28, 28)))


def test_stop_ids_come_from_the_tokenizer_and_config(model):
    tok = Tokenizer.demo()
    ids = stop_ids_for(tok, model.config)
    assert ids[0] == tok.special_id("<|im_end|>")
    assert set(model.config.eos_token_ids) <= set(ids)
    assert tok.decode([ids[0]]) == "<|im_end|>"
    extra = max(tok.special_tokens.values()) + 1
    # generation_config.json's eos ids come after, each id once
    assert stop_ids_for(tok, model.config, (ids[0], extra, extra)) == (*ids, extra)


def test_send_ids_single_rank_is_identity():
    from kimi_ref.parallel import SINGLE

    assert send_ids([3, 1, 4], SINGLE) == [3, 1, 4]


def test_step_control_travels_as_one_tensor():
    """control.Step: verdict, token, the uniform draw and the sampling settings in one float64 tensor,
    exactly (every token id < 2^53; u to the last bit; NaN u = greedy)."""
    from kimi_ref import control
    from kimi_ref.parallel import ONE_STAGE, SINGLE

    u = float(torch.rand(1, generator=make_generator(3), dtype=torch.float64))
    step = control.Step(control.GO, 163_839, u, 1.0, 0.95)
    assert control.Step.from_tensor(step.tensor("cpu")) == step and step.goes_on and not step.greedy
    greedy = control.Step.from_tensor(control.Step(control.STOP, 2**52 + 1, float("nan"), 0.0, 0.95).tensor("cpu"))
    assert greedy.greedy and greedy.token == 2**52 + 1 and not greedy.goes_on
    assert control.FINISH_REASONS[greedy.verdict] == "stop"
    assert control.share_step(step, SINGLE) == step and control.token_home(7, ONE_STAGE) == 7  # one rank: no sends


def test_sampling_splits_into_rank_0s_draw_and_the_pick():
    """sample_next = pick_token(draw_uniform): rank 0 draws, the last pipeline stage picks, same token."""
    from kimi_ref.generate import draw_uniform, pick_token

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.5), (0.0, 0.95)):
        split = pick_token(logits, temperature, top_p, draw_uniform(3, temperature, make_generator(5)))
        assert torch.equal(split, sample_next(logits, temperature, top_p, make_generator(5)))
    assert draw_uniform(1, 0.0, make_generator(5)) is None  # greedy draws nothing: the stream stays in step
    with pytest.raises(ValueError, match=r"needs draws u \[3, 1\], found None"):
        pick_token(logits, 1.0, 0.95, None)


def test_decode_speed_is_reported(model):
    result = generate(model, [1, 2, 3], max_new_tokens=5, temperature=0)
    assert len(result.step_seconds) == 4 and result.prefill_seconds > 0
    assert math.isfinite(result.decode_tokens_per_second) and result.decode_tokens_per_second > 0


# ---- chapter 09 exercises -----------------------------------------------------------------------------


def _solutions():
    return load_solutions("09_generate")


def test_solution_min_p_filter():
    sol = _solutions()
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    assert torch.equal(sol.min_p_filter(p, 0.2) > 0, torch.tensor([True, True, True, False]))
    assert torch.equal(sol.min_p_filter(p, 0.0), p)


def test_solution_generate_without_cache_matches(model):
    sol = _solutions()
    prompt = [9, 8, 7, 6]
    assert sol.generate_without_cache(model, prompt, 5) == generate(model, prompt, max_new_tokens=5,
                                                                      temperature=0).tokens


def test_solution_cache_bytes(model):
    sol = _solutions()
    cfg = load_config(fixture_path("kimi_k25"))
    # 61 layers × (512 latent + 64 rope) values × 2 bytes (bf16) per token.
    assert sol.cache_bytes(cfg, tokens=1, bytes_per_value=2) == 61 * 576 * 2
    cache = model.new_cache(1, 10)
    assert sol.cache_bytes(model.config, tokens=1, bytes_per_value=4) == cache.bytes_per_token()
