"""One MLA layer, naive vs absorbed: prefill and decode speed, and KV-cache bytes per token.

    python benchmarks/bench_text_model.py                       # tiny and real K2.5 dims, fp32, CPU
    python benchmarks/bench_text_model.py --dtype bfloat16 --prefill 256 --context 2048 --device cuda
    python benchmarks/bench_text_model.py --tp 8                # one rank's share of the heads (64/8)

"real" is one layer at the shipped K2.5 config's sizes (d 7168, 64 heads, q_lora 1536, kv_lora 512,
nope 128, rope 64, v 128; the same as K2.7-Code), random weights. Decode is timed as one new token per
step against a cache prefilled to ``--context`` tokens. Cache bytes are per token per layer in the
model dtype; "x61" multiplies by the real layer count.
"""

from __future__ import annotations

import argparse
import time

import torch

from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.mla import MLA
from kimi_ref.parallel import TP


def build(config, mode: str, dtype: torch.dtype, device: str, tp: TP) -> MLA:
    torch.manual_seed(0)
    module = MLA(config, mode=mode, dtype=dtype, device=device, tp=tp)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return module


def timed(fn, repeat: int, device: str) -> float:
    """Best wall time of ``repeat`` runs, seconds."""
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure(config, mode: str, args, tp: TP) -> dict:
    dtype = getattr(torch, args.dtype)
    module = build(config, mode, dtype, args.device, tp)
    d = config.hidden_size
    x = torch.randn(args.batch, args.prefill, d, dtype=dtype, device=args.device)
    prefill_s = timed(lambda: module(x), args.repeat, args.device)

    cache = module.new_cache(args.batch, args.context + args.steps)
    filled = torch.randn(args.batch, args.context, d, dtype=dtype, device=args.device)
    for chunk in filled.split(args.prefill, dim=1):  # fill the cache in prefill-sized pieces
        module(chunk, cache=cache)
    step = torch.randn(args.batch, 1, d, dtype=dtype, device=args.device)

    def decode() -> None:
        cache.length = args.context  # rewind, so every repeat decodes the same positions
        for _ in range(args.steps):
            module(step, cache=cache)

    decode_s = timed(decode, args.repeat, args.device) / args.steps
    return {"prefill tok/s": args.batch * args.prefill / prefill_s, "decode ms/step": 1e3 * decode_s,
            "cache B/token": cache.bytes_per_token()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=64, help="prefill length (tokens)")
    parser.add_argument("--context", type=int, default=256, help="cached tokens before each decode step")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per timing")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="time one rank's share of the heads (rank 0 of N)")
    parser.add_argument("--only", choices=["tiny", "real"], default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    real = load_config(fixture_path("kimi_k25"))
    configs = {"tiny": tiny_config(real, vision=False), "real": real}
    if args.only:
        configs = {args.only: configs[args.only]}
    tp = TP(0, args.tp)

    print(f"one MLA layer, {args.dtype} on {args.device}, batch {args.batch}, prefill {args.prefill} tokens, "
          f"decode at context {args.context}, tp {args.tp} (rank 0), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = f"| {'dims':5} | {'mode':8} | {'prefill tok/s':>13} | {'decode ms/step':>14} | {'cache B/token/layer':>19} | {'x61 layers':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, config in configs.items():
        rows = {mode: measure(config, mode, args, tp) for mode in ("naive", "absorbed")}
        for mode, r in rows.items():
            print(f"| {name:5} | {mode:8} | {r['prefill tok/s']:13,.0f} | {r['decode ms/step']:14.3f} | "
                  f"{r['cache B/token']:19,d} | {r['cache B/token'] * real.num_hidden_layers:10,d} |")
        ratio = rows["naive"]["cache B/token"] / rows["absorbed"]["cache B/token"]
        print(f"| {name:5} | {'ratio':8} | {'':13} | {rows['naive']['decode ms/step'] / rows['absorbed']['decode ms/step']:13.2f}x"
              f" | {ratio:18.1f}x | {'':10} |")


if __name__ == "__main__":
    main()
