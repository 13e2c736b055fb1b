"""Images and video in, float64 oracle: RGB, the NaViT target size, padding, normalization, patches, frames.

    preprocess(image, media_config)          -> pixel_values [N, 3, p, p], (1, h, w)
    preprocess_frames(frames, media_config)  -> pixel_values [t·h·w, 3, p, p], (t, h, w)
    sample_frame_indices(n, fps, cfg)        -> which frames of a clip are kept
    timestamp_text(seconds)                  -> "HH:MM:SS.mmm", the text before each video chunk

The one borrowed piece is the image resize: it is *defined* as Pillow's BICUBIC filter (the HF
processor calls ``PIL.Image.resize``), so this oracle calls Pillow for RGB conversion and resizing and
does everything else (target size, padding, normalization, patch order) by hand in float64.
The torch side is ``kimi_ref/media.py``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from kimi_ref.config import MediaConfig

__all__ = ["to_rgb", "resize_size", "preprocess", "preprocess_frames", "sample_frame_indices", "timestamp_text"]


def to_rgb(image) -> Image.Image:
    """PIL image, path or bytes -> RGB (Pillow's ``convert``; alpha is dropped, not composited)."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is {image.width}×{image.height}")
    return image.convert("RGB")


def resize_size(width: int, height: int, cfg: MediaConfig, in_patch_limit: int | None = None) -> tuple[int, int]:
    """The NaViT target size: the largest scale ≤ 1 meeting the patch budget and both side limits."""
    p = cfg.patch_size
    budget = cfg.in_patch_limit if in_patch_limit is None else in_patch_limit
    whole_patches = max(1, width // p) * max(1, height // p)
    candidates = [1.0, (budget / whole_patches) ** 0.5, cfg.patch_limit_on_one_side * p / width,
                  cfg.patch_limit_on_one_side * p / height]
    scale = min(candidates)
    longest = cfg.patch_limit_on_one_side * p
    new_w = min(max(1, math.floor(width * scale)), longest)
    new_h = min(max(1, math.floor(height * scale)), longest)
    return new_w, new_h


def _pad_normalize_patchify(frames: list[np.ndarray], cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [h', w', 3] (one size) -> float64 patches [t·h·w, 3, p, p], (t, h, w)."""
    p, unit = cfg.patch_size, cfg.patch_size * cfg.merge_kernel_size
    rows, cols = frames[0].shape[:2]
    H, W = math.ceil(rows / unit) * unit, math.ceil(cols / unit) * unit
    h, w = H // p, W // p
    if max(h, w) > cfg.patch_limit_on_one_side:
        raise ValueError(f"padded grid {h}×{w} exceeds patch_limit_on_one_side {cfg.patch_limit_on_one_side}")
    mean, std = np.array(cfg.image_mean), np.array(cfg.image_std)
    patches = np.empty((len(frames) * h * w, 3, p, p))
    n = 0
    for frame in frames:
        canvas = np.zeros((H, W, 3))          # black padding on the right and bottom...
        canvas[:rows, :cols] = frame
        canvas = (canvas / 255.0 - mean) / std  # ...which normalizes to (0 - 0.5)/0.5 = -1
        for r in range(h):
            for c in range(w):
                patches[n] = canvas[r * p:(r + 1) * p, c * p:(c + 1) * p, :].transpose(2, 0, 1)
                n += 1
    return patches, (len(frames), h, w)


def preprocess(image, cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float64 [h·w, 3, p, p], (1, h, w))."""
    img = to_rgb(image)
    new_w, new_h = resize_size(img.width, img.height, cfg)
    resized = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC) if (new_w, new_h) != img.size else img
    return _pad_normalize_patchify([np.asarray(resized, dtype=np.float64)], cfg)


def preprocess_frames(frames: list, cfg: MediaConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One video chunk -> (pixel_values [t·h·w, 3, p, p], (t, h, w)); per-frame patch budget."""
    imgs = [to_rgb(f) for f in frames]
    budget = cfg.in_patch_limit if cfg.in_patch_limit_each_frame is None else cfg.in_patch_limit_each_frame
    if cfg.in_patch_limit_video is not None:
        budget = min(round(cfg.in_patch_limit_video / len(imgs)), budget)
    new_w, new_h = resize_size(imgs[0].width, imgs[0].height, cfg, budget)
    arrays = []
    for img in imgs:
        resized = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC) if (new_w, new_h) != img.size else img
        arrays.append(np.asarray(resized, dtype=np.float64))
    return _pad_normalize_patchify(arrays, cfg)


def sample_frame_indices(num_frames: int, fps: float, cfg: MediaConfig) -> list[int]:
    """k = round(n · min(sample_fps, fps) / fps) ≥ 1 frames at i·step, step = (n-1)/(k-1), rounded half to even.

    ``i · step`` in float64 is what ``np.linspace`` computes; ties (x.5) are decided by that rounding.
    """
    k = max(round(num_frames * min(cfg.sample_fps, fps) / fps), 1)
    if cfg.max_num_frames_each_video is not None:
        k = min(k, cfg.max_num_frames_each_video)
    if k == 1:
        return [0]
    step = (num_frames - 1) / (k - 1)
    return [round(i * step) if i < k - 1 else num_frames - 1 for i in range(k)]


def timestamp_text(seconds: float, mode: str = "hh:mm:ss.fff") -> str:
    """HH:MM:SS.mmm by arithmetic: whole seconds after rounding to microseconds (as ``datetime`` does),
    hours modulo 24, milliseconds ``int(frac(t) · 1000)`` (truncated)."""
    frac, whole = math.modf(seconds)
    whole = int(whole) + (1 if round(frac * 1_000_000) >= 1_000_000 else 0)
    hh, mm, ss = (whole // 3600) % 24, (whole // 60) % 60, whole % 60
    millis = int((seconds % 1) * 1000)
    if mode == "hh:mm:ss.fff":
        return f"{hh:02d}:{mm:02d}:{ss:02d}.{millis:03d}"
    if mode == "mm:ss.fff":
        return f"{mm:02d}:{ss:02d}.{millis:03d}"
    if mode == "mm:ss":
        return f"{mm:02d}:{ss:02d}"
    raise ValueError(f"unknown timestamp_mode {mode!r}")
