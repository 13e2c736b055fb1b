"""Generation: prefill the prompt, then decode one token at a time from the latent KV cache.

    prompt ids [T]  --prefill-->  logits [1,T,V] (only the last row is used) + cache holding T tokens
    loop:  next = sample(logits[-1])             with rank 0's uniform draw u (see control.py)
           rank 0 decides: stop if next is a stop id (<|im_end|>), or max_new_tokens / the context is
           reached; the step [verdict, next, u'] goes to every rank (control.share_step)
           logits = model([[next]], cache)       one decode step: [1,1] -> [1,1,V], cache grows by 1

Sampling (the model card's defaults: temperature 1.0, top-p 0.95; temperature 0 = greedy):

    p = softmax(logits / temperature)                                   fp64, on the CPU
    keep the smallest set of most-likely tokens whose mass reaches top_p (the top token always stays)
    draw u ~ U[0, 1) from a seeded ``torch.Generator`` and take the first token whose cumulative kept
    mass exceeds u · (kept mass)                                        inverse-CDF sampling
    (draw_uniform, then pick_token; sample_next does both)

Sampling happens on the CPU in float64 with an explicit uniform draw (not ``torch.multinomial``), so
a seed gives the same tokens on any device and any TP size: all TP ranks hold the same all-gathered
logits up to float rounding, and only a draw within ~1e-6 of a token boundary could tell them apart.
Rank 0 alone draws ``u`` and decides each step (``control.py``), so the ranks can never disagree;
with pipeline stages the last stage picks the token with rank 0's ``u`` and sends it back to rank 0.

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

from kimi_ref import control
from kimi_ref.control import receive_ids, send_ids
from kimi_ref.parallel import ONE_STAGE, SINGLE, TP

__all__ = ["ContextError", "Generation", "Media", "check_context", "media_rows", "expanded_length", "top_p_filter",
           "draw_uniform", "pick_token", "sample_next", "make_generator", "stop_ids_for", "generate", "send_ids",
           "receive_ids"]

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


def draw_uniform(batch: int, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The uniform draws u [B, 1] (float64) for the next tokens; None at temperature 0 (greedy draws nothing)."""
    if temperature == 0:
        return None
    return torch.rand(batch, 1, generator=generator, dtype=torch.float64)


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] and the draws ``u`` [B, 1] of :func:`draw_uniform` (see module doc)."""
    check_sampling(temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"sampling takes logits [batch, vocab], found shape {tuple(logits.shape)}")
    logits = logits.detach().to("cpu", torch.float64)
    if temperature == 0:
        return logits.argmax(dim=-1)  # the first of equal maxima, as everywhere in torch
    if u is None or tuple(u.shape) != (logits.shape[0], 1):
        raise ValueError(f"sampling at temperature {temperature} needs draws u [{logits.shape[0]}, 1], "
                         f"found {None if u is None else tuple(u.shape)}")
    probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
    cdf = torch.cumsum(probs, dim=-1)
    picked = torch.searchsorted(cdf, u.to(torch.float64) * cdf[:, -1:], right=True).squeeze(-1)
    # u < total mass, so picked < V; the clamp only guards the last ulp. A zero-probability token can
    # never be picked: its cdf equals its predecessor's, and searchsorted(right=True) skips past it.
    return picked.clamp_(max=logits.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-p sampling (see module doc)."""
    check_sampling(temperature, top_p)
    batch = logits.shape[0] if logits.dim() == 2 else 0
    return pick_token(logits, temperature, top_p, draw_uniform(batch, temperature, generator))


def stop_ids_for(tokenizer, config=None, generation_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The ids that end an answer: ``<|im_end|>`` (end of turn), the config's eos ids (``[EOS]``), then
    ``generation_eos`` (generation_config.json's ``eos_token_id``), each once, in that order."""
    ids = [tokenizer.special_id("<|im_end|>")]
    for i in (*(config.eos_token_ids if config is not None else ()), *generation_eos):
        if i not in ids:
            ids.append(i)
    return tuple(ids)


# ---- the loop ------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
             seed: int | None = None, generator: torch.Generator | None = None,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tp: TP | None = None,
             media: Media | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (one sequence).

    Every rank (every TP rank of every pipeline stage) calls this with the same prompt; rank 0 draws
    the sampling stream (from ``generator``, or one seeded with ``seed``) and decides each step (see
    ``control.py``), so only rank 0's sampling settings and stop ids matter.
    ``on_token(id)`` runs on every rank that passes one, after each token (streaming).
    ``should_stop()`` is asked on rank 0 after each token (e.g. "Ctrl-C was pressed"); a True ends
    the generation on every rank with finish_reason "interrupted".
    ``media=(pixel_values, grid_thws)``: the prompt's images, one per ``<|media_pad|>`` in order (see the
    module doc); every rank passes the same. ``media=None`` or no images: a text-only prompt.
    """
    tp = getattr(model, "tp", SINGLE) if tp is None else tp
    pp = getattr(model, "pp", ONE_STAGE)
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
    root = pp.first and tp.rank == 0

    def decide(token: int, produced: int) -> control.Step | None:
        """Rank 0's control for the step that feeds ``token`` (-1: the prefill) after ``produced`` tokens."""
        if not root:
            return None
        verdict = (control.STOP if token in stops else
                   control.INTERRUPTED if token >= 0 and should_stop is not None and should_stop() else
                   control.LENGTH if produced >= budget else control.GO)
        u = draw_uniform(1, temperature, rng) if verdict == control.GO else None
        return control.Step(verdict, token, float("nan") if u is None else float(u), temperature, top_p)

    def next_token(logits: torch.Tensor | None, step: control.Step) -> int | None:
        """The last stage picks with rank 0's draw; the token comes home to stage 0 (None on middle stages)."""
        token = None
        if logits is not None:
            u = None if step.greedy else torch.tensor([[step.u]], dtype=torch.float64)
            token = int(pick_token(logits[:, -1], step.temperature, step.top_p, u)[0])
        return control.token_home(token, pp, device)

    tokens: list[int] = []
    step_seconds: list[float] = []
    start = time.perf_counter()
    step = control.share_step(decide(-1, 0), tp, pp, device)
    token = next_token(model(torch.tensor([prompt], device=device), cache, **images), step)
    prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    while True:
        step = control.share_step(decide(token, len(tokens) + 1) if root else None, tp, pp, device)
        tokens.append(step.token)
        if on_token is not None:
            on_token(step.token)
        if not step.goes_on:
            reason = control.FINISH_REASONS[step.verdict]
            break
        t0 = time.perf_counter()
        token = next_token(model(torch.tensor([[step.token]], device=device), cache), step)
        step_seconds.append(time.perf_counter() - t0)
    return Generation(tokens, length, reason, prefill_seconds, time.perf_counter() - decode_start, step_seconds)
