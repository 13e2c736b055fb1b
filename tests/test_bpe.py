"""Byte-level BPE (kimi_ref.bpe): merging one piece, both algorithms, and learning merges from counted pieces.

The references are chapter 01's textbook solutions (exercise 1: merge by recounting; exercise 2: train by
recounting everything), which share no code with kimi_ref.bpe; tiktoken itself is the peer in
test_tokenizer.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimi_ref.bpe import BPEError, _bpe_merge_heap, bpe_merge, train_merges
from kimi_ref.tokenizer import Tokenizer, pretokenize
from test_tokenizer import FRAGMENTS, SOL


@pytest.fixture(scope="module")
def demo_py() -> Tokenizer:
    return Tokenizer.demo("python")


@given(pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join))
def test_bpe_merge_equals_exercise_1(demo_py, pieces):
    for piece in pretokenize(pieces):
        data = piece.encode()
        expected = [demo_py.ranks[p] for p in SOL.bpe_pieces(data, demo_py.ranks)]
        assert bpe_merge(data, demo_py.ranks) == expected
        assert _bpe_merge_heap(data, demo_py.ranks) == expected


def test_long_piece_heap_path(demo_py):
    """Pieces of >= 100 bytes take the O(n log n) heap; it gives the merges the simple loop gives."""
    word = ("abracadabra" * 40).encode()
    assert _bpe_merge_heap(word, demo_py.ranks) == [demo_py.ranks[p] for p in SOL.bpe_pieces(word, demo_py.ranks)]


@given(words=st.lists(st.sampled_from([" low", " lower", " lowest", " aaaa", " abab", " the"]), max_size=30),
       merges=st.integers(0, 20))
def test_train_merges_equals_the_recounting_trainer(words, merges):
    """On pieces given directly (no regex): the same ranks as exercise 2's trainer on the joined pieces,
    which it cuts into these same pieces (each word is one Kimi pre-tokenizer piece)."""
    counts = Counter(w.encode() for w in words)
    try:
        expected = SOL.naive_train_bpe("".join(words), 256 + merges)
    except ValueError:
        with pytest.raises(BPEError, match="supports only"):
            train_merges(counts, 256 + merges)
        return
    assert train_merges(counts, 256 + merges) == expected


def test_train_merges_refuses_a_vocabulary_without_the_bytes():
    with pytest.raises(BPEError, match="at least 256"):
        train_merges(Counter({b"ab": 3}), 255)
