"""moonvit.py == oracle/moonvit.py: positions, 2D RoPE, block, tower, projector, splice (media: test_media.py).

The tower is the tiny VisionConfig of the shipped kimi_k25 fixture (``tiny_config``); images are drawn
at random sizes (tiny, very wide, very tall, beyond the patch limit) under the real K2.5 preprocessor
config and under a shrunken one whose limits small pictures can cross.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st
from PIL import Image
from tolerances import assert_close

from kimi_ref import moonvit
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.oracle import moonvit as oracle
from chapter_solutions import load_solutions

REAL = load_config(fixture_path("kimi_k25"))
VOCAB = 4096  # the demo tokenizer's size: its <|media_pad|> id is then the tiny config's placeholder id
TINY = tiny_config(REAL, vocab_size=VOCAB)
VISION = TINY.vision
MEDIA = moonvit.default_media_config()
# Limits small pictures cross, so "beyond the patch limit" stays cheap enough for the float64 tower.
SMALL = dataclasses.replace(MEDIA, in_patch_limit=48, patch_limit_on_one_side=12, in_patch_limit_each_frame=24)
P = MEDIA.patch_size


# ---- helpers ---------------------------------------------------------------------------------------------


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colours plus noise (so resizing has something to do), converted to ``mode``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def f64(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere, LayerNorm weights away from 1 and biases away from 0 (so they count)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_emb.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.endswith("bias") else p.shape[-1] ** -0.5 * 1.5))
    return module.eval()


TOWER = randomize(moonvit.VisionTower(VISION), 1)
PROJECTOR = randomize(moonvit.Projector(VISION), 2)
W_TOWER, W_PROJECTOR = f64(TOWER), f64(PROJECTOR)

# Sizes in pixels: tiny, very wide, very tall, and beyond SMALL's patch limit (48 patches).
SIZES = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(200, 900), st.integers(1, 20)),
    st.tuples(st.integers(1, 20), st.integers(200, 900)),
    st.tuples(st.integers(120, 420), st.integers(120, 420)),
)
MODES = st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "I"])
SEEDS = st.integers(0, 2**16)


def unpatchify(pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[t·h·w, 3, p, p] -> [t, 3, h·p, w·p], the inverse of the row-major patch order."""
    t, h, w = grid
    return pixel_values.view(t, h, w, 3, P, P).permute(0, 3, 1, 4, 2, 5).reshape(t, 3, h * P, w * P)


# ---- positions: interpolated table, time embedding, 2D RoPE -------------------------------------------------


@given(table=st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 5)),
       out=st.tuples(st.integers(1, 24), st.integers(1, 24)), seed=SEEDS)
@example(table=(8, 8, 3), out=(8, 8), seed=0)    # same size: the identity
@example(table=(8, 8, 3), out=(1, 24), seed=0)   # very wide
@example(table=(8, 8, 3), out=(24, 1), seed=0)   # very tall
@example(table=(64, 64, 2), out=(37, 91), seed=0)  # K2.5's 64×64 table
@example(table=(64, 64, 2), out=(512, 2), seed=0)  # ...stretched to the per-side limit
def test_pos_emb_interpolation_matches_oracle(table, out, seed):
    weight = torch.randn(*table, generator=torch.Generator().manual_seed(seed))
    got = moonvit.interpolate_pos_emb(weight, *out)
    want = oracle.interpolate_pos_emb(weight.double().numpy(), *out).reshape(out[0] * out[1], table[2])
    assert_close(got, want, torch.float32, what=f"pos-emb {table} -> {out}")


@given(dim=st.integers(1, 40).map(lambda n: 2 * n), t=st.integers(1, 6))
def test_time_embedding_matches_oracle(dim, t):
    assert_close(moonvit.time_embedding(dim, t), oracle.time_embedding(dim, t), torch.float32, what="time embedding")


GRIDS = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=3)


@given(grids=GRIDS, heads=st.integers(1, 3), quarter=st.integers(1, 5), seed=SEEDS)
@example(grids=[(1, 1, 40)], heads=1, quarter=18, seed=0)  # a very wide strip at K2.5's head dim 72
@example(grids=[(1, 40, 1)], heads=1, quarter=18, seed=0)
def test_rope_2d_matches_oracle(grids, heads, quarter, seed):
    hd = 4 * quarter
    n = sum(t * h * w for t, h, w in grids)
    x = torch.randn(n, heads, hd, generator=torch.Generator().manual_seed(seed))
    cos, sin = moonvit.rope_2d_cos_sin(grids, hd)
    assert cos.dtype == torch.float32
    assert_close(moonvit.rope_2d_angles(grids, hd), oracle.rope_2d_angles(grids, hd), torch.float64, what="angles")
    assert_close(moonvit.apply_rope_2d(x, cos, sin), oracle.rope_2d(x.double().numpy(), grids, hd), torch.float32,
                 what="rope 2d")


def test_rope_2d_scores_depend_only_on_the_2d_offset():
    h, w, hd = 5, 6, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g, dtype=torch.float64), torch.randn(hd, generator=g, dtype=torch.float64)
    angles = moonvit.rope_2d_angles([(1, h, w)], hd)
    cos, sin = angles.cos(), angles.sin()
    rq = moonvit.apply_rope_2d(q.expand(h * w, 1, hd), cos, sin)[:, 0]
    rk = moonvit.apply_rope_2d(k.expand(h * w, 1, hd), cos, sin)[:, 0]
    scores = (rq @ rk.T).view(h, w, h, w)
    # Shifting both patches by one row and one column leaves every score unchanged...
    torch.testing.assert_close(scores[1:, 1:, 1:, 1:], scores[:-1, :-1, :-1, :-1], rtol=1e-12, atol=1e-12)
    # ...while rows and columns are told apart (x and y use different pair slots).
    assert not torch.allclose(scores[0, 1, 0, 0], scores[1, 0, 0, 0])


# ---- the block, the tower, sd2_tpool, the projector -----------------------------------------------------------


def _cu(grids):
    return np.concatenate([[0], np.cumsum([t * h * w for t, h, w in grids])]).tolist()


@given(grids=GRIDS, seed=SEEDS)
def test_block_matches_oracle(grids, seed):
    block = randomize(moonvit.VisionBlock(VISION), seed)
    n = sum(t * h * w for t, h, w in grids)
    x = torch.randn(n, VISION.hidden_size, generator=torch.Generator().manual_seed(seed))
    cos, sin = moonvit.rope_2d_cos_sin(grids, VISION.head_dim)
    with torch.no_grad():
        got = block(x, _cu(grids), cos, sin)
    want = oracle.block(x.double().numpy(), f64(block), VISION, grids)
    assert_close(got, want, torch.float32, what=f"block on {grids}")


def test_block_at_k25_sizes_matches_oracle():
    """One block with the real widths (D 1152, 16 heads of 72, MLP 4304) on a small packed input."""
    block = randomize(moonvit.VisionBlock(REAL.vision), 3)
    grids = [(1, 2, 6), (2, 2, 2)]
    x = torch.randn(20, REAL.vision.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x, _cu(grids), *moonvit.rope_2d_cos_sin(grids, REAL.vision.head_dim))
    want = oracle.block(x.double().numpy(), f64(block), REAL.vision, grids)
    assert_close(got, want, torch.float32, what="K2.5-sized block")


def test_packed_images_do_not_attend_to_each_other():
    grids = [(1, 4, 6), (2, 2, 4)]
    block = TOWER.encoder.blocks[0]
    x = torch.randn(40, VISION.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = block(x, _cu(grids), *moonvit.rope_2d_cos_sin(grids, VISION.head_dim))
        first = block(x[:24], [0, 24], *moonvit.rope_2d_cos_sin(grids[:1], VISION.head_dim))
        second = block(x[24:], [0, 16], *moonvit.rope_2d_cos_sin(grids[1:], VISION.head_dim))
    torch.testing.assert_close(packed, torch.cat([first, second]), rtol=1e-5, atol=1e-6)


# Images for the tower: (width, height) in pixels, with SMALL limits so big ones get resized.
TOWER_SIZES = st.one_of(
    st.tuples(st.integers(1, 60), st.integers(1, 60)),
    st.tuples(st.integers(300, 900), st.integers(1, 20)),
    st.tuples(st.integers(1, 20), st.integers(300, 900)),
    st.tuples(st.integers(150, 400), st.integers(150, 400)),
)


@given(sizes=st.lists(st.tuples(TOWER_SIZES, st.integers(1, 4)), min_size=1, max_size=2), seed=SEEDS)
@example(sizes=[((112, 112), 1)], seed=0)   # an 8×8 grid: the position table used as is
def test_tower_and_projector_match_oracle(sizes, seed):
    """Images (t = 1) and video chunks (t = 2..4) packed together, through the tower, sd2_tpool and projector."""
    parts = [moonvit.preprocess_frames([random_image(*size, seed + i + 10 * f) for f in range(t)], SMALL)
             for i, (size, t) in enumerate(sizes)]
    pixel_values = torch.cat([pv for pv, _ in parts])
    grids = [g for _, g in parts]
    with torch.no_grad():
        hidden = TOWER(pixel_values, grids)
        rows = moonvit.encode(TOWER, PROJECTOR, pixel_values, grids)
    x64 = pixel_values.double().numpy()
    assert_close(hidden, oracle.tower(x64, W_TOWER, VISION, grids), torch.float32, what=f"tower on {grids}")
    want = oracle.encode(x64, W_TOWER, W_PROJECTOR, VISION, grids)
    assert len(rows) == len(grids)
    for got, expected, (t, h, w) in zip(rows, want, grids):
        assert got.shape == ((h // 2) * (w // 2), TINY.hidden_size)  # (H/28)(W/28) rows, whatever t
        assert_close(got, expected, torch.float32, what=f"encode on {grids}")


def test_bf16_tower_matches_oracle_on_its_own_weights():
    tower = moonvit.VisionTower(VISION, dtype=torch.bfloat16)
    tower.load_state_dict(TOWER.state_dict())
    pixel_values, grid = moonvit.preprocess(random_image(90, 60, 0), SMALL)
    with torch.no_grad():
        got = tower(pixel_values, [grid])
    assert got.dtype == torch.bfloat16
    want = oracle.tower(pixel_values.double().numpy(), f64(tower), VISION, [grid])
    assert_close(got, want, torch.bfloat16, what="bf16 tower")


@given(grids=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda n: 2 * n),
                                st.integers(1, 4).map(lambda n: 2 * n)), min_size=1, max_size=3), seed=SEEDS)
def test_sd2_tpool_matches_oracle(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))
    for got, want in zip(moonvit.sd2_tpool(x, grids), oracle.sd2_tpool(x.double().numpy(), grids)):
        assert_close(got, want, torch.float32, what="sd2_tpool")


def test_sd2_tpool_groups_2x2_neighbours_in_row_major_order():
    t, h, w = 2, 4, 6
    ids = torch.arange(h * w, dtype=torch.float32)
    x = torch.cat([ids, ids + 1000])[:, None]  # frame 1 = frame 0 + 1000, so the mean is id + 500
    merged = moonvit.sd2_tpool(x, [(t, h, w)])[0][..., 0]
    assert merged.shape == (6, 4)
    assert merged[0].tolist() == [500, 501, 506, 507]   # patches (0,0) (0,1) (1,0) (1,1)
    assert merged[4].tolist() == [514, 515, 520, 521]   # group (1, 1): patches (2,2) (2,3) (3,2) (3,3)


@given(n=st.integers(1, 9), seed=SEEDS)
def test_projector_matches_oracle(n, seed):
    x = torch.randn(n, 4, VISION.mm_hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        got = PROJECTOR(x)
    assert_close(got, oracle.projector(x.double().numpy(), W_PROJECTOR, VISION), torch.float32, what="projector")


def test_projector_uses_exact_gelu_and_the_tower_tanh_gelu():
    assert isinstance(PROJECTOR.proj[1], torch.nn.GELU) and PROJECTOR.proj[1].approximate == "none"
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = oracle.gelu_erf(x.numpy())
    assert np.abs(oracle.gelu_tanh(x.numpy()) - exact).max() > 1e-4  # the two differ: the test can tell them apart
    mlp = TOWER.encoder.blocks[0].mlp
    y = torch.randn(3, VISION.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = oracle.gelu_tanh(mlp.fc0(y).double().numpy()) @ mlp.fc1.weight.double().numpy().T
        assert_close(mlp(y), want + mlp.fc1.bias.double().numpy(), torch.float32, what="tanh-GELU MLP")


def test_tower_keys_are_the_checkpoint_names():
    real = REAL.vision
    tower = moonvit.VisionTower(real, device="meta")
    projector = moonvit.Projector(real, device="meta")
    shapes = {f"vision_tower.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}
    shapes |= {f"mm_projector.{k}": tuple(v.shape) for k, v in projector.state_dict().items()}
    assert len(shapes) == 329 + 6  # sources §5
    assert shapes["vision_tower.patch_embed.proj.weight"] == (1152, 3, 14, 14)
    assert shapes["vision_tower.patch_embed.pos_emb.weight"] == (64, 64, 1152)
    assert shapes["vision_tower.encoder.blocks.26.wqkv.weight"] == (3456, 1152)
    assert shapes["vision_tower.encoder.blocks.26.mlp.fc0.weight"] == (4304, 1152)
    assert shapes["vision_tower.encoder.final_layernorm.bias"] == (1152,)
    assert shapes["mm_projector.proj.0.weight"] == (4608, 4608)
    assert shapes["mm_projector.proj.2.weight"] == (7168, 4608)
    assert shapes["mm_projector.pre_norm.weight"] == (1152,)


def test_a_fresh_tower_computes_finite_values():
    tower = moonvit.VisionTower(VISION)
    pixel_values, grid = moonvit.preprocess(random_image(50, 50, 0), SMALL)
    with torch.no_grad():
        assert torch.isfinite(tower(pixel_values, [grid])).all()


def test_bad_tower_inputs_are_named():
    pixel_values, grid = moonvit.preprocess(random_image(56, 56, 0), SMALL)  # 4×4 patches
    with pytest.raises(ValueError, match="cover 32 patches but pixel_values has 16"):
        TOWER(pixel_values, [(2, 4, 4)])
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 14, 14\]"):
        TOWER(pixel_values[:, :, :7], [grid])
    with pytest.raises(ValueError, match="longer than the time embedding"):
        TOWER(pixel_values.repeat(5, 1, 1, 1), [(5, 4, 4)])
    with pytest.raises(ValueError, match="three positive integers"):
        TOWER(pixel_values, [(1, 0, 16)])
    with pytest.raises(ValueError, match="empty"):
        TOWER(pixel_values, [])
    with pytest.raises(ValueError, match="not a multiple of the merge kernel"):
        moonvit.sd2_tpool(torch.zeros(9, 4), [(1, 3, 3)])
    with pytest.raises(ValueError, match=r"Projector: expected \[n, 4, 32\]"):
        PROJECTOR(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="cover 8 rows but x has 9"):
        moonvit.sd2_tpool(torch.zeros(9, 4), [(2, 2, 2)])
    with pytest.raises(ValueError, match="head dim divisible by 4, found 6"):
        moonvit.rope_2d_angles([(1, 2, 2)], 6)
    with pytest.raises(ValueError, match="dim must be even, found 5"):
        moonvit.time_embedding(5, 2)


# ---- splicing ---------------------------------------------------------------------------------------------


PAD_ID = 7


@given(data=st.data(), batch=st.integers(1, 3), length=st.integers(1, 8), seed=SEEDS)
def test_splice_puts_rows_exactly_where_the_placeholders_were(data, batch, length, seed):
    d = 4
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([1, 2, 3, PAD_ID]), min_size=length,
                                                     max_size=length), min_size=batch, max_size=batch)))
    embeds = torch.randn(batch, length, d, generator=g)
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=int((ids == PAD_ID).sum()),
                               max_size=int((ids == PAD_ID).sum())))
    features = [torch.randn(n, d, generator=g) for n in sizes]
    # The manual splice: walk each row, cut it at every placeholder and put the next image's rows there.
    manual, it = [], iter(features)
    for b in range(batch):
        pieces = [next(it) if ids[b, t] == PAD_ID else embeds[b, t:t + 1] for t in range(length)]
        manual.append(torch.cat(pieces))
    lengths = {m.shape[0] for m in manual}
    if len(lengths) > 1:
        with pytest.raises(ValueError, match="different lengths"):
            moonvit.splice(embeds, ids, features, PAD_ID)
        out = moonvit.splice(embeds, ids, features, PAD_ID, pad_id=0)
        longest = max(lengths)
        manual = [torch.cat([m, torch.zeros(longest - m.shape[0], d)]) for m in manual]
    else:
        out = moonvit.splice(embeds, ids, features, PAD_ID)
        want_e, want_i = oracle.splice(embeds.double().numpy(), ids.numpy(), [f.double().numpy() for f in features],
                                       PAD_ID)
        assert_close(out.embeds, want_e, torch.float32, what="splice vs oracle")
        assert out.input_ids.tolist() == want_i.tolist()
    torch.testing.assert_close(out.embeds, torch.stack(manual), rtol=0, atol=0)
    assert out.positions.tolist() == [list(range(out.embeds.shape[1]))] * batch  # positions count expanded rows


def test_splice_errors_are_named():
    embeds, ids = torch.zeros(1, 3, 4), torch.tensor([[1, PAD_ID, 2]])
    with pytest.raises(ValueError, match="1 media placeholders .* but 2 feature blocks"):
        moonvit.splice(embeds, ids, [torch.zeros(2, 4)] * 2, PAD_ID)
    with pytest.raises(ValueError, match=r"features\[0\] must be \[n, 4\]"):
        moonvit.splice(embeds, ids, [torch.zeros(2, 5)], PAD_ID)
    with pytest.raises(ValueError, match=r"must be \[B, T, d\]"):
        moonvit.splice(embeds[0], ids, [torch.zeros(2, 4)], PAD_ID)


# ---- a tiny multimodal model, end to end ---------------------------------------------------------------------


def test_tiny_multimodal_model_runs_an_image_prompt_end_to_end():
    from kimi_ref.chat_template import render
    from kimi_ref.model import KimiForCausalLM
    from kimi_ref.tokenizer import Tokenizer

    tok = Tokenizer.demo()
    assert tok.special_id(moonvit.MEDIA_PAD) == TINY.media_placeholder_token_id
    torch.manual_seed(0)
    model = KimiForCausalLM(TINY).eval()
    model.vision_tower.load_state_dict(TOWER.state_dict())
    model.mm_projector.load_state_dict(PROJECTOR.state_dict())

    image = random_image(100, 60, 7, "RGBA")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    prompt = render(messages, variant="k2.5", thinking=False)
    assert moonvit.IMAGE_PROMPT in prompt
    ids = torch.tensor([tok.encode(prompt, allow_special=True)])
    pad = TINY.media_placeholder_token_id
    assert int((ids == pad).sum()) == 1
    pixel_values, grid = moonvit.preprocess(image)
    tokens = moonvit.tokens_per_image(100, 60)
    assert tokens == (grid[1] // 2) * (grid[2] // 2) == 3 * 4  # 100×60 pads to 112×84: (84/28)·(112/28)

    with torch.no_grad():
        logits = model(ids, pixel_values=pixel_values, grid_thws=[grid])
        # By hand: the oracle's image rows cut into the text embeddings where the placeholder was.
        rows = oracle.encode(pixel_values.double().numpy(), W_TOWER, W_PROJECTOR, VISION, [grid])[0]
        at = int((ids[0] == pad).nonzero()[0])
        text = model.model.embed_tokens(ids)
        by_hand = torch.cat([text[:, :at], torch.from_numpy(rows).float()[None], text[:, at + 1:]], dim=1)
        want = model(inputs_embeds=by_hand)
    assert logits.shape == (1, ids.shape[1] - 1 + tokens, VOCAB)
    assert torch.isfinite(logits).all()
    assert_close(logits, want.double(), torch.float32, what="image prompt logits vs manual splice")
    # The image changes what comes after it, not what comes before (causal attention).
    with torch.no_grad():
        other = model(ids, pixel_values=torch.zeros_like(pixel_values), grid_thws=[grid])
    torch.testing.assert_close(other[:, :at], logits[:, :at])
    assert not torch.allclose(other[:, -1], logits[:, -1])


# ---- chapter 11 solutions -------------------------------------------------------------------------------------


def _solutions():
    return load_solutions("11_moonvit")


@given(width=st.integers(1, 20000), height=st.integers(1, 20000))
def test_chapter_11_solution_tokens_by_arithmetic(width, height):
    assert _solutions().tokens_for(width, height, MEDIA) == moonvit.tokens_per_image(width, height, MEDIA)


def test_chapter_11_solution_largest_unresized_square():
    side = _solutions().largest_unresized_square(MEDIA)
    assert moonvit.resize_size(side, side, MEDIA) == (side, side)
    assert moonvit.resize_size(side + 1, side + 1, MEDIA) != (side + 1, side + 1)


def test_chapter_11_solution_video_tokens():
    sol = _solutions()
    for n, fps in ((9, 2.0), (90, 30.0), (1, 1.0), (300, 24.0)):
        video = moonvit.preprocess_video([Image.new("RGB", (40, 30), (20, 255, 90))] * n, fps=fps)
        want = sum((h // 2) * (w // 2) for _, h, w in video.grid_thws)
        assert sol.video_tokens(n, fps, 40, 30, MEDIA) == want


def test_chapter_11_solution_unpatchify():
    pixel_values, grid = moonvit.preprocess(random_image(70, 50, 1), MEDIA)
    picture = _solutions().unpatchify(pixel_values, grid)
    assert picture.shape == (3, grid[1] * P, grid[2] * P)
    torch.testing.assert_close(picture, unpatchify(pixel_values, grid)[0], rtol=0, atol=0)
