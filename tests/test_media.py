"""media.py == oracle/media.py: NaViT resize, patchify, inputs of every kind, video chunks.

Images are drawn at random sizes (tiny, very wide, very tall, beyond the patch limit) under the real K2.5
preprocessor config and under a shrunken one whose limits small pictures can cross (test_moonvit's SMALL).
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

from kimi_ref import media
from kimi_ref.oracle import media as oracle
from test_moonvit import MEDIA, MODES, P, SEEDS, SIZES, SMALL, random_image, unpatchify

# ---- preprocessing -----------------------------------------------------------------------------------------


@given(size=SIZES, mode=MODES, seed=SEEDS, small=st.booleans())
@example(size=(1, 1), mode="RGB", seed=0, small=False)
@example(size=(900, 3), mode="L", seed=0, small=True)
def test_preprocess_matches_oracle_and_keeps_the_rules(size, mode, seed, small):
    cfg = SMALL if small else MEDIA
    img = random_image(*size, seed, mode)
    pixel_values, grid = media.preprocess(img, cfg)
    expected, expected_grid = oracle.preprocess(img, cfg)
    assert grid == expected_grid
    assert pixel_values.dtype == torch.float32
    assert_close(pixel_values, expected, torch.float32, what=f"preprocess {size} {mode}")

    t, h, w = grid
    new_w, new_h = media.resize_size(*size, cfg)
    # The padded picture is the resized one rounded up to multiples of 28 pixels; N = h·w patches.
    assert t == 1 and pixel_values.shape == (h * w, 3, P, P)
    assert (h * P, w * P) == (-(-new_h // 28) * 28, -(-new_w // 28) * 28)
    # LLM tokens per image: (H/28)·(W/28) of the resized, padded picture.
    assert media.tokens_per_image(*size, cfg) == (h * P // 28) * (w * P // 28)
    # Zero padding on the right and bottom normalizes to exactly -1.0.
    picture = unpatchify(pixel_values, grid)[0]
    assert (picture[:, new_h:, :] == -1.0).all() and (picture[:, :, new_w:] == -1.0).all()
    assert picture.min() >= -1.0 and picture.max() <= 1.0


@given(width=st.integers(1, 30000), height=st.integers(1, 30000), small=st.booleans())
@example(width=7121, height=489, small=False)   # the reference's whole-patch count overshoots here (see below)
@example(width=100000, height=1, small=False)
def test_resize_keeps_within_the_patch_budget_and_side_limit(width, height, small):
    cfg = SMALL if small else MEDIA
    new_w, new_h = media.resize_size(width, height, cfg)
    assert (new_w, new_h) == oracle.resize_size(width, height, cfg)
    assert 1 <= new_w <= width and 1 <= new_h <= height  # only ever shrinks
    h, w = media.padded_grid(new_w, new_h, cfg)
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
    pixel_values, grid = media.preprocess(img)  # the shipped K2.5 preprocessor config
    expected, expected_grid = oracle.preprocess(img, MEDIA)
    assert grid == expected_grid
    assert_close(pixel_values, expected, torch.float32, what="3000×2000 preprocess")
    t, h, w = grid
    assert max(h, w) <= 512 and h * w <= 16384 * 1.03
    assert media.tokens_per_image(3000, 2000) == h * w // 4


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "I", "CMYK", "I;16"])
def test_grayscale_palette_and_alpha_images_are_converted_not_refused(mode):
    rgb = random_image(45, 31, 3)
    img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    pixel_values, grid = media.preprocess(img, MEDIA)
    want, _ = media.preprocess(img.convert("RGB"), MEDIA)
    torch.testing.assert_close(pixel_values, want, rtol=0, atol=0)
    if mode in ("L", "LA", "1"):  # grey in, grey out: the three channels agree
        torch.testing.assert_close(pixel_values[:, 0], pixel_values[:, 2], rtol=0, atol=0)
    if mode == "RGBA":  # alpha is dropped, not composited: the stored colour stays
        transparent = rgb.copy()
        transparent.putalpha(0)
        torch.testing.assert_close(media.preprocess(transparent, MEDIA)[0],
                                   media.preprocess(rgb, MEDIA)[0], rtol=0, atol=0)


def test_inputs_may_be_paths_bytes_and_arrays(tmp_path):
    img = random_image(60, 33, 4)
    path = tmp_path / "x.png"
    img.save(path)
    want = media.preprocess(img)[0]
    for source in (path, str(path), path.read_bytes(), np.asarray(img)):
        torch.testing.assert_close(media.preprocess(source)[0], want, rtol=0, atol=0)


def test_bad_images_are_named(tmp_path):
    with pytest.raises(ValueError, match="not an image"):
        media.preprocess(b"this is plain text, not a picture")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ValueError, match="notes.png is not an image"):
        media.preprocess(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="no image file"):
        media.preprocess(tmp_path / "missing.png")
    for size in ((0, 0), (0, 5), (5, 0)):
        with pytest.raises(ValueError, match=f"{size[0]}×{size[1]} pixels"):
            media.preprocess(Image.new("RGB", size))
    with pytest.raises(ValueError, match="uint8"):
        media.preprocess(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="expected a PIL image"):
        media.preprocess(42)
    with pytest.raises(ValueError, match="at least 1×1"):
        media.resize_size(0, 10, MEDIA)
    odd = dataclasses.replace(MEDIA, patch_limit_on_one_side=5)
    with pytest.raises(ValueError, match="multiple of merge_kernel_size"):
        media.preprocess(random_image(200, 20, 0), odd)


# ---- video ------------------------------------------------------------------------------------------------


COLOURS = [(20 * i, 255 - 20 * i, (90 * i) % 256) for i in range(12)]


def solid_frames(n: int, size=(40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLOURS[i]) for i in range(n)]


def check_nine_frame_clip(video: media.PreprocessedVideo) -> None:
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
    check_nine_frame_clip(media.preprocess_video(solid_frames(9), fps=2.0))


def test_nine_frame_clip_from_a_folder_in_natural_order(tmp_path):
    for i, frame in enumerate(solid_frames(9)):
        frame.save(tmp_path / f"frame_{i + 1}.png")  # frame_10 would sort before frame_2 as text
    (tmp_path / "notes.txt").write_text("not a frame")
    check_nine_frame_clip(media.preprocess_video(tmp_path, fps=2.0))


def test_nine_frame_clip_from_an_animated_gif(tmp_path):
    frames = solid_frames(9)
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=500, loop=0)  # 2 fps
    check_nine_frame_clip(media.preprocess_video(path))
    check_nine_frame_clip(media.preprocess_video(path.read_bytes()))


def test_fast_clip_is_sampled_down_to_two_fps():
    video = media.open_video(solid_frames(12), fps=4.0)  # 3 s at 4 fps -> 6 frames at 2 fps
    chunks = media.split_video_chunks(video)
    assert [c.frame_indices for c in chunks] == [[0, 2, 4, 7], [9, 11]]
    assert chunks[1].prompt.startswith("00:00:02.250<|media_begin|>video")


@given(n=st.integers(1, 5000), fps=st.floats(0.1, 120, allow_nan=False))
def test_sample_frame_indices_match_oracle(n, fps):
    got = media.sample_frame_indices(n, fps)
    assert got == oracle.sample_frame_indices(n, fps, MEDIA)
    assert got == sorted(got) and got[0] == 0 and got[-1] == (n - 1 if len(got) > 1 else 0)


@given(seconds=st.one_of(st.floats(0, 200000, allow_nan=False), st.integers(0, 100000).map(lambda i: i / 1000)),
       mode=st.sampled_from(["hh:mm:ss.fff", "mm:ss.fff", "mm:ss"]))
@example(seconds=2.3, mode="hh:mm:ss.fff")        # truncated milliseconds: 00:00:02.299
@example(seconds=3661.5, mode="hh:mm:ss.fff")
def test_timestamps_match_oracle(seconds, mode):
    assert media.timestamp_text(seconds, mode) == oracle.timestamp_text(seconds, mode)


def test_timestamp_examples():
    assert media.timestamp_text(0) == "00:00:00.000"
    assert media.timestamp_text(3661.5) == "01:01:01.500"
    assert media.timestamp_text(2.3) == "00:00:02.299"  # the reference truncates int((t % 1) * 1000)
    with pytest.raises(ValueError, match="timestamp_mode"):
        media.timestamp_text(1.0, "seconds")


def test_video_placeholders_are_expanded_in_order():
    marker = media.VIDEO_PLACEHOLDER
    assert media.expand_video_placeholders(f"a{marker}b{marker}c", ["<1>", "<2>"]) == "a<1>b<2>c"
    with pytest.raises(ValueError, match="2 <\\|kimi_k25_video_placeholder\\|> markers but 1 videos"):
        media.expand_video_placeholders(f"a{marker}b{marker}c", ["<1>"])


def test_bad_videos_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="list of frames is empty"):
        media.preprocess_video([], fps=2.0)
    with pytest.raises(ValueError, match="has no frames"):
        media.preprocess_video(tmp_path, fps=2.0)
    with pytest.raises(ValueError, match="0 bytes"):
        media.preprocess_video(b"")
    with pytest.raises(ValueError, match="pass fps="):
        media.preprocess_video(solid_frames(3))
    with pytest.raises(ValueError, match="fps must be positive"):
        media.preprocess_video(solid_frames(3), fps=0)
    with pytest.raises(ValueError, match="frames of one video must share a size"):
        media.preprocess_video(solid_frames(2) + solid_frames(1, size=(30, 40)), fps=2.0)
    with pytest.raises(ValueError, match="at most temporal_merge_kernel_size 4 frames, found 5"):
        media.preprocess_frames(solid_frames(5))
    with pytest.raises(ValueError, match="needs at least one frame"):
        media.preprocess_frames([])
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        media.preprocess_video(tmp_path / "missing.mp4")
    png = tmp_path / "still.png"
    solid_frames(1)[0].save(png)
    with pytest.raises(ValueError, match="no duration"):
        media.preprocess_video(png)
    assert media.preprocess_video(png, fps=1.0).grid_thws == [(1, 4, 4)]  # one still 40×30 frame, fps given
    with pytest.raises(TypeError, match="expected a list of frames, a folder, a file path or bytes"):
        media.preprocess_video(3.5, fps=2.0)
    with pytest.raises(ValueError, match="video has 0 frames"):
        media.sample_frame_indices(0, 2.0)
    with pytest.raises(ValueError, match="video fps must be positive, found -1"):
        media.sample_frame_indices(10, -1.0)
    # Bytes Pillow cannot read go to PyAV, an optional dependency: without it the error says what to do.
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="PyAV"):
        media.preprocess_video(b"\x00\x00\x00\x18ftypmp42 not really a movie")


def test_video_frames_follow_the_per_frame_patch_budget():
    frames = [random_image(400, 300, i) for i in range(4)]
    pixel_values, (t, h, w) = media.preprocess_frames(frames, SMALL)
    new_w, new_h = media.resize_size(400, 300, SMALL, in_patch_limit=SMALL.in_patch_limit_each_frame)
    assert (new_w // P) * (new_h // P) <= SMALL.in_patch_limit_each_frame  # 24 for a frame...
    assert media.resize_size(400, 300, SMALL) > (new_w, new_h)             # ...48 for an image
    assert t == 4 and (h, w) == media.padded_grid(new_w, new_h, SMALL)
    want, want_grid = oracle.preprocess_frames(frames, SMALL)
    assert want_grid == (t, h, w)
    assert_close(pixel_values, want, torch.float32, what="video chunk preprocess")
