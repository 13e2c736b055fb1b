"""Tokenizer speed: encode MB/s (pure Python, our tiktoken path, raw tiktoken) and BPE training time.

    python benchmarks/bench_tokenizer.py [--mb 1.0] [--repeat 7]

Corpus: ``weights_tools.make_demo_vocab.build_corpus`` (English, arithmetic, tool calls, code,
Chinese/Japanese, emoji, CRLF) with several seeds, cut to ``--mb`` megabytes of UTF-8. Vocabulary:
the shipped demo one (3840 ranks). Targets (issue 3): our fast path >= 0.9x raw tiktoken; the pure
path within 30x of it. "cold" builds a fresh Tokenizer (empty piece cache) for each run; "warm"
encodes the same text twice with one Tokenizer and times the second pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import tiktoken

from kimi_ref.tokenizer import KIMI_PAT_STR, Tokenizer, train_bpe
from weights_tools.make_demo_vocab import build_corpus


def corpus_of(mb: float) -> str:
    text, seed = "", 1
    while len(text.encode()) < mb * 1e6:
        text += build_corpus(seed)
        seed += 1
    data = text.encode()[: int(mb * 1e6)]
    return data.decode("utf-8", errors="ignore")


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    text = corpus_of(args.mb)
    mb = len(text.encode()) / 1e6
    demo = Tokenizer.demo("tiktoken")
    raw = tiktoken.Encoding("raw", pat_str=KIMI_PAT_STR, mergeable_ranks=demo.ranks,
                            special_tokens=demo.special_tokens)
    ours = Tokenizer.from_pretrained(demo.name, backend="tiktoken")
    n_ids = len(raw.encode_ordinary(text))
    assert ours.encode(text) == Tokenizer.from_pretrained(demo.name, backend="python").encode(text)

    rows = []
    t_raw = best_of(lambda: raw.encode_ordinary(text), args.repeat)
    rows.append(("raw tiktoken (encode_ordinary)", t_raw))
    rows.append(("kimi_ref tiktoken path", best_of(lambda: ours.encode(text), args.repeat)))
    rows.append(("kimi_ref tiktoken path, allow_special", best_of(lambda: ours.encode(text, allow_special=True),
                                                                 args.repeat)))
    rows.append(("kimi_ref pure Python, cold cache",
                 best_of(lambda: Tokenizer.from_pretrained(demo.name, backend="python").encode(text), 1)))
    warm = Tokenizer.from_pretrained(demo.name, backend="python")
    warm.encode(text)
    rows.append(("kimi_ref pure Python, warm cache", best_of(lambda: warm.encode(text), 1)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, python {platform.python_version()}, "
          f"tiktoken {tiktoken.__version__}")
    print(f"corpus: {mb:.2f} MB, {len(text):,} chars, {n_ids:,} ids with the demo vocabulary "
          f"({len(text.encode()) / n_ids:.2f} bytes/token)\n")
    print(f"| {'encode path':40s} | {'seconds':>8s} | {'MB/s':>7s} | {'vs raw':>7s} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for name, seconds in rows:
        print(f"| {name:40s} | {seconds:8.3f} | {mb / seconds:7.2f} | {seconds / t_raw:6.2f}x |")

    print(f"\n| {'train_bpe':40s} | {'seconds':>8s} |")
    print(f"|{'-' * 42}|{'-' * 10}|")
    demo_corpus = build_corpus()
    for vocab, corpus, label in ((3840, demo_corpus, f"demo corpus ({len(demo_corpus.encode()) / 1e6:.2f} MB)"),
                                 (4096, text, f"bench corpus ({mb:.2f} MB)")):
        seconds = best_of(lambda: train_bpe(corpus, vocab), 1)
        print(f"| {f'{vocab} ranks, {label}':40s} | {seconds:8.2f} |")


if __name__ == "__main__":
    main()
