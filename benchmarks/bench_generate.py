"""Generation speed of the tiny checkpoint: decode tokens/s and prefill time, at TP 1, 2 and 4 on the CPU.

    python benchmarks/bench_generate.py                          # TP 1, 2, 4; prompts 16..1024; fp32
    python benchmarks/bench_generate.py --tp 1 2 --lengths 32 512 --new-tokens 64 --dtype bfloat16
    python benchmarks/bench_generate.py --ckpt DIR --device cuda --tp 1 2 4 8

One launch of max(--tp) ranks (gloo on CPU, NCCL on CUDA) runs every TP size as a sub-group of ranks
0..n-1, so the process start-up is paid once. Decode is greedy, ``--new-tokens`` steps after a
16-token prompt (median step time → tokens/s); prefill is the best of 3 runs of one forward over a
prompt of each length, into a fresh cache. On a CPU with few cores, TP > 1 is *slower* for a model this
small: every layer adds two all-reduces of a [1, d] vector and the ranks share the same cores. The
point of TP here is that the numbers do not change (tests/test_parallel.py), not speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch


def _bench_rank(tp, device: str, ckpt: str, sizes: list[int], lengths: list[int], new_tokens: int, dtype: str):
    import kimi_ref
    from kimi_ref.generate import generate
    from kimi_ref.launch import sub_tp

    rows = []
    for n in sizes:
        sub = sub_tp(tp, n)
        if sub is None:
            continue
        model = kimi_ref.load_model(ckpt, device=device, dtype=getattr(torch, dtype), tp=sub, progress=False)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 3000, (16,), generator=gen).tolist()
        generate(model, prompt, max_new_tokens=4, temperature=0)  # warm-up
        result = generate(model, prompt, max_new_tokens=new_tokens, temperature=0)
        decode = 1.0 / statistics.median(result.step_seconds)
        prefill = {}
        for length in lengths:
            ids = torch.randint(0, 3000, (1, length), generator=gen, device=device)
            best = float("inf")
            for _ in range(3):
                cache = model.new_cache(1, length)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.inference_mode():
                    model(ids, cache)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            prefill[length] = best
        rows.append((n, decode, prefill))
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="checkpoint directory (default: the tiny checkpoint)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from kimi_ref.chat import default_checkpoint
    from kimi_ref.launch import launch

    ckpt = args.ckpt or str(default_checkpoint())
    sizes = sorted(set(args.tp))
    rows = launch(_bench_rank, max(sizes), args.device, ckpt, sizes, args.lengths, args.new_tokens, args.dtype)
    threads = os.environ.get("OMP_NUM_THREADS", f"{max(1, (os.cpu_count() or 1) // max(sizes))} (cores / ranks)")
    print(f"# bench_generate: {ckpt}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, {args.dtype}, threads per rank {threads}")
    head = "| TP | decode tok/s | " + " | ".join(f"prefill {n} tok (ms)" for n in args.lengths) + " |"
    print(head)
    print("|" + "---|" * (2 + len(args.lengths)))
    for n, decode, prefill in rows:
        print(f"| {n} | {decode:.1f} | " + " | ".join(f"{prefill[length] * 1e3:.1f}" for length in args.lengths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
