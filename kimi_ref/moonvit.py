"""MoonViT-3D: pictures and video clips into rows of the language model's input embeddings.

The journey of one image (K2.5 sizes; p patch 14, m merge 2, D vt_hidden_size 1152, H heads 16,
hd head dim 72, L layers 27, d text hidden_size 7168):

    any PIL image / path / bytes ──RGB──> W×H pixels
      NaViT resize (PIL BICUBIC):   scale = min(1, √(in_patch_limit / ((W//p)(H//p))), side·p/W, side·p/H)
      zero-pad right/bottom to multiples of p·m = 28, normalize (x/255 - mean)/std  (padding -> -1.0)
      patchify ──> pixel_values [N, 3, p, p], grid_thw (t, h, w) in patches, N = t·h·w

    VisionTower (weights ``vision_tower.*``):
      x = Conv2d(3, D, p, stride p)(pixel_values)                               [N, D]
        + bicubic(pos_emb.weight [64, 64, D] -> [h, w, D])   (+ sin-cos time embedding [t, D] if t > 1)
      L × pre-LN block, attention only within each image/chunk (cu_seqlens):
        x = x + wo(attention(rope2d(q), rope2d(k), v))        q, k, v = wqkv(LayerNorm0(x)) split [3, H, hd]
        x = x + fc1(gelu_tanh(fc0(LayerNorm1(x))))
      final_layernorm                                                            [N, D]

    sd2_tpool: mean over the t frames, then group 2×2 neighbours             [(h/2)(w/2), 4, D]
    Projector (weights ``mm_projector.*``): LayerNorm(D) per patch, flatten -> 4D,
      Linear(4D, 4D), exact GELU, Linear(4D, d)                                  [(h/2)(w/2), d]

    splice: the prompt's one ``<|media_pad|>`` per image becomes those (h/2)(w/2) rows (LLaVA style).

2D RoPE (per head, pairs of adjacent dims rotate as complex numbers): with f_j = θ^(-4j/hd),
j = 0 .. hd/4-1, θ = 10000, pair 2j turns by ``col · f_j`` and pair 2j+1 by ``row · f_j``
(x and y interleaved: [x0, y0, x1, y1, ...]), for q and k alike, so q·k sees only the 2D offset.

Video: frames sampled at min(sample_fps, native fps) with ``np.linspace`` indices, cut into chunks of
``temporal_merge_kernel_size`` (4) frames; each chunk is one "image" with t ≤ 4 (its own
``<|media_pad|>`` after an ``HH:MM:SS.mmm`` timestamp of its first frame), averaged over t by sd2_tpool.

Sources of the facts: docs/sources.md §3, §5, §11 (MS-MM ``modeling_kimi_k25.py``/``media_utils.py``, vLLM
``kimi_k25_vit.py``, HF ``kimi_k25_vision_processing.py``). The float64 twin is ``oracle/moonvit.py``.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from .config import MediaConfig, VisionConfig, fixture_path

__all__ = [
    "IMAGE_PROMPT", "VIDEO_PLACEHOLDER", "MEDIA_PAD", "ROPE_THETA", "VISION_LN_EPS",
    "default_media_config", "load_image", "resize_size", "padded_grid", "preprocess", "preprocess_frames",
    "tokens_per_image", "Video", "VideoChunk", "PreprocessedVideo", "open_video", "sample_frame_indices",
    "timestamp_text", "chunk_prompt", "split_video_chunks", "preprocess_video", "expand_video_placeholders",
    "interpolate_pos_emb", "time_embedding", "rope_2d_angles", "rope_2d_cos_sin", "apply_rope_2d",
    "FP32LayerNorm", "PatchEmbed", "VisionBlock", "VisionTower", "sd2_tpool", "Projector", "encode",
    "Spliced", "splice",
]

ImageLike = Union[Image.Image, str, os.PathLike, bytes, np.ndarray]

# What the K2.5 chat template writes for an image part, and the marker it writes for a video part
# (sources §9); the processor replaces the marker by the video's chunk prompts.
MEDIA_PAD = "<|media_pad|>"
IMAGE_PROMPT = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"

# Neither number is in vision_config: MoonViT's Rope2DPosEmbRepeated and its sin-cos time embedding
# use a base of 10000, and every tower LayerNorm is nn.LayerNorm's default eps (only the projector's
# eps, projector_ln_eps, is configurable).
ROPE_THETA = 10000.0
VISION_LN_EPS = 1e-5


# ==========================================================================================================
# Preprocessing: any image -> RGB -> NaViT resize -> pad -> normalize -> patches
# ==========================================================================================================


@functools.lru_cache(maxsize=1)
def default_media_config() -> MediaConfig:
    """The shipped K2.5 ``preprocessor_config.json`` (sources §11); a checkpoint's own file wins when given."""
    path = fixture_path("kimi_k25").parent / "kimi_k25_preprocessor_config.json"
    import json

    return MediaConfig.from_dict(json.loads(path.read_text()), str(path))


MAX_IMAGE_PIXELS = 1 << 26  # 8192 × 8192: far beyond what MoonViT keeps (it shrinks to in_patch_limit), not a bomb


def _decode(source: Any, what: str) -> Image.Image:
    """Open and decode foreign bytes; every way they can be broken is a ValueError naming ``what``."""
    try:
        img = Image.open(source)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{what} is {img.width}×{img.height} pixels; at most {MAX_IMAGE_PIXELS} pixels are read")
        img.load()
    except ValueError as e:
        if str(e).startswith(what):
            raise
        raise ValueError(f"{what} is not an image Pillow can read ({e})") from None
    except Exception as e:  # noqa: BLE001 - corrupt files raise OSError, SyntaxError, EOFError, struct.error, ...
        raise ValueError(f"{what} is not an image Pillow can read ({type(e).__name__}: {e})") from None
    return img


def load_image(image: ImageLike, what: str = "image") -> Image.Image:
    """A PIL image, a path, encoded bytes or an HxW(x3) uint8 array -> an RGB PIL image.

    Every mode is converted, none refused: grayscale (L, 1, I), palette (P), CMYK, ... go through
    Pillow's ``convert("RGB")``. RGBA/LA lose their alpha channel without compositing, exactly as the
    HF processor does (``_to_pil`` calls ``.convert("RGB")``), so a transparent pixel shows its stored colour.
    """
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        img = _decode(io.BytesIO(data), f"{what}: {len(data)} bytes")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no image file at {path}")
        img = _decode(path, f"{what}: {path}")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"{what}: an array must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                             f"found {image.dtype} {list(image.shape)}")
        img = Image.fromarray(image)
    else:
        raise TypeError(f"{what}: expected a PIL image, a path, bytes or a uint8 array, found {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what} is {img.width}×{img.height} pixels; an image needs at least 1×1")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_size(width: int, height: int, media_config: MediaConfig, in_patch_limit: int | None = None) -> tuple[int, int]:
    """NaViT resize target (new_w, new_h) for a ``width``×``height`` picture (sources §11, ``navit_resize_image``).

    Only ever shrinks: the area shrinks by scale² so that ``scale² · (W//p)·(H//p) ≤ in_patch_limit``
    (the patch count as the reference measures it, each side at least 1), each side ends at most
    ``patch_limit_on_one_side · p`` pixels, and the aspect ratio is kept up to ``int()``'s floor.
    ``W//p`` undercounts ``W/p``, so a thin picture can keep a few per cent more whole patches than the
    limit (K2.5: up to about 16800 for 16384); that is the reference's behaviour and the checkpoint's
    training distribution, so it is kept. ``in_patch_limit`` defaults to the image limit (videos pass
    the per-frame one).
    """
    if width < 1 or height < 1:
        raise ValueError(f"resize_size: image is {width}×{height} pixels; it needs at least 1×1")
    p, side = media_config.patch_size, media_config.patch_limit_on_one_side
    limit = media_config.in_patch_limit if in_patch_limit is None else in_patch_limit
    patches = max(1, width // p) * max(1, height // p)
    scale = min(1.0, math.sqrt(limit / patches), side * p / width, side * p / height)
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    return min(new_w, side * p), min(new_h, side * p)


def padded_grid(new_w: int, new_h: int, media_config: MediaConfig) -> tuple[int, int]:
    """(h, w) in patches after zero-padding to multiples of patch × merge; refuses a grid past the side limit.

    The side limit can only be crossed when ``patch_limit_on_one_side`` is not a multiple of the merge
    kernel (the HF processor refuses that case with the same check).
    """
    unit = media_config.patch_size * media_config.merge_kernel_size
    h = -(-new_h // unit) * media_config.merge_kernel_size
    w = -(-new_w // unit) * media_config.merge_kernel_size
    if max(h, w) > media_config.patch_limit_on_one_side:
        raise ValueError(
            f"a {new_w}×{new_h} picture pads to a {h}×{w} patch grid, past patch_limit_on_one_side "
            f"{media_config.patch_limit_on_one_side}: that limit must be a multiple of merge_kernel_size "
            f"{media_config.merge_kernel_size}"
        )
    return h, w


def tokens_per_image(width: int, height: int, media_config: MediaConfig | None = None) -> int:
    """LLM rows one ``width``×``height`` image becomes: (H/28)·(W/28) of the resized, padded picture."""
    cfg = media_config or default_media_config()
    h, w = padded_grid(*resize_size(width, height, cfg), cfg)
    return (h // cfg.merge_kernel_size) * (w // cfg.merge_kernel_size)


def _resized_padded(img: Image.Image, new_w: int, new_h: int, grid_h: int, grid_w: int, p: int) -> np.ndarray:
    """uint8 [grid_h·p, grid_w·p, 3]: the BICUBIC-resized picture in the top-left corner, zeros elsewhere."""
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    canvas = np.zeros((grid_h * p, grid_w * p, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(img)
    return canvas


def _normalize_patchify(frames: np.ndarray, media_config: MediaConfig) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T·(H/p)·(W/p), 3, p, p], patches in row-major (t, row, col) order."""
    p = media_config.patch_size
    x = torch.from_numpy(frames).to(torch.float32) / 255.0
    x = (x - torch.tensor(media_config.image_mean)) / torch.tensor(media_config.image_std)
    t, H, W, c = x.shape
    x = x.view(t, H // p, p, W // p, p, c).permute(0, 1, 3, 5, 2, 4)  # t, row, col, channel, py, px
    return x.reshape(-1, c, p, p).contiguous()


def preprocess(image: ImageLike, media_config: MediaConfig | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [h·w, 3, p, p], grid_thw (1, h, w) in patches)."""
    cfg = media_config or default_media_config()
    img = load_image(image)
    new_w, new_h = resize_size(img.width, img.height, cfg)
    h, w = padded_grid(new_w, new_h, cfg)
    pixels = _resized_padded(img, new_w, new_h, h, w, cfg.patch_size)
    return _normalize_patchify(pixels[None], cfg), (1, h, w)


def preprocess_frames(frames: Sequence[ImageLike], media_config: MediaConfig | None = None
                      ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One video chunk (1 .. temporal_merge_kernel_size frames of one size) -> (pixel_values, (t, h, w)).

    Every frame is resized like an image, but under ``in_patch_limit_each_frame`` (the image limit when
    null), itself capped by ``in_patch_limit_video`` spread over the chunk's frames when that is set —
    per chunk, as the HF processor does.
    """
    cfg = media_config or default_media_config()
    if len(frames) == 0:
        raise ValueError("preprocess_frames: a video chunk needs at least one frame, found none")
    if len(frames) > cfg.temporal_merge_kernel_size:
        raise ValueError(f"preprocess_frames: a chunk holds at most temporal_merge_kernel_size "
                         f"{cfg.temporal_merge_kernel_size} frames, found {len(frames)}")
    imgs = [load_image(f, what=f"video frame {i}") for i, f in enumerate(frames)]
    for i, img in enumerate(imgs):
        if img.size != imgs[0].size:
            raise ValueError(f"video frame {i} is {img.width}×{img.height}, frame 0 is {imgs[0].width}×{imgs[0].height}: "
                             "frames of one video must share a size")
    limit = cfg.in_patch_limit_each_frame if cfg.in_patch_limit_each_frame is not None else cfg.in_patch_limit
    if cfg.in_patch_limit_video is not None:
        limit = min(round(cfg.in_patch_limit_video / len(imgs)), limit)
    new_w, new_h = resize_size(imgs[0].width, imgs[0].height, cfg, in_patch_limit=limit)
    h, w = padded_grid(new_w, new_h, cfg)
    pixels = np.stack([_resized_padded(img, new_w, new_h, h, w, cfg.patch_size) for img in imgs])
    return _normalize_patchify(pixels, cfg), (len(imgs), h, w)


# ==========================================================================================================
# Video: frames from a list, a folder, a GIF (Pillow) or a container file (optional PyAV); chunks; prompts
# ==========================================================================================================


@dataclass(frozen=True)
class Video:
    """A clip whose frames are read on demand: ``read(indices) -> list of RGB images``."""

    num_frames: int
    fps: float
    read: Callable[[Sequence[int]], list[Image.Image]]
    source: str


@dataclass(frozen=True)
class VideoChunk:
    """Up to temporal_merge_kernel_size sampled frames; ``start`` is its first frame's time in seconds."""

    frames: list[Image.Image]
    frame_indices: list[int]
    start: float
    prompt: str


class PreprocessedVideo(NamedTuple):
    pixel_values: torch.Tensor               # float32 [Σ t·h·w, 3, p, p], the chunks one after another
    grid_thws: list[tuple[int, int, int]]    # one (t, h, w) per chunk
    prompt: str                              # the text that replaces <|kimi_k25_video_placeholder|>
    chunks: list[VideoChunk]


_NUMBERS = re.compile(r"(\d+)")


def _natural_key(path: Path) -> list:
    """frame_2.png before frame_10.png."""
    return [int(part) if part.isdigit() else part for part in _NUMBERS.split(path.name)]


def _need_fps(fps: float | None, what: str) -> float:
    if fps is None:
        raise ValueError(f"{what} carries no frame rate: pass fps=")
    if not fps > 0:
        raise ValueError(f"{what}: fps must be positive, found {fps}")
    return float(fps)


def open_video(source: Sequence[ImageLike] | str | os.PathLike | bytes, fps: float | None = None) -> Video:
    """A clip from a list of frames (needs ``fps``), a folder of frame images in natural name order (needs
    ``fps``), an animated GIF/WebP/APNG (Pillow; its frame durations give the fps unless ``fps`` is
    given), or any other file Pillow cannot read, decoded with PyAV if installed (mp4, mkv, ...)."""
    if isinstance(source, (list, tuple)):
        frames = list(source)
        if not frames:
            raise ValueError("video: the list of frames is empty; a video needs at least one frame")
        rate = _need_fps(fps, "a list of frames")
        return Video(len(frames), rate, lambda idx: [load_image(frames[i], f"video frame {i}") for i in idx],
                     f"list of {len(frames)} frames")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        exts = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        files = sorted((f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in exts
                        and not f.name.startswith(".")), key=_natural_key)
        if not files:
            raise ValueError(f"video: folder {folder} has no frames (no image files with {sorted(exts)[:6]}...)")
        rate = _need_fps(fps, f"folder {folder}")
        return Video(len(files), rate, lambda idx: [load_image(files[i], f"video frame {files[i]}") for i in idx],
                     str(folder))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"{len(source)} bytes"
        if not data:
            raise ValueError("video: 0 bytes; a video needs at least one frame")
    elif isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"video: no file or folder at {source}")
        data, name = Path(source).read_bytes(), str(source)
    else:
        raise TypeError(f"video: expected a list of frames, a folder, a file path or bytes, found {type(source).__name__}")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        return _open_with_pyav(data, name, fps)
    return _pillow_video(img, name, fps)


def _pillow_video(img: Image.Image, name: str, fps: float | None) -> Video:
    n = getattr(img, "n_frames", 1)
    if n < 1:
        raise ValueError(f"video {name} has no frames")
    if fps is None:
        durations = []
        for i in range(n):
            img.seek(i)
            durations.append(img.info.get("duration") or 0)
        if not all(d > 0 for d in durations):
            raise ValueError(f"video {name}: some frames have no duration, so the frame rate is unknown: pass fps=")
        fps = n / (sum(durations) / 1000.0)  # average rate, like the HF reader's avg_fps

    def read(indices: Sequence[int]) -> list[Image.Image]:
        out = []
        for i in indices:
            img.seek(i)  # Pillow applies the GIF's disposal rules, so each frame comes out whole
            out.append(load_image(img.copy(), f"video {name} frame {i}"))
        return out

    return Video(n, _need_fps(fps, name), read, name)


def _open_with_pyav(data: bytes, name: str, fps: float | None) -> Video:
    """Container formats (mp4, ...) through PyAV, an optional dependency imported only here."""
    try:
        import av  # noqa: PLC0415  (optional: ``pip install av``)
    except ImportError:
        raise ImportError(
            f"video {name}: Pillow cannot read it, and decoding mp4/mkv/webm needs PyAV, an optional dependency "
            "kimi_ref does not install (`pip install av`). Or pass the frames as a list of images, a folder or a GIF."
        ) from None
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError(f"video {name} has no video stream")
        stream = container.streams.video[0]
        rate = fps if fps is not None else (float(stream.average_rate) if stream.average_rate else None)
        count = sum(1 for _ in container.decode(stream))  # the header's frame count is not always there or right
    if count == 0:
        raise ValueError(f"video {name} has no frames")

    def read(indices: Sequence[int]) -> list[Image.Image]:
        wanted, frames = sorted(set(indices)), {}
        with av.open(io.BytesIO(data)) as c:
            for i, frame in enumerate(c.decode(c.streams.video[0])):
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
                if len(frames) == len(wanted):
                    break
        return [frames[i] for i in indices]

    return Video(count, _need_fps(rate, f"video {name}"), read, name)


def sample_frame_indices(num_frames: int, fps: float, media_config: MediaConfig | None = None) -> list[int]:
    """Frames kept from a clip: ``round(n · min(sample_fps, fps) / fps)`` of them (at least 1), spread by
    ``np.linspace(0, n-1, k).round()`` (round half to even), capped by max_num_frames_each_video if set.

    (The HF processor ignores max_num_frames_each_video here; it is null for K2.5, so they agree.)
    """
    cfg = media_config or default_media_config()
    if num_frames < 1:
        raise ValueError(f"video has {num_frames} frames; it needs at least one")
    if not fps > 0:
        raise ValueError(f"video fps must be positive, found {fps}")
    rate = min(cfg.sample_fps, fps)
    k = max(round(num_frames * rate / fps), 1)
    if cfg.max_num_frames_each_video is not None:
        k = min(k, cfg.max_num_frames_each_video)
    return np.linspace(0, num_frames - 1, k).round().astype(int).tolist()


def timestamp_text(seconds: float, mode: str = "hh:mm:ss.fff") -> str:
    """``HH:MM:SS.mmm`` like the HF processor: the clock part from ``datetime`` (UTC; hours wrap at 24),
    the milliseconds truncated, not rounded (``int((t % 1) · 1000)``: 2.3 s gives "00:00:02.299")."""
    clock = datetime.fromtimestamp(seconds, tz=timezone.utc)
    millis = f".{int((seconds % 1) * 1000):03d}"
    if mode == "hh:mm:ss.fff":
        return clock.strftime("%H:%M:%S") + millis
    if mode == "mm:ss.fff":
        return clock.strftime("%M:%S") + millis
    if mode == "mm:ss":
        return clock.strftime("%M:%S")
    raise ValueError(f"timestamp_mode {mode!r} is unknown; expected 'hh:mm:ss.fff', 'mm:ss.fff' or 'mm:ss'")


def chunk_prompt(timestamp: str) -> str:
    """One chunk's text: its timestamp, then the video media block with one ``<|media_pad|>``."""
    return f"{timestamp}<|media_begin|>video<|media_content|>{MEDIA_PAD}<|media_end|>"


def split_video_chunks(video: Video, media_config: MediaConfig | None = None) -> list[VideoChunk]:
    """Sample the clip and cut the frames into chunks of temporal_merge_kernel_size (the last may be shorter)."""
    cfg = media_config or default_media_config()
    indices = sample_frame_indices(video.num_frames, video.fps, cfg)
    k = cfg.temporal_merge_kernel_size
    frames = video.read(indices)
    chunks = []
    for start in range(0, len(indices), k):
        seconds = indices[start] / video.fps
        chunks.append(VideoChunk(frames[start:start + k], indices[start:start + k], seconds,
                                 chunk_prompt(timestamp_text(seconds, cfg.timestamp_mode))))
    return chunks


def preprocess_video(source: Sequence[ImageLike] | str | os.PathLike | bytes | Video, fps: float | None = None,
                     media_config: MediaConfig | None = None) -> PreprocessedVideo:
    """A clip -> every chunk's pixel_values (concatenated), one grid_thw per chunk, and the prompt text."""
    cfg = media_config or default_media_config()
    video = source if isinstance(source, Video) else open_video(source, fps)
    chunks = split_video_chunks(video, cfg)
    parts = [preprocess_frames(c.frames, cfg) for c in chunks]
    return PreprocessedVideo(torch.cat([pv for pv, _ in parts]), [g for _, g in parts],
                             "".join(c.prompt for c in chunks), chunks)


def expand_video_placeholders(text: str, video_prompts: Sequence[str]) -> str:
    """Replace the i-th ``<|kimi_k25_video_placeholder|>`` in the rendered prompt by ``video_prompts[i]``."""
    parts = text.split(VIDEO_PLACEHOLDER)
    if len(parts) - 1 != len(video_prompts):
        raise ValueError(f"the prompt has {len(parts) - 1} {VIDEO_PLACEHOLDER} markers but {len(video_prompts)} "
                         "videos were given")
    out = [parts[0]]
    for prompt, rest in zip(video_prompts, parts[1:]):
        out += [prompt, rest]
    return "".join(out)


# ==========================================================================================================
# Position information: interpolated learnable 2D table, fixed time embedding, 2D RoPE
# ==========================================================================================================


def _grid_list(grid_thws) -> list[tuple[int, int, int]]:
    if isinstance(grid_thws, torch.Tensor):
        grid_thws = grid_thws.tolist()
    if isinstance(grid_thws, tuple) and len(grid_thws) == 3 and all(isinstance(v, int) for v in grid_thws):
        grid_thws = [grid_thws]
    grids = []
    for i, g in enumerate(grid_thws):
        if len(g) != 3 or not all(int(v) >= 1 for v in g):
            raise ValueError(f"grid_thws[{i}] must be three positive integers (t, h, w), found {g!r}")
        grids.append(tuple(int(v) for v in g))
    if not grids:
        raise ValueError("grid_thws is empty: nothing to encode")
    return grids


def interpolate_pos_emb(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The learnable table [H0, W0, D] resized to [h·w, D] (row-major), fp32.

    ``F.interpolate(mode="bicubic")`` with PyTorch's defaults: align_corners False, cubic A = -0.75,
    edge samples clamped, no antialias even when shrinking. Same size is the identity (the reference
    skips the call then; the bicubic weights at offset 0 are (0, 1, 0, 0), so both agree).
    """
    H0, W0, D = weight.shape
    if (h, w) == (H0, W0):
        return weight.float().reshape(h * w, D)
    grid = weight.float().permute(2, 0, 1).unsqueeze(0)  # [1, D, H0, W0]
    out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(h * w, D)


def time_embedding(dim: int, t: int) -> torch.Tensor:
    """Fixed 1D sin-cos embedding [t, dim], fp32: row s = [sin(s·ω), cos(s·ω)], ω_i = 10000^(-i/(dim/2)).

    Halves concatenated, not interleaved (MAE's ``get_1d_sincos_pos_embed``).
    """
    if dim % 2:
        raise ValueError(f"time_embedding: dim must be even, found {dim}")
    omega = 1.0 / ROPE_THETA ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(t, dtype=torch.float64)[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def rope_2d_angles(grid_thws, head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """float64 [Σ t·h·w, head_dim/2]: pair 2j turns by col·f_j, pair 2j+1 by row·f_j, f_j = θ^(-4j/head_dim).

    Every frame of a chunk repeats its grid's angles (time is told by the time embedding, not RoPE).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, found {head_dim}")
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)  # [hd/4]
    parts = []
    for t, h, w in _grid_list(grid_thws):
        rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # row of patch r·w + c
        cols = torch.arange(w, dtype=torch.float64).repeat(h)
        xy = torch.stack([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1)  # [h·w, hd/4, 2]: x then y
        parts.append(xy.reshape(h * w, head_dim // 2).repeat(t, 1))
    return torch.cat(parts)


def rope_2d_cos_sin(grid_thws, head_dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [N, head_dim/2]; angles are float64 before the cast (house rule for RoPE)."""
    angles = rope_2d_angles(grid_thws, head_dim)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd]: rotate adjacent pairs (x_2i, x_2i+1) by the angles of cos/sin [N, hd/2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [N, heads, hd/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


# ==========================================================================================================
# The tower
# ==========================================================================================================


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 whatever the parameter dtype (an fp32 island), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class PositionEmbedding(nn.Module):
    """``pos_emb.weight`` [H0, W0, D] (learnable), plus the fixed time embedding computed on the fly
    (it is not in the checkpoint, and a buffer would not survive building the model on the meta device)."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.num_frames = config.init_pos_emb_time
        self.weight = nn.Parameter(torch.empty(config.init_pos_emb_height, config.init_pos_emb_width,
                                               config.hidden_size, dtype=dtype, device=device))
        # A fresh tower must compute something finite before a checkpoint is loaded (torch.empty may hold
        # NaNs); small normal values, as ViTs start their learnable tables. Skipped on the meta device
        # (checkpoint loading), as in Router: there is nothing to fill, and nn.init there imports torch._dynamo (~2 s).
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """fp32 [Σ t·h·w, D]."""
        out = []
        for t, h, w in grids:
            if t > self.num_frames:
                raise ValueError(f"a chunk of {t} frames is longer than the time embedding "
                                 f"(init_pos_emb_time {self.num_frames})")
            grid = interpolate_pos_emb(self.weight, h, w)  # [h·w, D]
            if t == 1:
                out.append(grid)  # a still image (or a 1-frame chunk) gets no time term at all...
            else:  # ...while frame 0 of a longer chunk gets sin(0)=0, cos(0)=1 added: the reference's quirk
                time = time_embedding(grid.shape[1], t).to(grid.device)
                out.append((grid[None] + time[:, None, :]).reshape(t * h * w, -1))
        return torch.cat(out)


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p) on each [3, p, p] patch (a Linear over 3·p·p numbers) + positions."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p, dtype=dtype, device=device)
        self.pos_emb = PositionEmbedding(config, dtype, device)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)  # [N, D, 1, 1] -> [N, D]
        return x + self.pos_emb(grids).to(x.dtype)


class VisionMLP(nn.Module):
    """fc1(gelu_tanh(fc0(x))): D -> intermediate -> D, with biases."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))  # the tower's MLP uses the tanh GELU


class VisionBlock(nn.Module):
    """Pre-LN transformer block; attention is bidirectional inside each image/chunk and blind across them."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        D = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.norm0 = FP32LayerNorm(D, eps=VISION_LN_EPS, dtype=dtype, device=device)
        self.wqkv = nn.Linear(D, 3 * D, dtype=dtype, device=device)  # rows: all q heads, all k heads, all v heads
        self.wo = nn.Linear(D, D, dtype=dtype, device=device)
        self.norm1 = FP32LayerNorm(D, eps=VISION_LN_EPS, dtype=dtype, device=device)
        self.mlp = VisionMLP(config, dtype, device)

    def attention(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.wqkv(x).view(N, 3, self.heads, self.head_dim).unbind(1)  # each [N, heads, hd]
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            # One image or chunk at a time: the same as a block-diagonal mask, without the N×N mask.
            # SDPA keeps softmax statistics in fp32 for bf16/fp16 inputs (the fp32 island).
            qs, ks, vs = (z[start:end].transpose(0, 1) for z in (q, k, v))  # [heads, n, hd]
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5).transpose(0, 1)
        return self.wo(out.reshape(N, -1))

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm1(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype, device):
        super().__init__()
        self.blocks = nn.ModuleList(VisionBlock(config, dtype, device) for _ in range(config.num_hidden_layers))
        self.final_layernorm = FP32LayerNorm(config.hidden_size, eps=VISION_LN_EPS, dtype=dtype, device=device)


class VisionTower(nn.Module):
    """MoonViT-3D. Parameter names are the checkpoint's, relative to ``vision_tower.``.

    ``forward(pixel_values [N, 3, p, p], grid_thws [(t, h, w), ...]) -> [N, D]`` (after final_layernorm),
    several images/chunks packed one after another, N = Σ t·h·w. Replicated on every tensor-parallel rank.
    """

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config, dtype, device)
        self.encoder = VisionEncoder(config, dtype, device)

    def forward(self, pixel_values: torch.Tensor, grid_thws) -> torch.Tensor:
        grids = _grid_list(grid_thws)
        p = self.config.patch_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(f"pixel_values must be [N, 3, {p}, {p}], found {list(pixel_values.shape)}")
        lengths = [t * h * w for t, h, w in grids]
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(f"grid_thws {grids} cover {sum(lengths)} patches but pixel_values has {pixel_values.shape[0]}")
        x = self.patch_embed(pixel_values, grids)
        cos, sin = rope_2d_cos_sin(grids, self.config.head_dim, device=x.device)
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        for block in self.encoder.blocks:
            x = block(x, cu_seqlens, cos, sin)
        return self.encoder.final_layernorm(x)


def sd2_tpool(x: torch.Tensor, grid_thws, merge_kernel_size: tuple[int, int] = (2, 2)) -> list[torch.Tensor]:
    """[Σ t·h·w, D] -> per image/chunk [(h/kh)(w/kw), kh·kw, D]: mean over t, then group kh×kw neighbours.

    Group r·(w/kw) + c holds patches (kh·r + i, kw·c + j) in the order (i, j) = (0,0), (0,1), (1,0), (1,1).
    The mean is taken in fp32.
    """
    kh, kw = merge_kernel_size
    grids = _grid_list(grid_thws)
    lengths = [t * h * w for t, h, w in grids]
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"sd2_tpool: grid_thws {grids} cover {sum(lengths)} rows but x has {x.shape[0]}")
    out = []
    for seq, (t, h, w) in zip(x.split(lengths), grids):
        if h % kh or w % kw:
            raise ValueError(f"sd2_tpool: grid {h}×{w} is not a multiple of the merge kernel {kh}×{kw}")
        v = seq.float().view(t, h // kh, kh, w // kw, kw, -1).mean(dim=0)  # [h/kh, kh, w/kw, kw, D]
        out.append(v.permute(0, 2, 1, 3, 4).reshape((h // kh) * (w // kw), kh * kw, -1).to(x.dtype))
    return out


class Projector(nn.Module):
    """Patch merger (names relative to ``mm_projector.``): [n, kh·kw, mm_hidden] -> [n, text_hidden].

    pre_norm: LayerNorm(mm_hidden, projector_ln_eps) on each patch; flatten the group; proj.0 Linear,
    proj.1 exact (erf) GELU, proj.2 Linear to the language model's width.
    """

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.config = config
        merged = config.mm_hidden_size * config.merge_kernel_size[0] * config.merge_kernel_size[1]
        self.pre_norm = FP32LayerNorm(config.mm_hidden_size, eps=config.projector_ln_eps, dtype=dtype, device=device)
        self.proj = nn.Sequential(
            nn.Linear(merged, merged, dtype=dtype, device=device),
            nn.GELU(),  # exact GELU here, the tanh one inside the tower
            nn.Linear(merged, config.text_hidden_size, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kk = self.config.merge_kernel_size[0] * self.config.merge_kernel_size[1]
        if x.ndim != 3 or x.shape[1:] != (kk, self.config.mm_hidden_size):
            raise ValueError(f"Projector: expected [n, {kk}, {self.config.mm_hidden_size}], found {list(x.shape)}")
        x = self.pre_norm(x.to(self.proj[0].weight.dtype))
        return self.proj(x.flatten(1))


def encode(tower: VisionTower, projector: Projector, pixel_values: torch.Tensor, grid_thws) -> list[torch.Tensor]:
    """Images/chunks -> one [(h/2)(w/2), text_hidden] block of LLM input rows each, in grid_thws order."""
    grids = _grid_list(grid_thws)
    merged = sd2_tpool(tower(pixel_values, grids), grids, tower.config.merge_kernel_size)
    rows = projector(torch.cat(merged))
    return list(rows.split([m.shape[0] for m in merged]))


# ==========================================================================================================
# Splicing the vision rows into the text embeddings
# ==========================================================================================================


class Spliced(NamedTuple):
    embeds: torch.Tensor      # [B, T', d]   text rows and vision rows, in prompt order
    input_ids: torch.Tensor   # [B, T']      the placeholder id repeated on every vision row (vLLM's expanded ids)
    positions: torch.Tensor   # [B, T']      0 .. T'-1: positions count the expanded rows


def splice(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, features: Sequence[torch.Tensor],
           placeholder_id: int, pad_id: int | None = None) -> Spliced:
    """Replace each ``placeholder_id`` token by its image's feature rows (HF LLaVA-style expansion).

    Placeholders take ``features`` in reading order: row 0 left to right, then row 1, ... When the rows
    of a batch expand to different lengths they are right-padded with ``pad_id`` (zero embeddings); without
    a ``pad_id`` that is an error, since the model has no attention mask to hide left-over rows.
    """
    if inputs_embeds.ndim != 3 or input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"splice: inputs_embeds must be [B, T, d] and input_ids [B, T], "
                         f"found {list(inputs_embeds.shape)} and {list(input_ids.shape)}")
    B, T, d = inputs_embeds.shape
    n_placeholders = int((input_ids == placeholder_id).sum())
    if n_placeholders != len(features):
        raise ValueError(f"splice: the prompt has {n_placeholders} media placeholders (id {placeholder_id}) "
                         f"but {len(features)} feature blocks were given: one per image or video chunk")
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[1] != d:
            raise ValueError(f"splice: features[{i}] must be [n, {d}], found {list(f.shape)}")
    feats = iter(features)
    rows_e, rows_i = [], []
    for b in range(B):
        pieces_e, pieces_i, last = [], [], 0
        for t in (input_ids[b] == placeholder_id).nonzero().flatten().tolist():
            f = next(feats)
            pieces_e += [inputs_embeds[b, last:t], f.to(inputs_embeds.dtype)]
            pieces_i += [input_ids[b, last:t], input_ids.new_full((f.shape[0],), placeholder_id)]
            last = t + 1
        rows_e.append(torch.cat(pieces_e + [inputs_embeds[b, last:]]))
        rows_i.append(torch.cat(pieces_i + [input_ids[b, last:]]))
    length = max(r.shape[0] for r in rows_e)
    if any(r.shape[0] != length for r in rows_e):
        if pad_id is None:
            raise ValueError(f"splice: the batch rows expand to different lengths {[r.shape[0] for r in rows_e]}; "
                             "pass pad_id to right-pad them")
        rows_e = [F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows_e]
        rows_i = [F.pad(r, (0, length - r.shape[0]), value=pad_id) for r in rows_i]
    positions = torch.arange(length, device=input_ids.device).expand(B, length)
    return Spliced(torch.stack(rows_e), torch.stack(rows_i), positions)
