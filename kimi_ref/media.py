"""Images and video in: any picture or clip -> MoonViT's ``pixel_values`` [N, 3, p, p] and ``grid_thw``.

One image (K2.5 sizes; p patch 14, m merge 2)::

    any PIL image / path / bytes / file:// or base64 data: URL ──RGB──> W×H pixels
      NaViT resize (PIL BICUBIC):   scale = min(1, √(in_patch_limit / ((W//p)(H//p))), side·p/W, side·p/H)
      zero-pad right/bottom to multiples of p·m = 28, normalize (x/255 - mean)/std  (padding -> -1.0)
      patchify ──> pixel_values [N, 3, p, p], grid_thw (t, h, w) in patches, N = t·h·w

Video: frames sampled at min(sample_fps, native fps) with ``np.linspace`` indices, cut into chunks of
``temporal_merge_kernel_size`` (4) frames; each chunk is one "image" with t ≤ 4 and its own prompt text
(an ``HH:MM:SS.mmm`` timestamp of its first frame, then a video media block with one ``<|media_pad|>``).

The chat's side: the image parts of OpenAI-style messages, and :class:`ImageTable`, every image of a
session preprocessed once, identically on every rank. What happens to ``pixel_values`` next (the tower,
the projector, the splice into the text) is :mod:`kimi_ref.moonvit`.

Sources of the facts: docs/sources.md §9 (what the template writes for media), §11 (preprocessing: HF
``kimi_k25_vision_processing.py``, MS-MM ``media_utils.py``). The float64 twin is ``oracle/media.py``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kimi_ref.chat_template import IMAGE_PART_TYPES, VIDEO_PLACEHOLDER
from kimi_ref.config import ConfigError, MediaConfig, fixture_path, load_media_config
from kimi_ref.tokenizer import MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_END, MEDIA_PAD

__all__ = [
    "IMAGE_PROMPT", "VIDEO_PLACEHOLDER", "MEDIA_PAD", "MediaError", "ImageLike",
    "default_media_config", "load_image", "resize_size", "padded_grid", "preprocess", "preprocess_frames",
    "tokens_per_image", "Video", "VideoChunk", "PreprocessedVideo", "open_video", "sample_frame_indices",
    "timestamp_text", "chunk_prompt", "split_video_chunks", "preprocess_video", "expand_video_placeholders",
    "image_part", "image_source", "message_images", "open_source", "ImageTable",
]

ImageLike = Union[Image.Image, str, os.PathLike, bytes, np.ndarray]

# What the K2.5 chat template writes for an image part (sources §9). For a video part it writes the
# VIDEO_PLACEHOLDER text, which the processor replaces by the video's chunk prompts.
IMAGE_PROMPT = f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"


class MediaError(ValueError):
    """An image the chat cannot show: a bad part, an unreadable file, a url it will not download."""


# ==========================================================================================================
# Preprocessing: any image -> RGB -> NaViT resize -> pad -> normalize -> patches
# ==========================================================================================================


@functools.lru_cache(maxsize=1)
def default_media_config() -> MediaConfig:
    """The shipped K2.5 ``preprocessor_config.json`` (sources §11); a checkpoint's own file wins when given."""
    path = fixture_path("kimi_k25").parent / "kimi_k25_preprocessor_config.json"
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
# The chat's images: image parts of messages, sources (paths, file:// and data: URLs), one table per session
# ==========================================================================================================


def image_part(source: str) -> dict:
    """The OpenAI content part for an image file (what --image adds and --save writes)."""
    return {"type": "image_url", "image_url": {"url": source}}


def image_source(part: dict) -> str:
    """The url/path an image part names: ``image_url.url`` (or ``image_url`` as a string), or ``image``."""
    value = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise MediaError(f"an image part must name its image as a string url or path, found {part!r}")
    return value


def message_images(messages: list[dict]) -> list[str]:
    """The image sources of every message, in prompt order (the order of the ``<|media_pad|>`` tokens)."""
    return [image_source(part) for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES]


def open_source(source: str, *, remote: str = "the chat does not download images; save it and pass its path"
                ) -> str | bytes:
    """A path, a ``file://`` URL or a base64 ``data:`` URL -> what load_image reads (bytes or a path). No network.

    ``remote`` says what to do instead when ``source`` is an http(s) or other remote URL (the server says
    "send a data: URL"; the chat says "save it").
    """
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise MediaError(f"image {source[:40]}...: only base64 data: URLs are supported, like "
                             "data:image/png;base64,...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"image {source[:40]}...: the base64 payload is broken ({e})") from None
    if source.startswith("file://"):
        return unquote(urlparse(source).path)
    if "://" in source:
        raise MediaError(f"image {source[:60]}: {remote}")
    return source


class ImageTable:
    """Every image a session can show, preprocessed once, identically on every rank.

    ``sources`` are the images of the loaded history and the --image files, in that order, duplicates
    once. ``media(indices)`` concatenates the chosen entries into the ``(pixel_values, grid_thws)``
    that :func:`kimi_ref.generate.generate` takes; ``indices(sources)`` is rank 0's side of that choice.
    """

    def __init__(self, sources: list[str], ckpt: str | Path) -> None:
        self.sources = list(dict.fromkeys(sources))
        self.entries: list[tuple[torch.Tensor, tuple[int, int, int]]] = []
        if not self.sources:
            return
        try:
            media_config = load_media_config(ckpt)
        except ConfigError as e:
            raise MediaError(f"images: {e}") from None
        for source in self.sources:
            try:
                self.entries.append(preprocess(load_image(open_source(source), "image"), media_config))
            except (FileNotFoundError, ValueError, TypeError) as e:
                raise MediaError(str(e)) from None

    def indices(self, sources: list[str]) -> list[int]:
        return [self.sources.index(s) for s in sources]

    def media(self, indices: list[int]) -> tuple[torch.Tensor, list[tuple[int, int, int]]] | None:
        """``(pixel_values, grid_thws)`` of the chosen images, in order, or None for no images."""
        if not indices:
            return None
        return (torch.cat([self.entries[i][0] for i in indices]), [self.entries[i][1] for i in indices])
