"""Generation: prefill the prompt, then decode one token at a time from the latent KV cache.

    prompt ids [T]  --prefill-->  logits [1,T,V] (only the last row is used) + cache holding T tokens
    loop:  next = sample(logits[-1])             rank 0 samples, then broadcasts [next, go-on flag]
           stop if next is a stop id (<|im_end|>), or max_new_tokens / the context is reached
           logits = model([[next]], cache)       one decode step: [1,1] -> [1,1,V], cache grows by 1

Sampling (the model card's defaults: temperature 1.0, top-p 0.95; temperature 0 = greedy):

    p = softmax(logits / temperature)                                   fp64, on the CPU
    keep the smallest set of most-likely tokens whose mass reaches top_p (the top token always stays)
    draw u ~ U[0, 1) from a seeded ``torch.Generator`` and take the first token whose cumulative kept
    mass exceeds u · (kept mass)                                        inverse-CDF sampling

Sampling happens on the CPU in float64 with an explicit uniform draw (not ``torch.multinomial``), so
a seed gives the same tokens on any device and any TP size: all TP ranks hold the same all-gathered
logits up to float rounding, and only a draw within ~1e-6 of a token boundary could tell them apart.
Rank 0 still samples alone and broadcasts, so the ranks can never disagree.

Images (K2.5+): ``media=(pixel_values [N,3,14,14], grid_thws [(t,h,w), ...])`` goes to the prefill call
only, where the model splices each image's MoonViT rows in place of its ``<|media_pad|>``:

    expanded length  T' = T + Σ_i (rows_i - 1),   rows_i = (h_i/kh)(w_i/kw)    (kh, kw: the merge kernel)

Decode steps are plain tokens at positions T', T'+1, ... (the cache already holds the image rows).

A prompt whose expanded length does not fit in ``max_position_embeddings`` (it must leave room for one
new token) is refused before anything runs; generation also stops when the context is full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from kimi_ref import parallel
from kimi_ref.parallel import SINGLE, TP

__all__ = ["ContextError", "Generation", "Media", "check_context", "media_rows", "expanded_length", "top_p_filter",
           "sample_next", "make_generator", "stop_ids_for", "generate", "send_ids", "receive_ids"]

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 512


# (pixel_values [N, 3, p, p], grid_thws: one (t, h, w) in patches per image, in prompt order)
Media = tuple[torch.Tensor, Sequence[Sequence[int]]]


class ContextError(ValueError):
    """The prompt (plus at least one new token) does not fit in the model's context."""


@dataclass
class Generation:
    """What one call to :func:`generate` produced (identical on every rank)."""

    tokens: list[int]                 # the new tokens, the stop token included when one was hit
    prompt_tokens: int                # positions the prompt fills: its ids, each image's rows counted
    finish_reason: str                # "stop" (a stop id), "length" (max_new_tokens or context), "interrupted"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0       # from the first decode step to the last token
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode loop (tokens after the first, which prefill produced)."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def check_context(prompt_tokens: int, max_position_embeddings: int) -> None:
    """Refuse a prompt that leaves no room for a new token in the model's context."""
    if prompt_tokens < 1:
        raise ContextError("the prompt is empty: generation needs at least one prompt token")
    if prompt_tokens >= max_position_embeddings:
        raise ContextError(
            f"the prompt is {prompt_tokens} tokens, but the model's context (max_position_embeddings) is "
            f"{max_position_embeddings}: at most {max_position_embeddings - 1} prompt tokens leave room to answer. "
            "Shorten the prompt or /reset the conversation.")


def media_rows(grid_thws: Sequence[Sequence[int]], merge_kernel_size: Sequence[int]) -> list[int]:
    """LLM rows per image: MoonViT averages the t frames and merges kh×kw patches into one row."""
    kh, kw = merge_kernel_size
    rows = []
    for i, g in enumerate(grid_thws):
        t, h, w = (int(v) for v in g)
        if min(t, h, w) < 1 or h % kh or w % kw:
            raise ValueError(f"grid_thws[{i}] = {tuple(g)}: expected positive (t, h, w) with h, w multiples of "
                             f"the merge kernel {kh}×{kw}")
        rows.append((h // kh) * (w // kw))
    return rows


def expanded_length(prompt_ids: Sequence[int], media: Media | None, config) -> int:
    """Positions the prompt fills once every ``<|media_pad|>`` is replaced by its image's rows.

    Checks what the prefill would otherwise fail on mid-way: a model without a vision tower, and a
    number of placeholders that differs from the number of images.
    """
    if media is None:
        return len(prompt_ids)
    grids = list(media[1])
    if config.vision is None:
        raise ValueError(f"images were given, but the model has no vision tower ({config.source} has no vision_config)")
    placeholder = config.media_placeholder_token_id
    if placeholder is None:
        raise ValueError(f"{config.source}: no media_placeholder_token_id, so images cannot be placed")
    n_placeholders = sum(1 for i in prompt_ids if i == placeholder)
    if n_placeholders != len(grids):
        raise ValueError(f"the prompt has {n_placeholders} <|media_pad|> placeholders (id {placeholder}) but "
                         f"{len(grids)} image(s) were given: one placeholder per image")
    rows = media_rows(grids, config.vision.merge_kernel_size)
    return len(prompt_ids) + sum(r - 1 for r in rows)


def check_sampling(temperature: float, top_p: float) -> None:
    if not (temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), found {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], found {top_p}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every probability outside the nucleus: the fewest most-likely tokens whose mass reaches ``top_p``.

    ``probs`` [..., V] (not renormalized). A token is kept when the mass of the tokens strictly more
    likely than it is still below ``top_p``, so the most likely token is always kept and ties at the
    edge are decided by sort order (stable: the lower id first).
    """
    if top_p >= 1:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, probs, torch.zeros_like(probs))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded when ``seed`` is given, else from fresh OS entropy."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample_next(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-p sampling (see module doc)."""
    check_sampling(temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"sample_next takes logits [batch, vocab], found shape {tuple(logits.shape)}")
    logits = logits.detach().to("cpu", torch.float64)
    if temperature == 0:
        return logits.argmax(dim=-1)  # the first of equal maxima, as everywhere in torch
    probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u < total mass, so picked < V; the clamp only guards the last ulp. A zero-probability token can
    # never be picked: its cdf equals its predecessor's, and searchsorted(right=True) skips past it.
    return picked.clamp_(max=logits.shape[-1] - 1)


def stop_ids_for(tokenizer, config=None) -> tuple[int, ...]:
    """The ids that end an answer: ``<|im_end|>`` (end of turn) and the config's eos ids (``[EOS]``)."""
    ids = [tokenizer.special_id("<|im_end|>")]
    if config is not None:
        ids += [i for i in config.eos_token_ids if i not in ids]
    return tuple(ids)


# ---- moving a prompt from rank 0 to the others (only through parallel.broadcast) ----------------------


def send_ids(ids: Sequence[int] | None, tp: TP, device: torch.device | str = "cpu") -> list[int]:
    """Rank 0 passes ``ids``; every rank returns them. Length first, then the ids (one broadcast each)."""
    if tp.world_size == 1:
        return list(ids or [])
    n = torch.tensor([len(ids) if tp.rank == 0 else 0], dtype=torch.long, device=device)
    parallel.broadcast(n, tp)
    buf = (torch.tensor(list(ids), dtype=torch.long, device=device) if tp.rank == 0
           else torch.empty(int(n.item()), dtype=torch.long, device=device))
    if int(n.item()):
        parallel.broadcast(buf, tp)
    return buf.tolist()


receive_ids = send_ids  # the workers' side of the same call reads better under this name


# ---- the loop ------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
             seed: int | None = None, generator: torch.Generator | None = None,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tp: TP | None = None,
             media: Media | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (one sequence).

    Every TP rank calls this with the same prompt; rank 0 samples (from ``generator``, or one seeded
    with ``seed``) and broadcasts each token, so only rank 0's sampling settings matter.
    ``on_token(id)`` runs on every rank that passes one, after each token (streaming).
    ``should_stop()`` is asked on rank 0 after each token (e.g. "Ctrl-C was pressed"); a True ends
    the generation on every rank with finish_reason "interrupted".
    ``media=(pixel_values, grid_thws)``: the prompt's images, one per ``<|media_pad|>`` in order (see the
    module doc); every rank passes the same. ``media=None`` or no images: a text-only prompt.
    """
    tp = getattr(model, "tp", SINGLE) if tp is None else tp
    check_sampling(temperature, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().tolist()
    config = model.config
    if media is not None and len(media[1]) == 0:
        media = None
    length = expanded_length(prompt, media, config)
    check_context(length, config.max_position_embeddings)
    device = next(model.parameters()).device
    stops = set(int(i) for i in stop_ids)
    budget = min(max_new_tokens, config.max_position_embeddings - length)
    # The cache needs room for every position the model reads: the prompt (images expanded) and all new
    # tokens but the last.
    cache = model.new_cache(1, length + budget)
    images = {}  # the prefill's keyword arguments; decode steps never see the images again
    if media is not None:
        images = {"pixel_values": media[0].to(device), "grid_thws": [tuple(int(v) for v in g) for g in media[1]]}
    rng = generator if generator is not None else make_generator(seed)

    tokens: list[int] = []
    step_seconds: list[float] = []
    reason = "length"
    start = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), cache, **images)[:, -1]
    prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    while True:
        # [token, verdict]: verdict 0 = go on, 1 = stop token, 2 = interrupted. Decided on rank 0 only.
        message = torch.zeros(2, dtype=torch.long, device=device)
        if tp.rank == 0:
            token = int(sample_next(logits, temperature, top_p, rng)[0])
            interrupted = should_stop is not None and should_stop()
            message[0], message[1] = token, 1 if token in stops else 2 if interrupted else 0
        parallel.broadcast(message, tp)
        token, verdict = int(message[0]), int(message[1])
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if verdict:
            reason = "stop" if verdict == 1 else "interrupted"
            break
        if len(tokens) >= budget:
            break
        step = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), cache)[:, -1]
        step_seconds.append(time.perf_counter() - step)
    return Generation(tokens, length, reason, prefill_seconds, time.perf_counter() - decode_start, step_seconds)
