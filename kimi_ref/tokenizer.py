"""Kimi's tokenizer: the tiktoken.model rank file, Kimi's pre-tokenization regex, special tokens, long inputs.

Place in the model: text -> ids [T] -> ``embed_tokens.weight[ids]`` -> [T, d]; the lm_head scores the
same n_vocab ids. For the real checkpoint n_vocab = 163840 = 163584 BPE ranks + 256 special slots.

The pipeline (what :meth:`Tokenizer.encode` does, in order)::

    text ──(1) 400,000-char windows, then cut runs of whitespace / non-whitespace at 25,000 chars
         ──(2) [allow_special only] split at special-token strings; each match becomes its special id
         ──(3) regex pieces:  KIMI_PAT_STR.findall(segment)              "Hello world" -> "Hello", " world"
         ──(4) bytes:         piece.encode("utf-8")                      " world" -> 20 77 6f 72 6c 64
         ──(5) BPE merges:    while some adjacent pair (x, y) has rank(x + y): merge the lowest-ranked,
                                                                          leftmost on ties (kimi_ref.bpe)
         ──> ids = ranks of the final parts

A *rank* is both a token's id and its merge priority: ``rank(x + y)`` small means "merged early in
training". Ranks 0..255 of our own vocabularies are the 256 single bytes, so every string encodes.
Special tokens take the ids ``len(ranks) .. len(ranks) + 255`` (sources §8), named from
``tokenizer_config.json`` or ``<|reserved_token_{id}|>``.

Two backends give the same ids (tests prove it with hypothesis): ``"python"`` — this file, the
readable reference — and ``"tiktoken"`` — a ``tiktoken.Encoding`` built from the same ranks, pattern
and specials (fast, Rust). ``"auto"`` picks tiktoken when it is installed.

**Safety: the one deliberate difference from HF.** HF's ``TikTokenTokenizer.encode`` (Kimi's remote
code) calls tiktoken with ``allowed_special="all"``, so the *text* ``"<|im_end|>"`` inside a user
message becomes the end-of-turn id 163586 and the user can close their own turn and forge an assistant
or system turn. Here ``encode(text)`` keeps such strings as ordinary text (``<``, ``|``, ``im``, ...);
special ids come only from the chat template (which knows where turns start and end) or from an
explicit ``encode(text, allow_special=True)``. Everything else — windows, run cutting, regex, merges,
decoding with ``errors="replace"`` — matches HF's ids exactly (on ``allow_special=True``).

**Unicode versions.** The ``regex`` package (python backend) and tiktoken's Rust ``fancy-regex`` each
ship their own Unicode tables. Over every code point that Python 3.11's Unicode 14 assigns, the two
backends give the same ids (checked exhaustively once; ``tests/test_tokenizer.py`` sweeps a sample);
some code points that only newer Unicode versions assign (e.g. U+1ADF) split differently. HF's
tokenizer runs tiktoken, so the tiktoken backend is the one that matches the real model there.
"""

from __future__ import annotations

import base64
import binascii
import functools
import operator
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping

import numpy as np
import regex

from kimi_ref.bpe import BPEError, bpe_merge, train_merges
from kimi_ref.config_keys import read_json

__all__ = [
    "KIMI_PAT_STR",
    "KIMI_PAT_PIECES",
    "KIMI_SPECIAL_TOKENS",
    "NUM_RESERVED_SPECIAL_TOKENS",
    "TIKTOKEN_MAX_ENCODE_CHARS",
    "MAX_NO_WHITESPACES_CHARS",
    "DEMO_DIR",
    "TokenizerError",
    "Tokenizer",
    "train_bpe",
    "encode",
    "decode",
    "pretokenize",
    "compile_pattern",
    "bpe_merge",
    "split_for_encoding",
    "split_whitespaces_or_nonwhitespaces",
    "load_ranks",
    "save_ranks",
    "special_tokens_layout",
]

DEMO_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"


class TokenizerError(ValueError):
    """A rank file, tokenizer config, special-token table or id list is not what it must be."""


# ----------------------------------------------------------------------------------------------
# 1. The pre-tokenization regex (sources §8), one alternative per line. A piece never crosses a
#    boundary between two matches, so no token ever spans, e.g., a word and the digits after it.
# ----------------------------------------------------------------------------------------------

# `X&&[^\p{Han}]` is class *intersection*: "letters/marks of X, except Han". Python's `re` cannot
# parse it; the `regex` package can, but only with V1 semantics (in V0 `&&` is two literal '&').
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"   # upper/title/modifier/other letters, marks
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"         # lower/modifier/other letters, marks
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"

KIMI_PAT_PIECES: tuple[tuple[str, str], ...] = (
    (r"[\p{Han}]+",
     "a run of Han characters on its own: Chinese never glues to Latin letters or to a leading space"),
    (rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTION}?",
     "an optional leading space/punctuation, then a word ending in lower case ('Hello', ' world', "
     "\"don't\" keeps \"'t\")"),
    (rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTION}?",
     "a word with no lower-case ending ('NASA', \" WE'LL\"); 'HTTPServer' already matched above, "
     "capitals then lower case"),
    (r"\p{N}{1,3}",
     "digits in groups of at most three: '391' is one piece, '12345' is '123' + '45'"),
    (r" ?[^\s\p{L}\p{N}]+[\r\n]*",
     "a punctuation/symbol run with an optional leading space, plus the newlines after it ('});\\n')"),
    (r"\s*[\r\n]+",
     "whitespace ending in newlines (indentation before a blank line, '\\r\\n' pairs)"),
    (r"\s+(?!\S)",
     "whitespace not followed by a non-space: leaves the last space to start the next word"),
    (r"\s+",
     "any remaining whitespace (a run at the very end of the text)"),
)

#: Kimi's pattern, byte-identical to ``tokenization_kimi.py`` (K2-Thinking, K2.5, K2.6).
KIMI_PAT_STR: str = "|".join(piece for piece, _ in KIMI_PAT_PIECES)


@functools.lru_cache(maxsize=16)
def compile_pattern(pat_str: str = KIMI_PAT_STR) -> regex.Pattern:
    """Compile a tiktoken pattern for the Python side: ``regex`` with V1 semantics (for ``&&``)."""
    try:
        return regex.compile(pat_str, flags=regex.V1)
    except regex.error as exc:
        raise TokenizerError(f"pat_str does not compile with the `regex` package (V1): {exc}") from None


def pretokenize(text: str, pat_str: str = KIMI_PAT_STR) -> list[str]:
    """The regex pieces of ``text`` (step 3), e.g. ``['Hello', ',', ' world', '!']``."""
    return compile_pattern(pat_str).findall(text)


# ----------------------------------------------------------------------------------------------
# 2. Long inputs: HF's TikTokenTokenizer.encode first cuts the text (tiktoken's Rust regex once
#    panicked, and is quadratic, on huge inputs). The cuts change the ids, so we make the same cuts.
# ----------------------------------------------------------------------------------------------

TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Cut ``s`` so that no piece holds more than ``max_consecutive_slice_len`` consecutive
    whitespace or non-whitespace characters (HF's ``_split_whitespaces_or_nonwhitespaces``).

    Note "whitespace" is ``str.isspace`` here, not the regex's ``\\s`` (they differ on U+001C..U+001F).
    A run of length L is cut at its start + k * max for every k with start + k * max < start + L.
    """
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if s else False
    slice_start = 0
    for i, char in enumerate(s):
        is_now_space = char.isspace()
        if current_slice_is_space != is_now_space:  # a new run starts here
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def split_for_encoding(text: str, *, fast: bool = False) -> list[str]:
    """Step 1: 400,000-char windows, each cut so that no run exceeds 25,000 characters.

    ``fast=False`` runs the character loop above (the readable mirror of HF); ``fast=True`` finds only
    the over-long runs with numpy (used by the tiktoken backend: the Python loop would cost more than
    tiktoken's whole encode). Tests prove both give the same list.
    """
    out: list[str] = []
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        window = text[start:start + TIKTOKEN_MAX_ENCODE_CHARS]
        if fast:
            out.extend(_cut_long_runs_fast(window, MAX_NO_WHITESPACES_CHARS))
        else:
            out.extend(split_whitespaces_or_nonwhitespaces(window, MAX_NO_WHITESPACES_CHARS))
    return out


@functools.lru_cache(maxsize=1)
def _isspace_table() -> np.ndarray:
    """``table[code point]`` is ``chr(code point).isspace()``, for every code point (built once)."""
    table = np.zeros(0x110000, dtype=bool)
    table[[c for c in range(0x110000) if chr(c).isspace()]] = True
    return table


def _cut_long_runs_fast(window: str, max_len: int) -> list[str]:
    """The cuts of :func:`split_whitespaces_or_nonwhitespaces`, found with numpy: code points ->
    is-space mask -> run starts and lengths -> cut every ``max_len`` from each long run's start.
    (A regex scan costs as much as tiktoken's whole encode; this costs a few percent of it.)"""
    if len(window) <= max_len:
        return [window]
    code_points = np.frombuffer(window.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    is_space = np.take(_isspace_table(), code_points)
    bounds = np.concatenate(([0], np.flatnonzero(is_space[1:] != is_space[:-1]) + 1, [len(window)]))
    lengths = np.diff(bounds)  # run k is window[bounds[k]:bounds[k + 1]]
    if lengths.max() <= max_len:
        return [window]
    cuts = [cut for k in np.flatnonzero(lengths > max_len).tolist()
            for cut in range(int(bounds[k]) + max_len, int(bounds[k + 1]), max_len)]
    pieces = [0, *cuts, len(window)]
    return [window[a:b] for a, b in zip(pieces, pieces[1:])]


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; tiktoken replaces them with U+FFFD (and joins valid
    surrogate pairs), so decode(encode(x)) == x fails only for such strings. We do the same."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ----------------------------------------------------------------------------------------------
# 3. The pure-Python encoder (steps 2-5 for one chunk) and the module-level encode/decode.
# ----------------------------------------------------------------------------------------------

class _PythonEncoder:
    """Steps 2-5 for one chunk, with a cache from piece to ids (text repeats its words a lot)."""

    _CACHE_LIMIT = 200_000

    def __init__(self, ranks: Mapping[bytes, int], pat_str: str, special_tokens: Mapping[str, int]):
        self.ranks = ranks
        self.pattern = compile_pattern(pat_str)
        self.special_tokens = dict(special_tokens)
        # Longest name first, so that of two names starting at the same place the longer wins.
        # (tiktoken's order there is a hash order; Kimi's names are never prefixes of each other.)
        names = sorted(self.special_tokens, key=lambda s: (-len(s), s))
        self.special_pattern = regex.compile("|".join(map(regex.escape, names))) if names else None
        self.cache: dict[str, list[int]] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self.cache
        for piece in self.pattern.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()
                piece_ids = cache[piece] = bpe_merge(piece.encode("utf-8"), self.ranks)
            ids.extend(piece_ids)
        return ids

    def encode(self, text: str, allowed: Collection[str]) -> list[int]:
        text = _fix_surrogates(text)
        if not allowed or self.special_pattern is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        while True:
            # The next special-token string that is allowed (others stay text), as tiktoken does.
            search_from, match = start, None
            while (found := self.special_pattern.search(text, search_from)) is not None:
                if found.group() in allowed:
                    match = found
                    break
                search_from = found.start() + 1
            ids.extend(self.encode_ordinary(text[start:match.start() if match else len(text)]))
            if match is None:
                return ids
            ids.append(self.special_tokens[match.group()])
            start = match.end()


def encode(text: str, ranks: Mapping[bytes, int], *, pat_str: str = KIMI_PAT_STR,
           special_tokens: Mapping[str, int] | None = None,
           allow_special: bool | Collection[str] = False) -> list[int]:
    """Pure-Python encode (steps 1-5). Slow to set up per call: use :class:`Tokenizer` for many calls."""
    specials = dict(special_tokens or {})
    encoder = _PythonEncoder(ranks, pat_str, specials)
    allowed = _allowed_set(allow_special, specials)
    try:
        return [i for chunk in split_for_encoding(text) for i in encoder.encode(chunk, allowed)]
    except BPEError as e:  # ranks without every byte (a Tokenizer refuses those when it is made)
        raise TokenizerError(str(e)) from None


def decode(ids: Iterable[int], ranks: Mapping[bytes, int],
           special_tokens: Mapping[str, int] | None = None) -> str:
    """Join the tokens' bytes and decode UTF-8 with ``errors="replace"`` (like tiktoken)."""
    return _IdTable(ranks, special_tokens or {}).bytes(ids).decode("utf-8", errors="replace")


class _IdTable:
    """id -> bytes for ranks and specials, with the checks every decode needs."""

    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int]):
        self.table: list[bytes | None] = [None] * (1 + max([*ranks.values(), *special_tokens.values()], default=-1))
        for token, rank in ranks.items():
            self.table[rank] = token
        for name, token_id in special_tokens.items():
            self.table[token_id] = name.encode("utf-8")
        self.gaps = frozenset(i for i, token in enumerate(self.table) if token is None)

    def check(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of ints, or an error naming the first id that has no token."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TokenizerError(f"token ids must be integers, got {ids!r}") from None
        n = len(self.table)
        if ids and (min(ids) < 0 or max(ids) >= n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} is out of range: this vocabulary has ids 0..{n - 1}")
        if self.gaps and not self.gaps.isdisjoint(ids):
            bad = next(i for i in ids if i in self.gaps)
            raise TokenizerError(f"token id {bad} is not assigned in this vocabulary (a gap between ranks and specials)")
        return ids

    def bytes(self, ids: Iterable[int]) -> bytes:
        table = self.table
        return b"".join([table[i] for i in self.check(ids)])  # type: ignore[misc]


def _allowed_set(allow_special: bool | Collection[str], special_tokens: Mapping[str, int]) -> frozenset[str]:
    if allow_special is True:
        return frozenset(special_tokens)
    if allow_special is False:
        return frozenset()
    if isinstance(allow_special, str):
        raise TokenizerError("allow_special takes True/False or a collection of names, not one string")
    unknown = set(allow_special) - set(special_tokens)
    if unknown:
        raise TokenizerError(f"allow_special names {sorted(unknown)} that are not special tokens of this vocabulary")
    return frozenset(allow_special)


# ----------------------------------------------------------------------------------------------
# 4. Training: cut the text into counted pieces; kimi_ref.bpe learns the merges.
# ----------------------------------------------------------------------------------------------

def train_bpe(text: str, vocab_size: int, pat_str: str = KIMI_PAT_STR, *, split_digits: bool = False) -> dict[bytes, int]:
    """Learn ``vocab_size`` ranks from ``text`` (the 256 bytes, then one token per merge).

    Pairs never cross regex pieces, so the text is first cut exactly as :func:`encode` cuts it and
    counted as *unique* pieces with their counts; :func:`kimi_ref.bpe.train_merges` learns the merges
    from those counts. Special-token strings in ``text`` are plain text here.

    ``split_digits=True`` learns no merge inside a number: pieces made only of numeric characters
    (Unicode category N, what ``\\p{N}`` matches) are not counted, so every digit stays its own token
    (sentencepiece calls this ``split_digits``). The demo vocabulary is trained so, and kimi-nano
    copies numbers digit by digit (chapter 13 measures what that changes, and what it does not).
    Kimi's real vocabulary does merge digits; the pre-tokenizer cuts numbers into runs of at most
    three either way.
    """
    if vocab_size < 256:
        raise TokenizerError(f"vocab_size must be at least 256 (one rank per byte), got {vocab_size}")
    pattern = compile_pattern(pat_str)
    piece_counts: Counter[bytes] = Counter()
    for chunk in split_for_encoding(_fix_surrogates(text)):
        piece_counts.update(piece.encode("utf-8") for piece in pattern.findall(chunk)
                            if not (split_digits and _is_number(piece)))
    try:
        return train_merges(piece_counts, vocab_size)
    except BPEError as e:
        raise TokenizerError(str(e)) from None


def _is_number(piece: str) -> bool:
    return all(unicodedata.category(ch).startswith("N") for ch in piece)


# ----------------------------------------------------------------------------------------------
# 5. The tiktoken.model rank file: one "base64(token bytes) rank" per line.
# ----------------------------------------------------------------------------------------------

def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``tiktoken.model`` file strictly: every error names the file and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read the rank file {path}: {exc}") from None
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):  # splitlines, like tiktoken's loader
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        fields = line.decode("utf-8", "backslashreplace").split()  # str, so messages quote text, not b'...'
        if len(fields) != 2:
            raise TokenizerError(f"{where}: expected 'BASE64 RANK', found {len(fields)} fields: {line[:80]!r}")
        b64, rank_text = fields
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: {b64[:60]!r} is not valid base64") from None
        if not token:
            raise TokenizerError(f"{where}: the token is empty")
        try:
            rank = int(rank_text)
        except ValueError:
            raise TokenizerError(f"{where}: the rank {rank_text[:40]!r} is not an integer") from None
        if rank < 0:
            raise TokenizerError(f"{where}: the rank {rank} is negative")
        if token in ranks:
            first = line_of_rank[ranks[token]]
            raise TokenizerError(f"{where}: duplicate token {token!r} (already on line {first})")
        if rank in line_of_rank:
            raise TokenizerError(f"{where}: duplicate rank {rank} (already on line {line_of_rank[rank]})")
        ranks[token] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: the rank file holds no ranks")
    if len(ranks) != max(line_of_rank) + 1:
        missing = next(r for r in range(len(ranks)) if r not in line_of_rank)
        above = min(r for r in line_of_rank if r > missing)
        raise TokenizerError(f"{path}: rank {missing} is missing (ranks must be 0..N-1 without gaps; "
                             f"line {line_of_rank[above]} has rank {above}, the next one present)")
    return ranks


def save_ranks(ranks: Mapping[bytes, int], path: str | Path) -> None:
    """Write ranks in the ``tiktoken.model`` format, in rank order, '\\n' line ends."""
    ranks = _checked_ranks(ranks, "ranks")
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    Path(path).write_text("".join(lines), encoding="ascii", newline="\n")


def _checked_ranks(ranks: Mapping[bytes, int], what: str) -> dict[bytes, int]:
    ranks = dict(ranks)
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        raise TokenizerError(f"{what}: ranks must be exactly 0..{len(values) - 1}, each once")
    if any(not isinstance(token, bytes) or not token for token in ranks):
        raise TokenizerError(f"{what}: every token must be non-empty bytes")
    return ranks


# ----------------------------------------------------------------------------------------------
# 6. Special tokens: 256 slots after the ranks (sources §8). Offsets are from len(ranks).
# ----------------------------------------------------------------------------------------------

NUM_RESERVED_SPECIAL_TOKENS = 256

# The strings, named once: the chat template, the tool-call parser and MoonViT's splice import these.
BOS, EOS, EOT, UNK, PAD = "[BOS]", "[EOS]", "[EOT]", "[UNK]", "[PAD]"
IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE = "<|im_middle|>"            # between a turn's role name and its content
IM_END = "<|im_end|>"                  # end of every turn; the stop token
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_END = "<|media_begin|>", "<|media_content|>", "<|media_end|>"
MEDIA_PAD = "<|media_pad|>"            # replaced by vision embeddings (media_placeholder_token_id)

#: offset from ``len(ranks)`` -> (name, HF ``special`` flag). The flag only says whether HF's
#: ``decode(skip_special_tokens=True)`` drops it: tool-call and think markers are kept.
KIMI_SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    0: (BOS, True), 1: (EOS, True), 2: (IM_END, True), 3: (IM_USER, True), 4: (IM_ASSISTANT, True),
    6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
    9: (EOT, True), 10: (IM_SYSTEM, True),
    11: (SECTION_BEGIN, False), 12: (SECTION_END, False),
    13: (CALL_BEGIN, False), 14: (CALL_ARGUMENT_BEGIN, False), 15: (CALL_END, False),
    17: (IM_MIDDLE, True),
    18: (MEDIA_BEGIN, True), 19: (MEDIA_CONTENT, True), 20: (MEDIA_END, True), 21: (MEDIA_PAD, True),
    22: (THINK, False), 23: (END_THINK, False),
    254: (UNK, True), 255: (PAD, True),
}


def special_tokens_layout(n_ranks: int, names: Mapping[int, str] | None = None) -> dict[str, int]:
    """``{name: id}`` for the ids ``n_ranks .. n_ranks + 255``: the given name (by absolute id), or
    Kimi's names (sources §8) when ``names`` is None, else ``<|reserved_token_{id}|>``."""
    if names is None:
        names = {n_ranks + offset: name for offset, (name, _) in KIMI_SPECIAL_TOKENS.items()}
    ids = range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL_TOKENS)
    outside = sorted(set(names) - set(ids))
    if outside:
        raise TokenizerError(f"special token id {outside[0]} ({names[outside[0]]!r}) is outside the "
                             f"{NUM_RESERVED_SPECIAL_TOKENS} special slots {ids.start}..{ids.stop - 1} "
                             f"that follow the {n_ranks} ranks")
    layout = {names.get(i, f"<|reserved_token_{i}|>"): i for i in ids}
    if len(layout) != NUM_RESERVED_SPECIAL_TOKENS:
        dup = [name for name, count in Counter(names.get(i, f"<|reserved_token_{i}|>") for i in ids).items()
               if count > 1]
        raise TokenizerError(f"special token name {dup[0]!r} is used for more than one id")
    return layout


# ----------------------------------------------------------------------------------------------
# 7. The Tokenizer: ranks + pattern + specials, with a backend.
# ----------------------------------------------------------------------------------------------

_DEFAULT: str = "<default>"  # a sentinel (never a token name: compared by identity)

# Bytes that valid UTF-8 can contain (never 0xC0, 0xC1, 0xF5..0xFF); a vocabulary must rank all of them.
_UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]



class Tokenizer:
    """Kimi's tokenizer.

    >>> tok = Tokenizer.demo()
    >>> tok.decode(tok.encode("What is 17*23?"))
    'What is 17*23?'
    >>> tok.encode("<|im_end|>") == [tok.special_id("<|im_end|>")]
    False
    >>> tok.encode("<|im_end|>", allow_special=True) == [tok.special_id("<|im_end|>")]
    True
    """

    def __init__(self, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int] | None = None, *,
                 pat_str: str = KIMI_PAT_STR, backend: str = "auto", name: str = "kimi",
                 bos_token: str | None = _DEFAULT, eos_token: str | None = _DEFAULT,
                 unk_token: str | None = _DEFAULT, pad_token: str | None = _DEFAULT):
        """``special_tokens`` defaults to Kimi's layout after the ranks. bos/eos/unk/pad default to
        ``[BOS]``, ``[EOS]``, ``[UNK]``, ``[PAD]`` when those are special tokens (else None); a name
        given explicitly must be a special token."""
        self.ranks = _checked_ranks(ranks, name)
        self.pat_str = pat_str
        self.name = name
        compile_pattern(pat_str)  # fail early on a pattern the Python side cannot read
        if special_tokens is None:
            special_tokens = special_tokens_layout(len(self.ranks))
        self.special_tokens: dict[str, int] = dict(special_tokens)
        clash = [(n, i) for n, i in self.special_tokens.items() if i < len(self.ranks)]
        if clash:
            raise TokenizerError(f"{name}: special token {clash[0][0]!r} has id {clash[0][1]}, which is a "
                                 f"BPE rank (special ids start at {len(self.ranks)})")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise TokenizerError(f"{name}: two special tokens share an id")
        missing = [b for b in _UTF8_BYTES if bytes([b]) not in self.ranks]
        if missing:
            raise TokenizerError(f"{name}: byte 0x{missing[0]:02x} has no rank; UTF-8 text can contain it, "
                                 "so a byte-level BPE must have it")
        self._ids = _IdTable(self.ranks, self.special_tokens)
        self.n_vocab: int = len(self._ids.table)
        self._id_to_special = {i: n for n, i in self.special_tokens.items()}
        for attr, token, default in (("bos", bos_token, "[BOS]"), ("eos", eos_token, "[EOS]"),
                                     ("unk", unk_token, "[UNK]"), ("pad", pad_token, "[PAD]")):
            if token is _DEFAULT:
                token = default if default in self.special_tokens else None
            elif token is not None and token not in self.special_tokens:
                raise TokenizerError(f"{name}: {attr}_token {token!r} is not one of the special tokens")
            setattr(self, f"{attr}_token", token)
            setattr(self, f"{attr}_id", None if token is None else self.special_tokens[token])
        self._python = _PythonEncoder(self.ranks, pat_str, self.special_tokens)
        self._tiktoken = None
        self.backend = self._pick_backend(backend)

    # ---- construction ----

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> Tokenizer:
        """A ``tiktoken.model`` rank file; Kimi's special names laid out from ``len(ranks)``."""
        return cls(load_ranks(path), name=Path(path).name, **kwargs)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, **kwargs) -> Tokenizer:
        """A checkpoint directory: ``tiktoken.model`` + ``tokenizer_config.json`` (its
        ``added_tokens_decoder`` names the special slots; bos/eos/unk/pad name those tokens).
        For Kimi's real files this gives 163584 ranks and n_vocab 163840."""
        ckpt_dir = Path(ckpt_dir)
        config_path = ckpt_dir / "tokenizer_config.json"
        ranks = load_ranks(ckpt_dir / "tiktoken.model")
        config = read_json(config_path, TokenizerError)
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
        names: dict[int, str] = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not key.isdigit() or not isinstance(content, str) or not content:
                raise TokenizerError(f"{config_path}: added_tokens_decoder[{key!r}] must map an integer id to "
                                     f"{{'content': name, ...}}, found {entry!r}")
            names[int(key)] = content
        try:
            special = special_tokens_layout(len(ranks), names)
        except TokenizerError as exc:
            raise TokenizerError(f"{config_path}: {exc}") from None
        roles = {}
        for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if attr in config:  # a missing key keeps the default ([BOS] etc., as HF's class does)
                value = config[attr]
                roles[attr] = value.get("content") if isinstance(value, dict) else value
        kwargs = {**roles, "name": str(ckpt_dir), **kwargs}
        try:
            return cls(ranks, special, **kwargs)
        except TokenizerError as exc:
            raise TokenizerError(f"{config_path}: {exc}") from None

    @classmethod
    def demo(cls, backend: str = "auto") -> Tokenizer:
        """The shipped demo vocabulary (3840 ranks + 256 special slots = 4096 ids), built by
        ``python -m weights_tools.make_demo_vocab``; used by the tiny checkpoints and the chapters."""
        return _demo(backend)

    def _pick_backend(self, backend: str) -> str:
        if backend not in ("auto", "python", "tiktoken"):
            raise TokenizerError(f"backend must be 'auto', 'python' or 'tiktoken', got {backend!r}")
        if backend == "python":
            return "python"
        try:
            import tiktoken
        except ImportError:
            if backend == "tiktoken":
                raise ImportError("backend='tiktoken' needs the tiktoken package (pip install tiktoken)") from None
            return "python"
        self._tiktoken = tiktoken.Encoding(name=self.name, pat_str=self.pat_str, mergeable_ranks=self.ranks,
                                           special_tokens=self.special_tokens)
        return "tiktoken"

    # ---- encode / decode ----

    def encode(self, text: str, allow_special: bool | Collection[str] = False) -> list[int]:
        """Text -> ids. Special-token strings stay text unless ``allow_special`` is True (all of them)
        or a collection of the names allowed. No BOS is added (Kimi adds none)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        allowed = _allowed_set(allow_special, self.special_tokens)
        if self._tiktoken is None:
            return [i for chunk in split_for_encoding(text) for i in self._python.encode(chunk, allowed)]
        enc = self._tiktoken
        ids: list[int] = []
        for chunk in split_for_encoding(text, fast=True):
            if allowed:
                ids.extend(enc.encode(chunk, allowed_special=allowed, disallowed_special=()))
            else:
                ids.extend(enc.encode_ordinary(chunk))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids`` (a token may hold part of a UTF-8 character)."""
        if self._tiktoken is not None:
            return self._tiktoken.decode_bytes(self._ids.check(ids))
        return self._ids.bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 on their own become U+FFFD (``errors="replace"``,
        as tiktoken and HF do); use :meth:`decode_bytes` for the exact bytes. Special and reserved
        ids decode to their names."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- lookups ----

    def special_id(self, name: str) -> int:
        """The id of a special token, e.g. ``special_id("<|im_end|>")`` (163586 for the real vocabulary)."""
        try:
            return self.special_tokens[name]
        except KeyError:
            known = [n for n in self.special_tokens if not n.startswith("<|reserved_token_")]
            raise TokenizerError(f"{name!r} is not a special token of {self.name}; named ones are {known}") from None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's name as UTF-8)."""
        return self._ids.bytes([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, {len(self.ranks)} ranks + {len(self.special_tokens)} specials "
                f"= n_vocab {self.n_vocab}, backend={self.backend!r})")


@functools.lru_cache(maxsize=4)
def _demo(backend: str) -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_DIR, backend=backend)
