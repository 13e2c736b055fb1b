"""Solutions to the exercises of chapter 11 (MoonViT). Tested in tests/test_moonvit.py."""

from __future__ import annotations

import math

import torch

from kimi_ref import media
from kimi_ref.config import MediaConfig


def tokens_for(width: int, height: int, cfg: MediaConfig) -> int:
    """Exercise 1: LLM rows for a ``width``×``height`` image by arithmetic alone (no pixels touched).

    Shrink by the NaViT scale, round each side up to a multiple of patch × merge (28), and count the
    28×28 cells: each becomes one row after the 2×2 merge.
    """
    p, unit = cfg.patch_size, cfg.patch_size * cfg.merge_kernel_size
    whole = max(1, width // p) * max(1, height // p)
    scale = min(1.0, math.sqrt(cfg.in_patch_limit / whole),
                cfg.patch_limit_on_one_side * p / width, cfg.patch_limit_on_one_side * p / height)
    new_w = min(max(1, int(width * scale)), cfg.patch_limit_on_one_side * p)
    new_h = min(max(1, int(height * scale)), cfg.patch_limit_on_one_side * p)
    return math.ceil(new_w / unit) * math.ceil(new_h / unit)


def largest_unresized_square(cfg: MediaConfig) -> int:
    """Exercise 2: the largest square side (pixels) that passes through preprocessing without a resize.

    Untouched means (s//p)² ≤ in_patch_limit and s ≤ side·p: s//p may be at most ⌊√limit⌋, and the
    extra p-1 pixels of a partial patch are not counted by the reference's ``s // p``.
    """
    p = cfg.patch_size
    return min(math.isqrt(cfg.in_patch_limit) * p + p - 1, cfg.patch_limit_on_one_side * p)


def video_tokens(num_frames: int, fps: float, width: int, height: int, cfg: MediaConfig) -> int:
    """Exercise 3: LLM rows of a whole clip: sampled frames, chunks of 4, each chunk one frame's worth."""
    kept = len(media.sample_frame_indices(num_frames, fps, cfg))
    chunks = math.ceil(kept / cfg.temporal_merge_kernel_size)
    limit = cfg.in_patch_limit if cfg.in_patch_limit_each_frame is None else cfg.in_patch_limit_each_frame
    h, w = media.padded_grid(*media.resize_size(width, height, cfg, in_patch_limit=limit), cfg)
    return chunks * (h // cfg.merge_kernel_size) * (w // cfg.merge_kernel_size)


def unpatchify(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    """Exercise 4: one image's patches [h·w, 3, p, p] back to the padded picture [3, h·p, w·p]."""
    t, h, w = grid_thw
    if t != 1:
        raise ValueError(f"unpatchify takes one image (t = 1), found t = {t}")
    p = pixel_values.shape[-1]
    grid = pixel_values.view(h, w, 3, p, p)           # patch (row, col) holds [channel, py, px]
    return grid.permute(2, 0, 3, 1, 4).reshape(3, h * p, w * p)  # channel, row, py, col, px
