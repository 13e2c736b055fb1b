"""Solutions to the exercises of chapter 09 (generation). Tested in tests/test_generate.py."""

from __future__ import annotations

import torch


def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least ``min_p`` times as likely as the most likely one (zero the rest)."""
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return torch.where(probs >= threshold, probs, torch.zeros_like(probs))


@torch.inference_mode()
def generate_without_cache(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow, obvious way: run the whole sequence again for every new token."""
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([sequence]))[0, -1]
        sequence.append(int(logits.argmax()))
    return sequence[len(prompt):]


def cache_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """Bytes the absorbed MLA cache holds for ``tokens`` tokens of one sequence:
    every layer keeps the normalized latent (kv_lora_rank) and the roped key (qk_rope_head_dim)."""
    per_token_per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * per_token_per_layer * bytes_per_value * tokens
