"""Byte-level BPE itself: merge the bytes of one piece, and learn ranks from counted pieces.

A *rank* is both a token's id and its merge priority: ``rank(x + y)`` small means "merged early in
training". Ranks 0..255 are the 256 single bytes, so every string encodes. This file knows nothing of
regexes, special tokens or files: :mod:`kimi_ref.tokenizer` cuts text into pieces (Kimi's pat_str) and
hands each piece's UTF-8 bytes here.

Merging one piece (tiktoken's algorithm; ranks are looked up on the *bytes* of the concatenation,
exactly like tiktoken, not on a list of recorded merges)::

    parts = the piece's single bytes                        b" world" -> [" ", "w", "o", "r", "l", "d"]
    while some adjacent pair (x, y) has rank(x + y):        merge the lowest-ranked pair, leftmost on ties
    ids = [rank(p) for p in parts]

Training (:func:`train_merges`): start from the 256 bytes and repeatedly add the most frequent adjacent
pair of tokens, counted over the pieces with their counts; pairs never cross pieces.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Mapping

__all__ = ["BPEError", "bpe_merge", "train_merges"]


class BPEError(ValueError):
    """A piece with a byte the ranks lack, or pieces that cannot support the merges asked for."""



_LONG_PIECE = 100  # tiktoken switches to its heap algorithm at 100 bytes; so do we (same result)


def bpe_merge(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """Token ids of one regex piece: repeatedly merge the adjacent pair whose concatenation has the
    lowest rank (leftmost on ties) until no adjacent pair is a token.

    A piece that is itself a token is one id (tiktoken checks that first, and it is not always what
    the merges would give, so it is not an optimization but part of the definition).
    """
    token = ranks.get(piece)
    if token is not None:
        return [token]
    if len(piece) >= _LONG_PIECE:
        return _bpe_merge_heap(piece, ranks)
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [_rank_of(part, ranks) for part in parts]


def _bpe_merge_heap(piece: bytes, ranks: Mapping[bytes, int]) -> list[int]:
    """The same merges in O(n log n) for long pieces (a 25,000-letter word would take hours with the
    O(n^2) loop): a heap of candidate pairs keyed (rank, start) and a linked list of parts."""
    n = len(piece)
    end = list(range(1, n + 1))          # end[i]: where the part starting at i ends (parts start at i)
    prev = list(range(-1, n - 1))        # prev[i]: start of the part before i (-1: none)
    alive = [True] * n
    heap: list[tuple[int, int, int]] = []  # (rank, left start, right end); stale entries are skipped

    def push(left: int) -> None:
        right = end[left]
        if right < n:
            rank = ranks.get(piece[left:end[right]])
            if rank is not None:
                heapq.heappush(heap, (rank, left, end[right]))

    for i in range(n - 1):
        push(i)
    while heap:
        rank, left, right_end = heapq.heappop(heap)
        right = end[left] if alive[left] else n
        if right >= n or end[right] != right_end:
            continue  # one of the two parts has merged with something else since this was pushed
        alive[right] = False
        end[left] = right_end
        if right_end < n:
            prev[right_end] = left
        push(left)
        if prev[left] >= 0:
            push(prev[left])
    out, i = [], 0
    while i < n:
        out.append(_rank_of(piece[i:end[i]], ranks))
        i = end[i]
    return out


def _rank_of(part: bytes, ranks: Mapping[bytes, int]) -> int:
    rank = ranks.get(part)
    if rank is None:  # only a single byte can be missing: merged parts are tokens by construction
        raise BPEError(f"byte {part!r} has no rank in this vocabulary, so text containing it cannot "
                             "be encoded (a byte-level BPE needs every byte that UTF-8 text can produce)")
    return rank


def train_merges(piece_counts: Mapping[bytes, int], vocab_size: int) -> dict[bytes, int]:
    """Learn ``vocab_size`` ranks from pieces (UTF-8 bytes) and how often each occurs: the 256 single bytes
    (ranks 0..255, in byte order), then one token per merge, each merge joining the most frequent
    adjacent pair of tokens.

    After each merge only the pieces that contained the merged pair are updated (their pair counts are
    subtracted, the new ones added), and a heap with lazy deletion finds the next best pair, so a merge
    costs time in proportion to where it occurs.

    Deterministic tie-break: among pairs with the same count, the one whose left token has the
    smallest rank wins, then the one whose right token has the smallest rank.
    If a merge gives bytes that are already a token (``a + bc == ab + c``), the pieces use that token
    and no rank is added.
    """
    if vocab_size < 256:
        raise BPEError(f"vocab_size must be at least 256 (one rank per byte), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    token_bytes = [bytes([b]) for b in range(256)]
    words = [list(piece) for piece in piece_counts if len(piece) > 1]  # a 1-byte piece has no pair
    counts = [piece_counts[piece] for piece in piece_counts if len(piece) > 1]

    pair_counts: dict[tuple[int, int], int] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(w)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size:
        # The best pair: entries whose count is out of date are dropped as they surface.
        while heap and pair_counts.get((heap[0][1], heap[0][2])) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            raise BPEError(f"the text supports only {len(ranks) - 256} merges (vocab_size {len(ranks)}), "
                                 f"not {vocab_size - 256}: give more text or ask for a smaller vocab_size")
        _, a, b = heapq.heappop(heap)
        merged = token_bytes[a] + token_bytes[b]
        new_id = ranks.get(merged)
        if new_id is None:
            new_id = ranks[merged] = len(token_bytes)
            token_bytes.append(merged)

        changed: set[tuple[int, int]] = set()
        for w in where.pop((a, b)):
            word, count = words[w], counts[w]
            new_word, i = [], 0
            while i < len(word):  # left to right, so "aaa" with pair (a, a) becomes [aa, a]
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    new_word.append(new_id)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            if len(new_word) == len(word):
                continue  # a stale entry: this word lost the pair to an earlier merge
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= count
                changed.add(pair)
            for pair in zip(new_word, new_word[1:]):
                pair_counts[pair] += count
                changed.add(pair)
                where.setdefault(pair, set()).add(w)
            words[w] = new_word
        for pair in changed:
            count = pair_counts[pair]
            if count > 0:
                heapq.heappush(heap, (-count, pair[0], pair[1]))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
    return ranks
