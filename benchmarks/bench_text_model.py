"""Text-model speed: one MLA layer naive vs absorbed, and the whole model against HF DeepseekV3.

    python benchmarks/bench_text_model.py                       # both tables, fp32, CPU, 1 thread
    python benchmarks/bench_text_model.py --table model --threads 2
    python benchmarks/bench_text_model.py --table layer --dtype bfloat16 --prefill 256 --context 2048 --device cuda
    python benchmarks/bench_text_model.py --table layer --tp 8  # one rank's share of the heads (64/8)

**Layer table.** "real" is one layer at the shipped K2.5 config's sizes (d 7168, 64 heads, q_lora 1536,
kv_lora 512, nope 128, rope 64, v 128; the same as K2.7-Code), random weights. Decode is timed as one
new token per step against a cache prefilled to ``--context`` tokens. Cache bytes are per token per
layer in the model dtype; "x61" multiplies by the real layer count.

**Model table** (issue 2's target: kimi_ref decode >= 2x HF on CPU). kimi_ref's ``KimiForCausalLM``
(absorbed MLA, its preallocated ``KVCache``) and transformers' ``DeepseekV3ForCausalLM`` (its defaults,
``use_cache=True`` with a ``DynamicCache``) hold the same random weights, loaded into HF with the
mapping ``tests/test_hf_peer.py`` proves logit-exact (``weights_tools.hf_peer.hf_twin``). Routed experts are dense
fp32 ``nn.Linear`` on both sides (``config.replace(quantization=None)``) so both run the same math.
Configs: "tiny" = ``tiny_config`` of the kimi_k25 fixture (vocab 4096); "medium" = d 1024, 4 layers,
8 heads with K2.5's head dims, 64 experts top-8, every K2.5 behaviour flag kept. Prefill is one
forward over ``--prompt`` tokens into an empty cache; decode is ``--decode`` single-token steps after
it (fixed random ids, the same for both). fp32, ``torch.inference_mode``, one warm-up, best of
``--model-repeat``. Cache bytes per token are measured from the caches themselves after prefill.
"""

from __future__ import annotations

import argparse
import time

import torch

from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.mla import MLA
from kimi_ref.parallel import TP
from weights_tools.hf_peer import hf_twin
from weights_tools.make_tiny import random_model


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


# ---- whole model: kimi_ref vs HF DeepseekV3 -----------------------------------------------------------

def model_configs(real) -> dict:
    """The two CPU configs of the model table, both with dense (non-quantized) routed experts."""
    tiny = tiny_config(real, vocab_size=4096, vision=False)
    medium = tiny_config(real, vocab_size=4096, vision=False, hidden_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, intermediate_size=2816, moe_intermediate_size=256,
                         n_routed_experts=64, num_experts_per_tok=8)
    # Dense experts on both sides: HF has no INT4 path, so the comparison is the same fp32 math.
    return {"tiny": tiny.replace(quantization=None), "medium": medium.replace(quantization=None)}


def best_of(fn, repeat: int) -> float:
    """One untimed warm-up, then the best wall time of ``repeat`` runs, seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hf_cache_bytes_per_token(cache, tokens: int) -> int:
    """Bytes HF's cache holds per token of one sequence, summed over layers (whatever it chose to keep)."""
    total = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                for layer in cache.layers)
    return total // tokens


@torch.inference_mode()
def measure_model(name: str, config, args) -> dict:
    from transformers import DynamicCache

    t0 = time.perf_counter()
    ours = random_model(config, seed=0)  # random weights, norms away from 1, non-zero router bias
    theirs = hf_twin(ours, dtype=torch.float32)  # raises unless every tensor is mapped
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=g)
    steps = torch.randint(0, config.vocab_size, (1, args.decode), generator=g)
    max_len = args.prompt + args.decode

    # Same weights, same logits (the peer test's claim, re-checked on these configs).
    cache = ours.new_cache(1, max_len)
    diff = (ours(prompt, cache)[:, -1] - theirs(prompt, use_cache=False).logits[:, -1]).abs().max().item()

    def ours_prefill() -> None:
        ours(prompt, ours.new_cache(1, max_len))

    def ours_decode() -> None:
        cache.length = args.prompt  # rewind to the prompt, so every repeat decodes the same positions
        for i in range(args.decode):
            ours(steps[:, i: i + 1], cache)

    hf_cache = DynamicCache(config=theirs.config)
    theirs(prompt, past_key_values=hf_cache, use_cache=True)
    hf_bytes = hf_cache_bytes_per_token(hf_cache, args.prompt)

    def hf_prefill() -> None:
        theirs(prompt, past_key_values=DynamicCache(config=theirs.config), use_cache=True)

    def hf_decode() -> None:
        extra = hf_cache.get_seq_length() - args.prompt
        if extra:
            hf_cache.crop(-extra)  # rewind to the prompt (transformers 5 wants the number of tokens to drop, negated)
        for i in range(args.decode):
            theirs(steps[:, i: i + 1], past_key_values=hf_cache, use_cache=True)

    rows = {}
    for who, prefill, decode, cache_bytes in (("kimi_ref", ours_prefill, ours_decode, cache.bytes_per_token()),
                                              ("HF", hf_prefill, hf_decode, hf_bytes)):
        prefill_s = best_of(prefill, args.model_repeat)
        decode_s = best_of(decode, args.model_repeat)
        rows[who] = {"prefill tok/s": args.prompt / prefill_s, "decode tok/s": args.decode / decode_s,
                     "cache B/token": cache_bytes}
    impl = (f"HF attention {theirs.config._attn_implementation!r}, "
            f"experts {getattr(theirs.config, '_experts_implementation', None)!r}")
    return {"rows": rows, "diff": diff, "build_s": build_s, "impl": impl,
            "params": sum(p.numel() for p in ours.parameters())}


def model_table(args, real) -> None:
    import transformers

    configs = model_configs(real)
    if args.only_model:
        configs = {args.only_model: configs[args.only_model]}
    print(f"\nWhole model, kimi_ref KimiForCausalLM (absorbed MLA, KVCache) vs HF transformers {transformers.__version__} "
          f"DeepseekV3ForCausalLM (DynamicCache), same weights, routed experts dense fp32 on both sides "
          f"(config.replace(quantization=None)); fp32, batch 1, prompt {args.prompt}, decode {args.decode} tokens, "
          f"torch.inference_mode, 1 warm-up + best of {args.model_repeat}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    header = (f"| {'config':6} | {'params':>6} | {'impl':8} | {'prefill tok/s':>13} | {'decode tok/s':>12} | "
              f"{'cache B/token':>13} | {'decode kimi_ref/HF':>18} | {'cache HF/kimi_ref':>17} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    notes = []
    for name, config in configs.items():
        m = measure_model(name, config, args)
        r = m["rows"]
        speed = r["kimi_ref"]["decode tok/s"] / r["HF"]["decode tok/s"]
        cache = r["HF"]["cache B/token"] / r["kimi_ref"]["cache B/token"]
        for i, who in enumerate(("kimi_ref", "HF")):
            extra = (f"{speed:17.2f}x | {cache:16.2f}x") if i == 0 else f"{'':18} | {'':17}"
            print(f"| {name:6} | {m['params'] / 1e6:5.1f}M | {who:8} | {r[who]['prefill tok/s']:13,.0f} | "
                  f"{r[who]['decode tok/s']:12,.1f} | {r[who]['cache B/token']:13,d} | {extra} |")
        notes.append(f"{name}: max |logit diff| kimi_ref vs HF at the prompt's last token {m['diff']:.1e}; "
                     f"{m['impl']}; build {m['build_s']:.1f} s")
    print()
    for note in notes:
        print(f"- {note}")


def layer_table(args, real) -> None:
    configs = {"tiny": tiny_config(real, vision=False), "real": real}
    if args.only:
        configs = {args.only: configs[args.only]}
    tp = TP(0, args.tp)

    print(f"One MLA layer, {args.dtype} on {args.device}, batch {args.batch}, prefill {args.prefill} tokens, "
          f"decode at context {args.context}, tp {args.tp} (rank 0), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=["layer", "model", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    layer = parser.add_argument_group("layer table")
    layer.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    layer.add_argument("--device", default="cpu")
    layer.add_argument("--batch", type=int, default=1)
    layer.add_argument("--prefill", type=int, default=64, help="prefill length (tokens)")
    layer.add_argument("--context", type=int, default=256, help="cached tokens before each decode step")
    layer.add_argument("--steps", type=int, default=4, help="decode steps per timing")
    layer.add_argument("--repeat", type=int, default=2)
    layer.add_argument("--tp", type=int, default=1, help="time one rank's share of the heads (rank 0 of N)")
    layer.add_argument("--only", choices=["tiny", "real"], default=None)
    model = parser.add_argument_group("model table (CPU, fp32)")
    model.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    model.add_argument("--decode", type=int, default=32, help="decode steps after the prompt")
    model.add_argument("--model-repeat", type=int, default=3, help="best of N (after one warm-up)")
    model.add_argument("--only-model", choices=["tiny", "medium"], default=None)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, found {args.threads}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    real = load_config(fixture_path("kimi_k25"))
    if args.table in ("layer", "both"):
        layer_table(args, real)
    if args.table in ("model", "both"):
        model_table(args, real)


if __name__ == "__main__":
    main()
