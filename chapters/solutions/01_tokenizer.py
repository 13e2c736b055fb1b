"""Solutions to the exercises of chapter 01 (the tokenizer). Tested in tests/test_tokenizer.py."""

from __future__ import annotations

from collections import Counter
from itertools import groupby
from typing import Mapping

from kimi_ref.tokenizer import KIMI_PAT_STR, Tokenizer, pretokenize


def bpe_pieces(piece: bytes, ranks: Mapping[bytes, int]) -> list[bytes]:
    """Exercise 1: split one regex piece into tokens by the rank rule.

    Start from single bytes; while some adjacent pair concatenates to a token, merge the pair whose
    token has the lowest rank (the leftmost such pair on ties). A piece that is itself a token stays
    whole (tiktoken looks that up first).
    """
    if piece in ranks:
        return [piece]
    parts = [bytes([b]) for b in piece]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return parts
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def naive_train_bpe(text: str, vocab_size: int, pat_str: str = KIMI_PAT_STR) -> dict[bytes, int]:
    """Exercise 2: the textbook trainer. After every merge, recount every adjacent pair of every piece.

    Same rules as :func:`kimi_ref.tokenizer.train_bpe`: ranks 0..255 are the bytes; each step merges
    the most frequent pair (ties: smallest left rank, then smallest right rank), overlapping pairs
    such as the two ``aa`` in ``aaa`` both count, a word is rewritten left to right, and a merge whose
    bytes are already a token reuses that token without adding a rank. Quadratic, and obviously right.
    """
    ranks = {bytes([b]): b for b in range(256)}
    tokens = [bytes([b]) for b in range(256)]
    counts = Counter(piece.encode("utf-8") for piece in pretokenize(text, pat_str))
    words = {piece: list(piece) for piece in counts}  # piece -> its current token ids
    while len(ranks) < vocab_size:
        pairs: Counter[tuple[int, int]] = Counter()
        for piece, word in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += counts[piece]
        if not pairs:
            raise ValueError(f"the text supports only {len(ranks) - 256} merges")
        (a, b), _ = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merged = tokens[a] + tokens[b]
        if merged not in ranks:
            ranks[merged] = len(tokens)
            tokens.append(merged)
        new_id = ranks[merged]
        for piece, word in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[piece] = out
    return ranks


def cut_long_runs(text: str, max_len: int) -> list[str]:
    """Exercise 3: cut ``text`` so that no piece holds more than ``max_len`` consecutive whitespace
    (``str.isspace``) or non-whitespace characters — each run is cut every ``max_len`` characters,
    counted from the run's first character. ``"".join`` of the result is ``text``."""
    cuts, pos = [], 0
    for _, run in groupby(text, key=str.isspace):
        length = len(list(run))
        cuts.extend(range(pos + max_len, pos + length, max_len))
        pos += length
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def user_turn_ids(tok: Tokenizer, text: str) -> list[int]:
    """Exercise 4: the ids of one K2.5-style user turn, ``<|im_user|>user<|im_middle|>{text}<|im_end|>``,
    safe against a ``text`` that spells special tokens: the control tokens enter as ids, the user's
    text is encoded with special-token strings kept as plain text."""
    return ([tok.special_id("<|im_user|>")] + tok.encode("user") + [tok.special_id("<|im_middle|>")]
            + tok.encode(text) + [tok.special_id("<|im_end|>")])
