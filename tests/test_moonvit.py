"""moonvit.py == oracle/moonvit.py: preprocessing, positions, 2D RoPE, block, tower, projector, splice, video.

The tower is the tiny VisionConfig of the shipped kimi_k25 fixture (``tiny_config``); images are drawn
at random sizes (tiny, very wide, very tall, beyond the patch limit) under the real K2.5 preprocessor
config and under a shrunken one whose limits small pictures can cross.
"""

from __future__ import annotations

import dataclasses
import sys

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


# ---- preprocessing -----------------------------------------------------------------------------------------


@given(size=SIZES, mode=MODES, seed=SEEDS, small=st.booleans())
@example(size=(1, 1), mode="RGB", seed=0, small=False)
@example(size=(900, 3), mode="L", seed=0, small=True)
def test_preprocess_matches_oracle_and_keeps_the_rules(size, mode, seed, small):
    cfg = SMALL if small else MEDIA
    img = random_image(*size, seed, mode)
    pixel_values, grid = moonvit.preprocess(img, cfg)
    expected, expected_grid = oracle.preprocess(img, cfg)
    assert grid == expected_grid
    assert pixel_values.dtype == torch.float32
    assert_close(pixel_values, expected, torch.float32, what=f"preprocess {size} {mode}")

    t, h, w = grid
    new_w, new_h = moonvit.resize_size(*size, cfg)
    # The padded picture is the resized one rounded up to multiples of 28 pixels; N = h·w patches.
    assert t == 1 and pixel_values.shape == (h * w, 3, P, P)
    assert (h * P, w * P) == (-(-new_h // 28) * 28, -(-new_w // 28) * 28)
    # LLM tokens per image: (H/28)·(W/28) of the resized, padded picture.
    assert moonvit.tokens_per_image(*size, cfg) == (h * P // 28) * (w * P // 28)
    # Zero padding on the right and bottom normalizes to exactly -1.0.
    picture = unpatchify(pixel_values, grid)[0]
    assert (picture[:, new_h:, :] == -1.0).all() and (picture[:, :, new_w:] == -1.0).all()
    assert picture.min() >= -1.0 and picture.max() <= 1.0


@given(width=st.integers(1, 30000), height=st.integers(1, 30000), small=st.booleans())
@example(width=7121, height=489, small=False)   # the reference's whole-patch count overshoots here (see below)
@example(width=100000, height=1, small=False)
def test_resize_keeps_within_the_patch_budget_and_side_limit(width, height, small):
    cfg = SMALL if small else MEDIA
    new_w, new_h = moonvit.resize_size(width, height, cfg)
    assert (new_w, new_h) == oracle.resize_size(width, height, cfg)
    assert 1 <= new_w <= width and 1 <= new_h <= height  # only ever shrinks
    h, w = moonvit.padded_grid(new_w, new_h, cfg)
    assert max(h, w) <= cfg.patch_limit_on_one_side
    # The budget as the reference measures it: the scale applied to max(1, W//p)·max(1, H//p) patches.
    # (Whole patches of the result can exceed the limit by a few per cent for thin pictures, by design.)
    counted = max(1, width // P) * max(1, height // P)
    scale = min(new_w / width, new_h / height)
    assert scale**2 * counted <= cfg.in_patch_limit * (1 + 1e-9)
    if counted <= cfg.in_patch_limit and max(width, height) <= cfg.patch_limit_on_one_side * P:
        assert (new_w, new_h) == (width, height)  # within every limit: untouched


def test_real_limits_on_a_big_photo():
    img = random_image(3000, 2000, 0)
    pixel_values, grid = moonvit.preprocess(img)  # the shipped K2.5 preprocessor config
    expected, expected_grid = oracle.preprocess(img, MEDIA)
    assert grid == expected_grid
    assert_close(pixel_values, expected, torch.float32, what="3000×2000 preprocess")
    t, h, w = grid
    assert max(h, w) <= 512 and h * w <= 16384 * 1.03
    assert moonvit.tokens_per_image(3000, 2000) == h * w // 4


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "I", "CMYK", "I;16"])
def test_grayscale_palette_and_alpha_images_are_converted_not_refused(mode):
    rgb = random_image(45, 31, 3)
    img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    pixel_values, grid = moonvit.preprocess(img, MEDIA)
    want, _ = moonvit.preprocess(img.convert("RGB"), MEDIA)
    torch.testing.assert_close(pixel_values, want, rtol=0, atol=0)
    if mode in ("L", "LA", "1"):  # grey in, grey out: the three channels agree
        torch.testing.assert_close(pixel_values[:, 0], pixel_values[:, 2], rtol=0, atol=0)
    if mode == "RGBA":  # alpha is dropped, not composited: the stored colour stays
        transparent = rgb.copy()
        transparent.putalpha(0)
        torch.testing.assert_close(moonvit.preprocess(transparent, MEDIA)[0],
                                   moonvit.preprocess(rgb, MEDIA)[0], rtol=0, atol=0)


def test_inputs_may_be_paths_bytes_and_arrays(tmp_path):
    img = random_image(60, 33, 4)
    path = tmp_path / "x.png"
    img.save(path)
    want = moonvit.preprocess(img)[0]
    for source in (path, str(path), path.read_bytes(), np.asarray(img)):
        torch.testing.assert_close(moonvit.preprocess(source)[0], want, rtol=0, atol=0)


def test_bad_images_are_named(tmp_path):
    with pytest.raises(ValueError, match="not an image"):
        moonvit.preprocess(b"this is plain text, not a picture")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ValueError, match="notes.png is not an image"):
        moonvit.preprocess(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="no image file"):
        moonvit.preprocess(tmp_path / "missing.png")
    for size in ((0, 0), (0, 5), (5, 0)):
        with pytest.raises(ValueError, match=f"{size[0]}×{size[1]} pixels"):
            moonvit.preprocess(Image.new("RGB", size))
    with pytest.raises(ValueError, match="uint8"):
        moonvit.preprocess(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="expected a PIL image"):
        moonvit.preprocess(42)
    with pytest.raises(ValueError, match="at least 1×1"):
        moonvit.resize_size(0, 10, MEDIA)
    odd = dataclasses.replace(MEDIA, patch_limit_on_one_side=5)
    with pytest.raises(ValueError, match="multiple of merge_kernel_size"):
        moonvit.preprocess(random_image(200, 20, 0), odd)


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


# ---- video ------------------------------------------------------------------------------------------------


COLOURS = [(20 * i, 255 - 20 * i, (90 * i) % 256) for i in range(12)]


def solid_frames(n: int, size=(40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLOURS[i]) for i in range(n)]


def check_nine_frame_clip(video: moonvit.PreprocessedVideo) -> None:
    """9 frames at 2 fps: every frame is kept, chunks of 4 + 4 + 1 at 0 s, 2 s and 4 s."""
    assert [c.frame_indices for c in video.chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert [c.start for c in video.chunks] == [0.0, 2.0, 4.0]
    stamps = ["00:00:00.000", "00:00:02.000", "00:00:04.000"]
    assert video.prompt == "".join(f"{s}<|media_begin|>video<|media_content|><|media_pad|><|media_end|>" for s in stamps)
    assert [g[0] for g in video.grid_thws] == [4, 4, 1]
    assert video.pixel_values.shape[0] == sum(t * h * w for t, h, w in video.grid_thws)
    # Frames arrive in order: the first pixel of each frame carries that frame's colour.
    first_pixels = []
    start = 0
    for t, h, w in video.grid_thws:
        frames = unpatchify(video.pixel_values[start:start + t * h * w], (t, h, w))
        first_pixels += [((f[:, 0, 0] * 0.5 + 0.5) * 255).round().int().tolist() for f in frames]
        start += t * h * w
    assert first_pixels == [list(c) for c in COLOURS[:9]]


def test_nine_frame_clip_becomes_three_chunks_from_a_list():
    check_nine_frame_clip(moonvit.preprocess_video(solid_frames(9), fps=2.0))


def test_nine_frame_clip_from_a_folder_in_natural_order(tmp_path):
    for i, frame in enumerate(solid_frames(9)):
        frame.save(tmp_path / f"frame_{i + 1}.png")  # frame_10 would sort before frame_2 as text
    (tmp_path / "notes.txt").write_text("not a frame")
    check_nine_frame_clip(moonvit.preprocess_video(tmp_path, fps=2.0))


def test_nine_frame_clip_from_an_animated_gif(tmp_path):
    frames = solid_frames(9)
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=500, loop=0)  # 2 fps
    check_nine_frame_clip(moonvit.preprocess_video(path))
    check_nine_frame_clip(moonvit.preprocess_video(path.read_bytes()))


def test_fast_clip_is_sampled_down_to_two_fps():
    video = moonvit.open_video(solid_frames(12), fps=4.0)  # 3 s at 4 fps -> 6 frames at 2 fps
    chunks = moonvit.split_video_chunks(video)
    assert [c.frame_indices for c in chunks] == [[0, 2, 4, 7], [9, 11]]
    assert chunks[1].prompt.startswith("00:00:02.250<|media_begin|>video")


@given(n=st.integers(1, 5000), fps=st.floats(0.1, 120, allow_nan=False))
def test_sample_frame_indices_match_oracle(n, fps):
    got = moonvit.sample_frame_indices(n, fps)
    assert got == oracle.sample_frame_indices(n, fps, MEDIA)
    assert got == sorted(got) and got[0] == 0 and got[-1] == (n - 1 if len(got) > 1 else 0)


@given(seconds=st.one_of(st.floats(0, 200000, allow_nan=False), st.integers(0, 100000).map(lambda i: i / 1000)),
       mode=st.sampled_from(["hh:mm:ss.fff", "mm:ss.fff", "mm:ss"]))
@example(seconds=2.3, mode="hh:mm:ss.fff")        # truncated milliseconds: 00:00:02.299
@example(seconds=3661.5, mode="hh:mm:ss.fff")
def test_timestamps_match_oracle(seconds, mode):
    assert moonvit.timestamp_text(seconds, mode) == oracle.timestamp_text(seconds, mode)


def test_timestamp_examples():
    assert moonvit.timestamp_text(0) == "00:00:00.000"
    assert moonvit.timestamp_text(3661.5) == "01:01:01.500"
    assert moonvit.timestamp_text(2.3) == "00:00:02.299"  # the reference truncates int((t % 1) * 1000)
    with pytest.raises(ValueError, match="timestamp_mode"):
        moonvit.timestamp_text(1.0, "seconds")


def test_video_placeholders_are_expanded_in_order():
    marker = moonvit.VIDEO_PLACEHOLDER
    assert moonvit.expand_video_placeholders(f"a{marker}b{marker}c", ["<1>", "<2>"]) == "a<1>b<2>c"
    with pytest.raises(ValueError, match="2 <\\|kimi_k25_video_placeholder\\|> markers but 1 videos"):
        moonvit.expand_video_placeholders(f"a{marker}b{marker}c", ["<1>"])


def test_bad_videos_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="list of frames is empty"):
        moonvit.preprocess_video([], fps=2.0)
    with pytest.raises(ValueError, match="has no frames"):
        moonvit.preprocess_video(tmp_path, fps=2.0)
    with pytest.raises(ValueError, match="0 bytes"):
        moonvit.preprocess_video(b"")
    with pytest.raises(ValueError, match="pass fps="):
        moonvit.preprocess_video(solid_frames(3))
    with pytest.raises(ValueError, match="fps must be positive"):
        moonvit.preprocess_video(solid_frames(3), fps=0)
    with pytest.raises(ValueError, match="frames of one video must share a size"):
        moonvit.preprocess_video(solid_frames(2) + solid_frames(1, size=(30, 40)), fps=2.0)
    with pytest.raises(ValueError, match="at most temporal_merge_kernel_size 4 frames, found 5"):
        moonvit.preprocess_frames(solid_frames(5))
    with pytest.raises(ValueError, match="needs at least one frame"):
        moonvit.preprocess_frames([])
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        moonvit.preprocess_video(tmp_path / "missing.mp4")
    png = tmp_path / "still.png"
    solid_frames(1)[0].save(png)
    with pytest.raises(ValueError, match="no duration"):
        moonvit.preprocess_video(png)
    assert moonvit.preprocess_video(png, fps=1.0).grid_thws == [(1, 4, 4)]  # one still 40×30 frame, fps given
    with pytest.raises(TypeError, match="expected a list of frames, a folder, a file path or bytes"):
        moonvit.preprocess_video(3.5, fps=2.0)
    with pytest.raises(ValueError, match="video has 0 frames"):
        moonvit.sample_frame_indices(0, 2.0)
    with pytest.raises(ValueError, match="video fps must be positive, found -1"):
        moonvit.sample_frame_indices(10, -1.0)
    # Bytes Pillow cannot read go to PyAV, an optional dependency: without it the error says what to do.
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="PyAV"):
        moonvit.preprocess_video(b"\x00\x00\x00\x18ftypmp42 not really a movie")


def test_video_frames_follow_the_per_frame_patch_budget():
    frames = [random_image(400, 300, i) for i in range(4)]
    pixel_values, (t, h, w) = moonvit.preprocess_frames(frames, SMALL)
    new_w, new_h = moonvit.resize_size(400, 300, SMALL, in_patch_limit=SMALL.in_patch_limit_each_frame)
    assert (new_w // P) * (new_h // P) <= SMALL.in_patch_limit_each_frame  # 24 for a frame...
    assert moonvit.resize_size(400, 300, SMALL) > (new_w, new_h)             # ...48 for an image
    assert t == 4 and (h, w) == moonvit.padded_grid(new_w, new_h, SMALL)
    want, want_grid = oracle.preprocess_frames(frames, SMALL)
    assert want_grid == (t, h, w)
    assert_close(pixel_values, want, torch.float32, what="video chunk preprocess")


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
        video = moonvit.preprocess_video(solid_frames(1) * n, fps=fps)
        want = sum((h // 2) * (w // 2) for _, h, w in video.grid_thws)
        assert sol.video_tokens(n, fps, 40, 30, MEDIA) == want


def test_chapter_11_solution_unpatchify():
    pixel_values, grid = moonvit.preprocess(random_image(70, 50, 1), MEDIA)
    picture = _solutions().unpatchify(pixel_values, grid)
    assert picture.shape == (3, grid[1] * P, grid[2] * P)
    torch.testing.assert_close(picture, unpatchify(pixel_values, grid)[0], rtol=0, atol=0)
