"""Benchmark the Triton kernels against torch's own path, as a fraction of the device's copy bandwidth.

    python benchmarks/bench_kernels.py                       # full Kimi shapes (needs a CUDA GPU, ~12 GB)
    python benchmarks/bench_kernels.py --out benchmarks/results/h100.md
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke     # tiny shapes; runs on a CPU

Decode is memory-bound, so each kernel is judged by the bytes it must move (weights or KV cache, plus
activations) over its time, next to the bandwidth a plain device-to-device copy reaches on the same
machine (``dst.copy_(src)`` of a large buffer: read + write). Rows:

* **W4A16 GEMM** at M = 1, 4, 16, 64 for Kimi's expert shapes (out × in) 2048×7168 (gate/up) and
  7168×2048 (down); bytes = packed + scales + x + y. Torch's path dequantizes to bf16, then matmuls.
* **Fused MoE** of one full layer: 384 experts, top-8, d = 7168, I = 2048, batch 1–64, uniform random
  routing; bytes = the three INT4 matrices of every expert actually picked (+ activations).
  Torch's path is ``kernels.fused_moe`` falling back to a loop over the picked experts.
* **MLA decode** at 4K–128K context: 128 heads (a Kimi layer at TP 1 has 64; 128 is DeepSeek-V3's),
  kv_lora_rank 512, rope 64, bf16 latent cache; bytes = the cache read. Torch's path is the fp32 einsum.

GPU timing: CUDA events around each call, after warm-up, with a 256 MiB buffer written before every
call so that no weight is still in L2 (50 MB on an H100). The Triton columns time a CUDA-graph replay of
the call (the kernels' time; an eager call of a ~10 µs kernel is mostly Python and launch overhead, which
``device_check.py`` part 3 measures separately); the torch columns time the call as made. The median of
the runs is reported. Every row runs in its own ``try``: a failure prints its error in the table instead
of stopping the script.

Targets (issue 8): W4A16 at M = 1 ≥ 70% of copy bandwidth; MLA decode ≥ 60%.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kimi_ref import int4  # noqa: E402
from kimi_ref.kernels import _runtime  # noqa: E402
from weights_tools._cli import FAILURE, USAGE, fail  # noqa: E402
from weights_tools.safe_write import OutputError, check_file, write_text  # noqa: E402

W4 = importlib.import_module("kimi_ref.kernels.w4a16")
MOE = importlib.import_module("kimi_ref.kernels.fused_moe")
MLA = importlib.import_module("kimi_ref.kernels.mla_decode")


@dataclass
class Shapes:
    linears: list[tuple[int, int]]  # (out, in)
    ms: list[int]
    moe: tuple[int, int, int, int]  # experts, top-k, hidden, intermediate
    moe_batches: list[int]
    mla: tuple[int, int, int]  # heads, kv_lora_rank, rope dim
    mla_contexts: list[int]
    mla_batches: list[int]
    copy_bytes: int
    flush_bytes: int


FULL = Shapes(linears=[(2048, 7168), (7168, 2048)], ms=[1, 4, 16, 64], moe=(384, 8, 7168, 2048),
              moe_batches=[1, 4, 16, 64], mla=(128, 512, 64), mla_contexts=[4096, 16384, 65536, 131072],
              mla_batches=[1, 8], copy_bytes=1 << 30, flush_bytes=256 << 20)
SMOKE = Shapes(linears=[(64, 128), (128, 64)], ms=[1, 17], moe=(8, 2, 64, 32), moe_batches=[1, 5],
               mla=(16, 32, 16), mla_contexts=[64, 100], mla_batches=[1], copy_bytes=1 << 20, flush_bytes=1 << 20)


class Timer:
    """Median time of a call in ms: CUDA events with an L2 flush on a GPU, perf_counter elsewhere.

    ``timer(fn, graph=True)`` on a GPU captures ``fn`` once as a CUDA graph and times its replays: the
    kernels' own time, without the Python and launch overhead between them (which an eager call of a
    10 µs kernel is mostly made of). Only for code that never synchronises with the host (the Triton
    paths); the torch paths are timed as called.
    """

    def __init__(self, device: torch.device, flush_bytes: int, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, graph: bool = False) -> float:
        for _ in range(self.warmup):
            fn()
        if graph and self.device.type == "cuda":
            return self._replayed(fn)
        return self._timed(fn)

    def _replayed(self, fn) -> float:
        cuda_graph, _ = capture_graph(fn)
        try:
            return self._timed(cuda_graph.replay)
        finally:
            del cuda_graph

    def _timed(self, fn) -> float:
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                self.flush.zero_()  # evict L2: weights must come from HBM, as in a real decode step
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def capture_graph(fn):
    """(a CUDA graph of one call of ``fn``, that call's output, which each replay rewrites). ``fn`` runs twice
    first, on a side stream as torch asks: compiled and allocated before the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        out = fn()
    return cuda_graph, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the tolerance table's measure)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def random_int4(out_f: int, in_f: int, device, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed words (every nibble pattern) and small bf16 scales; no quantization needed to time."""
    packed = torch.randint(-2**31, 2**31 - 1, (*lead, out_f, in_f // 8), dtype=torch.int32, device=device)
    scale = (torch.rand(*lead, out_f, in_f // 32, device=device) * 0.01).to(torch.bfloat16)
    return packed, scale


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def row(self, cells: list[object]) -> None:
        self.add("| " + " | ".join(str(c) for c in cells) + " |")

    def failed(self, label: str, ncols: int, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")[:200]
        self.row([label, f"FAILED: {msg}"] + [""] * (ncols - 2))
        traceback.print_exc(file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pct(x: float, copy_gbps: float) -> str:
    return f"{100 * x / copy_gbps:.0f}%"


def bench_copy(shapes: Shapes, timer: Timer, device) -> float:
    src = torch.empty(shapes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return gbps(2 * shapes.copy_bytes, ms)  # a copy reads and writes every byte


def bench_w4a16(rep: Report, shapes: Shapes, timer: Timer, device, use_kernel: bool, copy_gbps: float) -> list[dict]:
    """The W4A16 table; returns its rows as dicts (case, triton_ms, torch_ms, bytes) for a caller's targets."""
    rows: list[dict] = []
    rep.add("### W4A16 GEMM (bf16 activations, INT4 weights, fp32 out)")
    rep.add()
    header = ["out × in", "M", "Triton ms", "Triton GB/s", "% copy", "torch ms", "torch GB/s", "% copy", "rel err"]
    rep.row(header)
    rep.row(["---"] * len(header))
    for out_f, in_f in shapes.linears:
        for m in shapes.ms:
            label = f"{out_f}×{in_f}"
            try:
                packed, scale = random_int4(out_f, in_f, device)
                x = torch.randn(m, in_f, device=device).to(torch.bfloat16)
                nbytes = packed.numel() * 4 + scale.numel() * 2 + x.numel() * 2 + m * out_f * 4

                def torch_path():  # what W4A16Linear does: dense bf16 weight, then one matmul
                    return (x @ int4.dequantize(packed, scale, (out_f, in_f), torch.bfloat16).T).float()

                t_torch = timer(torch_path)
                cells = [label, m]
                t_tri = float("nan")
                if use_kernel:
                    got = W4.w4a16_matmul_triton(x, packed, scale)
                    t_tri = timer(lambda: W4.w4a16_matmul_triton(x, packed, scale), graph=True)
                    err = rel_err(got, x.float() @ int4.dequantize(packed, scale, (out_f, in_f)).T)
                    cells += [f"{t_tri:.4f}", f"{gbps(nbytes, t_tri):.3g}", pct(gbps(nbytes, t_tri), copy_gbps)]
                else:
                    err, cells = float("nan"), cells + ["n/a", "", ""]
                cells += [f"{t_torch:.4f}", f"{gbps(nbytes, t_torch):.3g}", pct(gbps(nbytes, t_torch), copy_gbps), f"{err:.1e}"]
                rep.row(cells)
                rows.append({"case": (out_f, in_f, m), "triton_ms": t_tri, "torch_ms": t_torch, "bytes": nbytes})
            except Exception as err:  # noqa: BLE001 - one bad row must not lose the others
                rep.failed(f"{label} M={m}", len(header), err)
    rep.add()
    return rows


def bench_moe(rep: Report, shapes: Shapes, timer: Timer, device, use_kernel: bool, copy_gbps: float) -> list[dict]:
    """The fused-MoE table; returns its rows as dicts (case = batch, triton_ms, torch_ms, bytes)."""
    rows: list[dict] = []
    e, k, d, i = shapes.moe
    rep.add(f"### Fused MoE, one layer ({e} experts, top-{k}, d {d}, I {i}; bf16 tokens, INT4 experts)")
    rep.add()
    header = ["batch", "experts hit", "Triton ms", "Triton GB/s", "% copy", "torch ms", "torch GB/s", "% copy", "rel err"]
    rep.row(header)
    rep.row(["---"] * len(header))
    try:
        gp, gs = random_int4(i, d, device, (e,))
        up, us = random_int4(i, d, device, (e,))
        dp, ds = random_int4(d, i, device, (e,))
    except Exception as err:  # noqa: BLE001
        rep.failed("weights", len(header), err)
        rep.add()
        return rows
    per_expert = int4.packed_bytes(i, d, shape_bytes=0) * 2 + int4.packed_bytes(d, i, shape_bytes=0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in shapes.moe_batches:
        try:
            ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]).to(device)
            tw = torch.rand(n, k, generator=gen).to(device)
            x = torch.randn(n, d, generator=gen).to(device, torch.bfloat16)
            hit = int(torch.unique(ids).numel())
            nbytes = hit * per_expert + x.numel() * 2 + n * d * 4
            args = (x, tw, ids, gp, gs, up, us, dp, ds)
            t_torch = timer(lambda: MOE.fused_moe_torch(*args))
            cells, t_tri = [n, hit], float("nan")
            if use_kernel:
                err = rel_err(MOE.fused_moe_triton(*args), MOE.fused_moe_torch(*args))
                t_tri = timer(lambda: MOE.fused_moe_triton(*args), graph=True)
                cells += [f"{t_tri:.3f}", f"{gbps(nbytes, t_tri):.3g}", pct(gbps(nbytes, t_tri), copy_gbps)]
            else:
                err, cells = float("nan"), cells + ["n/a", "", ""]
            cells += [f"{t_torch:.3f}", f"{gbps(nbytes, t_torch):.3g}", pct(gbps(nbytes, t_torch), copy_gbps), f"{err:.1e}"]
            rep.row(cells)
            rows.append({"case": n, "triton_ms": t_tri, "torch_ms": t_torch, "bytes": nbytes})
        except Exception as err:  # noqa: BLE001
            rep.failed(f"batch {n}", len(header), err)
    del gp, gs, up, us, dp, ds
    rep.add()
    return rows


def bench_mla(rep: Report, shapes: Shapes, timer: Timer, device, use_kernel: bool, copy_gbps: float) -> list[dict]:
    """The MLA-decode table; returns its rows as dicts (case = (batch, context), triton_ms, torch_ms, bytes)."""
    rows: list[dict] = []
    h, c, r = shapes.mla
    rep.add(f"### MLA decode over the latent cache ({h} heads, kv_lora {c}, rope {r}; bf16 cache, one new token)")
    rep.add()
    header = ["batch", "context", "Triton ms", "Triton GB/s", "% copy", "torch ms", "torch GB/s", "% copy", "rel err"]
    rep.row(header)
    rep.row(["---"] * len(header))
    scale = (c // 4 + r) ** -0.5  # any positive number; the model passes softmax_scale(config)
    for b in shapes.mla_batches:
        for s in shapes.mla_contexts:
            try:
                q_latent = torch.randn(b, h, c, device=device) * 0.05
                q_rope = torch.randn(b, h, r, device=device) * 0.05
                latent = torch.randn(b, s, c, device=device).to(torch.bfloat16)
                k_rope = torch.randn(b, s, r, device=device).to(torch.bfloat16)
                nbytes = (latent.numel() + k_rope.numel()) * 2 + (q_latent.numel() + q_rope.numel() + b * h * c) * 4
                args = (q_latent, q_rope, latent, k_rope, s, scale)
                t_torch = timer(lambda: MLA.mla_decode_torch(*args))
                cells, t_tri = [b, s], float("nan")
                if use_kernel:
                    err = rel_err(MLA.mla_decode_triton(*args), MLA.mla_decode_torch(*args))
                    t_tri = timer(lambda: MLA.mla_decode_triton(*args), graph=True)
                    cells += [f"{t_tri:.4f}", f"{gbps(nbytes, t_tri):.3g}", pct(gbps(nbytes, t_tri), copy_gbps)]
                else:
                    err, cells = float("nan"), cells + ["n/a", "", ""]
                cells += [f"{t_torch:.4f}", f"{gbps(nbytes, t_torch):.3g}", pct(gbps(nbytes, t_torch), copy_gbps), f"{err:.1e}"]
                rep.row(cells)
                rows.append({"case": (b, s), "triton_ms": t_tri, "torch_ms": t_torch, "bytes": nbytes})
                del latent, k_rope
            except Exception as err:  # noqa: BLE001
                rep.failed(f"batch {b}, context {s}", len(header), err)
    rep.add()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1 works)")
    parser.add_argument("--out", help="also write the markdown table to this file (a new file unless --force)")
    parser.add_argument("--force", action="store_true", help="let --out replace an existing file")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 50 GPU, 2 CPU)")
    parser.add_argument("--only", choices=["w4a16", "moe", "mla"], action="append", help="run only these sections")
    args = parser.parse_args(argv)
    if args.out:
        try:  # before the benchmark, not after it
            check_file(args.out, force=args.force, what="--out")
        except OutputError as e:
            return fail("bench_kernels", e, USAGE)

    device = torch.device("cuda" if torch.cuda.is_available() and not _runtime.interpreting() else "cpu")
    shapes = SMOKE if args.smoke else FULL
    if device.type == "cpu" and not args.smoke:
        print("bench_kernels: no CUDA device; full shapes need a GPU (use --smoke to check the script on a CPU)",
              file=sys.stderr)
        return 2
    iters = args.iters or (50 if device.type == "cuda" else 2)
    timer = Timer(device, shapes.flush_bytes, warmup=10 if device.type == "cuda" else 1, iters=iters)
    use_kernel = _runtime.use_triton(torch.empty(0, device=device))

    rep = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    triton_version = _runtime.triton.__version__ if _runtime.HAVE_TRITON else "not installed"
    rep.add(f"## kimi_ref kernel benchmark — {name}{' (smoke shapes)' if args.smoke else ''}")
    rep.add()
    rep.add(f"torch {torch.__version__}, triton {triton_version}, "
            f"{'TRITON_INTERPRET=1, ' if _runtime.interpreting() else ''}{iters} timed calls per row (median), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rep.add()
    try:
        copy_gbps = bench_copy(shapes, timer, device)
        rep.add(f"Device-to-device copy bandwidth (read + write of {shapes.copy_bytes >> 20} MiB): **{copy_gbps:.0f} GB/s**")
    except Exception as err:  # noqa: BLE001
        copy_gbps = float("nan")
        rep.add(f"Copy bandwidth: FAILED ({type(err).__name__}: {err})")
    rep.add()
    sections = {"w4a16": bench_w4a16, "moe": bench_moe, "mla": bench_mla}
    for key, fn in sections.items():
        if args.only and key not in args.only:
            continue
        try:
            fn(rep, shapes, timer, device, use_kernel, copy_gbps)
        except Exception as err:  # noqa: BLE001
            rep.add(f"{key}: FAILED ({type(err).__name__}: {err})")
            traceback.print_exc(file=sys.stderr)
    if args.out:
        try:
            write_text(args.out, "\n".join(rep.lines) + "\n", force=args.force, what="--out")
        except OutputError as e:
            return fail("bench_kernels", e, FAILURE)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
