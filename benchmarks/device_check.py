"""The device check: one command that proves the CUDA path on a GPU and measures it against the roofline.

    python benchmarks/device_check.py --out results.md              # a CUDA GPU: Kimi's real shapes, ~4 min on an H200
    python benchmarks/device_check.py --quick --out /tmp/quick.md   # no GPU: the same code at toy shapes, in
                                                                    # Triton's interpreter (tests/test_device_check.py)

Five parts, each in its own ``try`` (a failure is printed in its table and the rest still runs), each
printing progress, the results file rewritten after every part (a run killed half-way keeps what it had):

0. **The machine**: GPU, driver, CUDA, torch, triton; the device's copy bandwidth (the roofline's ceiling).
1. **Kernels vs the float64 oracle and the torch path** at the shapes of one Kimi K2.7-Code layer (the
   shipped K2.5 config: d 7168, experts 2048 wide, 384 experts top-8, 64 heads, kv_lora 512 + rope 64),
   bf16 activations, ragged sizes, NaN planted: W4A16, fused MoE (one TP-8 rank's 48 experts, other
   ranks' picks dropped), MLA decode (NaN in the cache past ``length``), RMSNorm + residual, RoPE. The
   tolerance row of ``kimi_ref/tolerances.py`` is the one the kernel's arithmetic calls for: bf16 where a
   GPU ``tl.dot`` rounds its inputs to bf16, fp32 where the kernel multiplies in fp32 (and always in the
   interpreter, which computes every dot in fp32).
2. **Speed against the roofline** (``bench_kernels.py``'s tables): W4A16 at M = 1, 8, 64 on both expert
   shapes, fused MoE for 1 and 64 tokens (only the picked experts' bytes count), MLA decode at 4K, 32K
   and 128K context; each as bytes / time / copy bandwidth beside the torch path. A sweep of each
   wrapper's one launch knob (W4A16 ``split_k``, MLA ``num_splits``, fused-MoE ``block_m``) shows where
   the default heuristic stands.
3. **One full-size decoder layer** (random INT4 experts, bf16 rest; the MoE ≈ 9.5 GB): prefill 1 × 4096,
   decode at batch 1 and 32 over 4K and 32K of cache, torch and triton backends compared (tokens whose
   router picks differ between the two are counted, not compared), ms per layer-token, the triton decode
   step replayed as a CUDA graph (what launches cost), and the extrapolation to 61 layers at TP 8 with
   every assumption stated, beside the byte roofline and vLLM's published 8 × H200 number.
4. **A ~1 GB model end to end**: a checkpoint written in the real layout (``make_tiny``'s format), loaded
   on the device in bf16; greedy tokens of ``generate`` with the torch and triton backends, and prefill
   logits against the same checkpoint run in fp32 on the CPU.

Exit status: 0 when every correctness check passed, 1 when one failed (the file says which), 2 on bad
arguments. Targets (issue 15; a benchmark, never a timed test): W4A16 at M = 1 ≥ 70% of copy bandwidth,
fused MoE decode ≥ 60%, MLA decode at 32K ≥ 60%, one layer's decode at batch 1 ≤ 2× its byte roofline
with the triton backend and ≥ 3× faster than the torch backend.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # a checkout, no install needed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy shapes (on a CPU: Triton's interpreter)")
    parser.add_argument("--out", required=True, help="the markdown results file to write (a new file unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--budget-s", type=float, default=330.0, help="parts not yet started after this many seconds are skipped")
    parser.add_argument("--parts", default="1234", help="which of the parts 1-4 to run (part 0 always runs)")
    return parser.parse_args(argv)


# Imported (by tests/test_device_check.py) rather than run: the --quick sizes, results written nowhere.
ARGS = parse_args(None if __name__ == "__main__" else ["--quick", "--out", os.devnull])
DEVICE = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels are jitted for the interpreter

import bench_kernels as BK  # noqa: E402  (its import pulls in the kernels, so after TRITON_INTERPRET)
import kimi_ref  # noqa: E402
from kimi_ref import int4  # noqa: E402
from kimi_ref.config import KimiConfig, fixture_path, load_config, tiny_config  # noqa: E402
from kimi_ref.generate import generate  # noqa: E402
from kimi_ref.kernels import _runtime  # noqa: E402
from kimi_ref.backend import use_backend  # noqa: E402
from kimi_ref.model import DecoderLayer  # noqa: E402
from kimi_ref.oracle import experts as o_experts  # noqa: E402
from kimi_ref.oracle import int4 as o_int4  # noqa: E402
from kimi_ref.oracle import mla as o_mla  # noqa: E402
from kimi_ref.oracle import norms as o_norms  # noqa: E402
from kimi_ref.oracle import rope as o_rope  # noqa: E402
from kimi_ref.rope import RotaryEmbedding  # noqa: E402
from kimi_ref.tolerances import RTOL, assert_close, rel_error, smallest_normal  # noqa: E402
from weights_tools.make_tiny import TINY_VOCAB, random_tensors, write_checkpoint  # noqa: E402
from weights_tools.safe_write import OutputError, check_file, write_text  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32


# ---- sizes: the real config, or the same config shrunk in size only ------------------------------------------


class Sizes:
    """Everything the parts vary, from one config (Kimi's, or a toy one) and the run's scale."""

    def __init__(self, quick: bool):
        real = load_config(fixture_path("kimi_k25"))
        self.quick = quick
        if quick:
            self.config = tiny_config(real, vocab_size=TINY_VOCAB, vision=False, hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=16, kv_lora_rank=32, qk_rope_head_dim=16,
                                      moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4)
        else:
            self.config = real.replace(vision=None)
        c = self.config
        self.moe_ranks = 2 if quick else 8  # part 1's fused MoE runs one rank's share: E / moe_ranks experts
        self.w4_ms = [1, 5, 17] if quick else [1, 5, 37, 64]
        self.moe_tokens = 9 if quick else 20
        self.mla_batch, self.mla_cache = 2, (70 if quick else 4200)
        self.mla_lengths = [1, 37, 61] if quick else [1, 37, 4111]
        self.rows = 5 if quick else 37  # RMSNorm rows, RoPE tokens
        self.bench = BK.SMOKE if quick else BK.Shapes(
            linears=[(c.moe_intermediate_size, c.hidden_size), (c.hidden_size, c.moe_intermediate_size)], ms=[1, 8, 64],
            moe=(c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size), moe_batches=[1, 64],
            mla=(c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim), mla_contexts=[4096, 32768, 131072],
            mla_batches=[1], copy_bytes=1 << 30, flush_bytes=256 << 20)
        self.prefill = 24 if quick else 4096
        self.decode = [(1, 40), (3, 90)] if quick else [(1, 4096), (1, 32768), (32, 4096), (32, 32768)]
        self.medium = tiny_config(real, vocab_size=TINY_VOCAB, vision=False) if quick else tiny_config(
            real, vocab_size=TINY_VOCAB, vision=False, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            intermediate_size=8192, moe_intermediate_size=1024, n_routed_experts=64, num_experts_per_tok=8)
        self.prompt, self.new_tokens = (12, 6) if quick else (32, 24)
        self.timer = (0, 1) if quick else (5, 30)  # warm-up, timed calls


# ---- small helpers ----------------------------------------------------------------------------------------


class Run:
    """The report, the clock and the verdicts of one run; ``save`` rewrites the results file atomically."""

    def __init__(self, out: Path, budget_s: float):
        self.rep, self.out, self.budget_s = BK.Report(), out, budget_s
        self.start, self.failures, self.copy_gbps = time.perf_counter(), [], float("nan")
        self.targets: list[tuple[str, str, str]] = []  # (target, measured, met?)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, what: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {what}", file=sys.stderr, flush=True)

    def verdict(self, what: str, actual, expected, row) -> str:
        """Check ``actual`` against ``expected`` with the tolerance table's ``row`` (NaN positions too)."""
        try:
            assert_close(actual, expected, row, what=what)
            return "ok"
        except AssertionError as err:
            self.failures.append(str(err))
            return "**FAIL**: " + str(err).replace("|", "/")[:160]

    def save(self) -> None:
        write_text(self.out, "\n".join(self.rep.lines) + "\n", allow_existing=True, what="--out")  # our own file


def err_of(actual, expected, row) -> str:
    return f"{rel_error(actual, expected, floor=smallest_normal(row)):.1e}"


def row_name(row) -> str:
    return {BF16: "bf16", F32: "fp32"}.get(row, str(row))


def dot_row(x_dtype: torch.dtype, uses_dot: bool = True):
    """The tolerance row of a kernel's arithmetic: a GPU ``tl.dot`` rounds its inputs as ``dot_mode`` says."""
    if not uses_dot or _runtime.interpreting():
        return F32
    return {_runtime.DOT_BF16: BF16, _runtime.DOT_TF32: "tf32", _runtime.DOT_IEEE: F32}[_runtime.dot_mode(x_dtype)]


def int4_weight(gen: torch.Generator, out_f: int, in_f: int, lead: tuple[int, ...] = ()):
    """Random INT4 weights (every nibble pattern) whose outputs have about unit variance for unit inputs."""
    packed = torch.randint(-2**31, 2**31 - 1, (*lead, out_f, in_f // 8), generator=gen, dtype=torch.int32, device=DEVICE)
    spread = torch.rand(*lead, out_f, in_f // 32, generator=gen, device=DEVICE) + 0.5
    return packed, (spread / (21.25 * in_f) ** 0.5).to(BF16)  # a uniform nibble - 8 has variance 21.25


def o_dense(packed: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """The oracle's float64 dequantization of one packed matrix."""
    return o_int4.dequantize(packed.cpu().numpy(), scale.float().cpu().numpy(), (packed.shape[0], packed.shape[1] * 8))


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ---- part 0: the machine ----------------------------------------------------------------------------------


def part_machine(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    rep = run.rep
    rep.add(f"# kimi_ref device check{' (--quick: toy shapes)' if sz.quick else ''}")
    rep.add()
    rep.add(f"`python benchmarks/device_check.py{' --quick' if sz.quick else ''}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the script's docstring says what each part does.")
    rep.add()
    rep.add("| | |")
    rep.add("|---|---|")
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        rep.row(["GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                        f"compute capability {props.major}.{props.minor}"])
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
            rep.row(["driver, max SM / memory clock", smi or "nvidia-smi printed nothing"])
        except (OSError, subprocess.SubprocessError) as err:
            rep.row(["driver", f"nvidia-smi failed: {err}"])
        rep.row(["CUDA (torch's)", torch.version.cuda])
    else:
        rep.row(["device", f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                           f"Triton {'interpreter' if _runtime.interpreting() else 'absent'}"])
    rep.row(["torch / triton / python", f"{torch.__version__} / {_runtime.triton.__version__ if _runtime.HAVE_TRITON else 'none'}"
                                        f" / {platform.python_version()}"])
    rep.row(["kernels run", "compiled Triton" if DEVICE.type == "cuda" else "Triton interpreter (fp32 dots)"])
    run.copy_gbps = BK.bench_copy(sz.bench, timer, DEVICE)
    rep.row(["copy bandwidth (read + write)", f"**{run.copy_gbps:.0f} GB/s** ({sz.bench.copy_bytes >> 20} MiB, median)"])
    rep.add()


# ---- part 1: kernels vs the oracle and the torch path ----------------------------------------------------------


def part_kernels(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    rep, c = run.rep, sz.config
    rep.add(f"## 1. Kernels vs the float64 oracle and the torch path (d {c.hidden_size}, experts {c.moe_intermediate_size} "
            f"wide, {c.n_routed_experts} experts top-{c.num_experts_per_tok}, {c.num_attention_heads} heads, "
            f"kv_lora {c.kv_lora_rank} + rope {c.qk_rope_head_dim})")
    rep.add()
    header = ["kernel", "case", "tolerance row", "rel err vs oracle", "rel err vs torch", "torch vs oracle", "verdict"]
    rep.row(header)
    rep.row(["---"] * len(header))
    gen = torch.Generator(device=DEVICE).manual_seed(15)
    for name, check in (("W4A16", check_w4a16), ("fused MoE", check_moe), ("MLA decode", check_mla),
                        ("RMSNorm + residual", check_rms), ("RoPE", check_rope)):
        run.progress(f"part 1: {name}")
        try:
            check(run, sz, gen)
        except Exception as err:  # noqa: BLE001 - one broken kernel must not hide the others
            run.failures.append(f"{name}: {err}")
            rep.failed(name, len(header), err)
        run.save()
    rep.add()


def _compare(run: Run, kernel: str, case: str, row, tri, torch_out, oracle) -> None:
    run.rep.row([kernel, case, row_name(row), err_of(tri, oracle, row), err_of(tri, torch_out.double(), row),
                 err_of(torch_out, oracle, row),
                 "; ".join(sorted({run.verdict(f"{kernel} {case} vs oracle", tri, oracle, row),
                                   run.verdict(f"{kernel} {case} vs torch", tri, f64(torch_out), row)}))])


def check_w4a16(run: Run, sz: Sizes, gen: torch.Generator) -> None:
    W4 = BK.W4
    c = sz.config
    for out_f, in_f in ((c.moe_intermediate_size, c.hidden_size), (c.hidden_size, c.moe_intermediate_size)):
        packed, scale = int4_weight(gen, out_f, in_f)
        dense = o_dense(packed, scale)
        for m in sz.w4_ms:
            x = torch.randn(m, in_f, generator=gen, device=DEVICE).to(BF16)
            if m > 1:
                x[m // 2, 3] = float("nan")  # one row's outputs must be NaN, every other row untouched
            tri = W4.w4a16_matmul_triton(x, packed, scale)
            row = dot_row(x.dtype, uses_dot=W4.uses_dot(m))  # tl.dot rounds to bf16 on a GPU; one row is fp32 FMAs
            _compare(run, "W4A16", f"{out_f}×{in_f}, M={m}", row, tri, W4.w4a16_matmul_torch(x, packed, scale),
                     f64(x) @ dense.T)


def check_moe(run: Run, sz: Sizes, gen: torch.Generator) -> None:
    """One rank's share of the experts, as at TP 8: picks of other ranks' experts must contribute nothing."""
    MOE = BK.MOE
    c = sz.config
    e_all, k, d, i = c.n_routed_experts, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size
    local = e_all // sz.moe_ranks
    offset = local * (sz.moe_ranks // 2)  # a middle rank: its ids are neither the first nor the last
    weights = [int4_weight(gen, i, d, (local,)), int4_weight(gen, i, d, (local,)), int4_weight(gen, d, i, (local,))]
    flat = [t for pair in weights for t in pair]
    cpu = np.random.default_rng(15)
    pool = offset + cpu.choice(local, size=min(5, local, k), replace=False)  # the few local experts tokens pick
    foreign = np.setdiff1d(np.arange(e_all), np.arange(offset, offset + local))
    dense: dict[int, tuple[np.ndarray, ...]] = {}

    def oracle(x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
        out, picked = np.zeros((x.shape[0], d)), ids.cpu().numpy()
        for n, j in zip(*np.nonzero((picked >= offset) & (picked < offset + local))):
            e = int(picked[n, j]) - offset
            if e not in dense:
                dense[e] = tuple(o_dense(weights[w][0][e], weights[w][1][e]) for w in range(3))
            out[n] += float(tw[n, j]) * o_experts.swiglu(f64(x[n:n + 1]), *dense[e])[0]
        return out

    for case, n in (("decode: 1 token", 1), (f"{sz.moe_tokens} tokens, one expert has all", sz.moe_tokens)):
        if n == 1:  # the whole pool plus other ranks' experts
            picks = [np.concatenate([pool, cpu.choice(foreign, size=k - len(pool), replace=False)])]
        else:  # pool[0] in every token (a run longer than a block); the rest ragged, foreign ones mixed in
            picks = [np.concatenate([[pool[0]], cpu.permutation(np.concatenate(
                [pool[1:], cpu.choice(foreign, size=k, replace=False)]))[: k - 1]]) for _ in range(n)]
        ids = torch.tensor(np.stack(picks), dtype=torch.long, device=DEVICE)
        tw = torch.rand(n, k, generator=gen, device=DEVICE) * c.routed_scaling_factor / k
        x = torch.randn(n, d, generator=gen, device=DEVICE).to(BF16)
        if n > 1:
            x[1, 7] = float("nan")
        args = (x, tw, ids, *flat)
        tri = MOE.fused_moe_triton(*args, expert_offset=offset)
        row = dot_row(x.dtype, uses_dot=MOE.block_rows(n, k, local) > 1)  # one-row blocks multiply in fp32
        _compare(run, "fused MoE", f"{case}; experts {offset}..{offset + local - 1} of {e_all}", row, tri,
                 MOE.fused_moe_torch(*args, expert_offset=offset), oracle(x, tw, ids))


def check_mla(run: Run, sz: Sizes, gen: torch.Generator) -> None:
    MLA = BK.MLA
    c = sz.config
    b, h, s = sz.mla_batch, c.num_attention_heads, sz.mla_cache
    scale = o_rope.softmax_scale(c)
    latent = torch.randn(b, s, c.kv_lora_rank, generator=gen, device=DEVICE).to(BF16)
    k_rope = torch.randn(b, s, c.qk_rope_head_dim, generator=gen, device=DEVICE).to(BF16)
    for length in sz.mla_lengths:
        lat, kr = latent.clone(), k_rope.clone()
        lat[:, length:] = float("nan")  # past `length` the cache holds garbage: it must never be read
        kr[:, length:] = float("nan")
        q_latent = torch.randn(b, h, c.kv_lora_rank, generator=gen, device=DEVICE)  # scores of a few units: a real softmax
        q_rope = torch.randn(b, h, c.qk_rope_head_dim, generator=gen, device=DEVICE)
        q_latent[b - 1, h // 3, 0] = float("nan")  # one head of one sequence NaN, the rest untouched
        args = (q_latent, q_rope, lat, kr, length, scale)
        ql, qr, l64, k64 = f64(q_latent), f64(q_rope), f64(latent[:, :length]), f64(k_rope[:, :length])
        probs = o_mla.softmax(scale * (np.einsum("bhc,bsc->bhs", ql, l64) + np.einsum("bhr,bsr->bhs", qr, k64)))
        _compare(run, "MLA decode", f"B={b}, {h} heads, length {length} of {s} (NaN past it)", dot_row(latent.dtype),
                 MLA.mla_decode_triton(*args), MLA.mla_decode_torch(*args), np.einsum("bhs,bsc->bhc", probs, l64))


def check_rms(run: Run, sz: Sizes, gen: torch.Generator) -> None:
    RMS = importlib.import_module("kimi_ref.kernels.rms_norm")
    d, eps = sz.config.hidden_size, sz.config.rms_norm_eps
    x = torch.randn(sz.rows, d, generator=gen, device=DEVICE).to(BF16)
    res = torch.randn(sz.rows, d, generator=gen, device=DEVICE).to(BF16)
    w = (1 + 0.1 * torch.randn(d, generator=gen, device=DEVICE)).to(BF16)
    x[sz.rows // 2, 5] = float("nan")
    y, h = RMS.rms_norm_triton(x, w, eps, residual=res)
    y_torch, h_torch = RMS.rms_norm_torch(x, w, eps, residual=res)
    same_h = torch.equal(torch.nan_to_num(h, 7.0), torch.nan_to_num(h_torch, 7.0))
    if not same_h:
        run.failures.append("RMSNorm: the fused residual h = x + residual differs from torch's bf16 add")
    differ = int((y.float() != y_torch.float()).sum() - (y.isnan() & y_torch.isnan()).sum())
    _compare(run, "RMSNorm + residual", f"{sz.rows} rows × {d}, eps {eps}; h bit-exact: {'yes' if same_h else '**NO**'}, "
             f"y differs from torch in {differ} of {y.numel()} bf16 values", BF16, y, y_torch,
             o_norms.rms_norm(f64(h_torch), f64(w), eps))


def check_rope(run: Run, sz: Sizes, gen: torch.Generator) -> None:
    ROPE = importlib.import_module("kimi_ref.kernels.rope")
    c = sz.config
    r = c.qk_rope_head_dim
    positions = torch.arange(100_000, 100_000 + sz.rows, device=DEVICE)  # far past the original context: YaRN at work
    cos, sin = RotaryEmbedding(c.rope, r)(positions)
    o_cos, o_sin = o_rope.cos_sin(f64(positions), c.rope, r)
    for heads, what in ((c.num_attention_heads, "q_rope"), (1, "k_rope (one shared head)")):
        x = torch.randn(2, sz.rows, heads, r, generator=gen, device=DEVICE).to(BF16)
        x[1, 2, 0, 5] = float("nan")  # poisons its pair (4, 5) only
        _compare(run, "RoPE", f"{what}: [2, {sz.rows}, {heads}, {r}], positions 100000+", BF16,
                 ROPE.apply_rope_triton(x, cos, sin), ROPE.apply_rope_torch(x, cos, sin),
                 o_rope.apply_rope(f64(x), o_cos[None, :, None, :], o_sin[None, :, None, :]))


# ---- part 2: speed against the roofline -------------------------------------------------------------------------


def part_speed(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    rep = run.rep
    rep.add("## 2. Speed against the roofline (bytes that must move / time / copy bandwidth)")
    rep.add()
    use_kernel = _runtime.use_triton(torch.empty(0, device=DEVICE))
    run.progress("part 2: W4A16")
    w4 = BK.bench_w4a16(rep, sz.bench, timer, DEVICE, use_kernel, run.copy_gbps)
    run.save()
    run.progress("part 2: fused MoE")
    moe = BK.bench_moe(rep, sz.bench, timer, DEVICE, use_kernel, run.copy_gbps)
    run.save()
    run.progress("part 2: MLA decode")
    mla = BK.bench_mla(rep, sz.bench, timer, DEVICE, use_kernel, run.copy_gbps)
    run.save()
    share = lambda row: 100 * BK.gbps(row["bytes"], row["triton_ms"]) / run.copy_gbps  # noqa: E731
    for row in w4:
        if row["case"][2] == 1:
            run.targets.append((f"W4A16 {row['case'][0]}×{row['case'][1]}, M = 1: ≥ 70% of copy bandwidth",
                                f"{share(row):.0f}%", "yes" if share(row) >= 70 else "**no**"))
    for row in moe[:1]:
        run.targets.append(("fused MoE, 1 token: ≥ 60%", f"{share(row):.0f}%", "yes" if share(row) >= 60 else "**no**"))
    for row in mla:
        if row["case"][1] == (32768 if not sz.quick else sz.bench.mla_contexts[0]):
            run.targets.append((f"MLA decode at {row['case'][1]} context: ≥ 60%", f"{share(row):.0f}%",
                                "yes" if share(row) >= 60 else "**no**"))
    run.progress("part 2: launch configurations")
    sweep_launches(run, sz, timer)


# Launch configurations swept in part 2 (the wrapper's own choice comes first, as "auto").
W4_CONFIGS = [{}, {"BLOCK_N": 32, "BLOCK_K": 256}, {"BLOCK_N": 16}, {"BLOCK_N": 4}, {"BLOCK_K": 1024},
              {"num_warps": 2}, {"num_stages": 4}]
W4_SPLITS = [None, 8, 32]
MOE_UP = [{}, {"BLOCK_N": 64, "BLOCK_K": 64}, {"BLOCK_N": 32, "BLOCK_K": 256}, {"BLOCK_N": 16, "BLOCK_K": 256}]
MOE_DOWN = [{}, {"BLOCK_N": 64}, {"BLOCK_N": 256}, {"BLOCK_N": 128, "BLOCK_K": 128}]
MOE_ONE_ROW = [({"BLOCK_K": 256}, {}), ({"BLOCK_N": 8}, {}), ({"BLOCK_K": 1024}, {}), ({}, {"BLOCK_N": 16}),
               ({}, {"BLOCK_K": 512}), ({"num_warps": 2}, {"num_warps": 2}), ({"num_stages": 4}, {"num_stages": 4})]
MLA_CONFIGS = [{}, {"num_warps": 8}, {"BLOCK_S": 64}, {"BLOCK_H": 16}, {"BLOCK_S": 64, "num_warps": 8},
               {"BLOCK_H": 64, "num_warps": 8}]
MLA_SPLITS = [None, 32, 64, 128]


def sweep_launches(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    """Each kernel under other launch configurations (CUDA-graph replay time): where does the default stand?"""
    rep = run.rep
    rep.add("### Launch configurations swept (kernel time, CUDA-graph replay; the first of each group is the default)")
    rep.add()
    header = ["kernel", "case", "launch", "ms", "% copy"]
    rep.row(header)
    rep.row(["---"] * len(header))
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    quick = slice(0, 2) if sz.quick else slice(None)

    def row(kernel: str, case: str, launch: str, fn, nbytes: int) -> None:
        try:
            ms = timer(fn, graph=True)
            rep.row([kernel, case, launch, f"{ms:.4f}", BK.pct(BK.gbps(nbytes, ms), run.copy_gbps)])
        except Exception as err:  # noqa: BLE001 - a configuration that does not compile says so, the sweep goes on
            rep.failed(f"{kernel} {case} {launch}", len(header), err)

    for out_f, in_f in sz.bench.linears:
        packed, scale = int4_weight(gen, out_f, in_f)
        nbytes = packed.numel() * 4 + scale.numel() * 2
        x = torch.randn(1, in_f, generator=gen, device=DEVICE).to(BF16)
        for cfg in W4_CONFIGS[quick]:
            row("W4A16", f"{out_f}×{in_f}, M=1", str(cfg or "auto"),
                lambda: BK.W4.w4a16_matmul_triton(x, packed, scale, config=cfg), nbytes)
        for split in W4_SPLITS[1:3 if sz.quick else None]:
            row("W4A16", f"{out_f}×{in_f}, M=1", f"split_k={split}",
                lambda: BK.W4.w4a16_matmul_triton(x, packed, scale, split_k=split), nbytes)
    run.save()
    e, k, d, i = sz.bench.moe
    flat = [t for shape in ((i, d), (i, d), (d, i)) for t in int4_weight(gen, *shape, (e,))]
    per_expert = sum(t[0].numel() * t.element_size() for t in flat)
    for n in sz.bench.moe_batches:
        ids = torch.stack([torch.randperm(e, device=DEVICE)[:k] for _ in range(n)])
        args = (torch.randn(n, d, device=DEVICE).to(BF16), torch.rand(n, k, device=DEVICE), ids, *flat)
        nbytes = int(torch.unique(ids).numel()) * per_expert
        for bm in ((1, 16, 64) if n == 1 else (16, 32, 64))[quick]:  # the default first
            row("fused MoE", f"{n} tokens", f"block_m={bm}", lambda: BK.MOE.fused_moe_triton(*args, block_m=bm), nbytes)
        if n == 1:  # one token: the one-row (GEMV) blocks' tiles
            for up, down in MOE_ONE_ROW[quick]:
                row("fused MoE", f"{n} tokens", f"block_m=1, gate/up {up}, down {down}",
                    lambda: BK.MOE.fused_moe_triton(*args, block_m=1, up_config=up, down_config=down), nbytes)
            continue
        for cfg in MOE_UP[1:][quick]:
            row("fused MoE", f"{n} tokens", f"gate/up {cfg}", lambda: BK.MOE.fused_moe_triton(*args, up_config=cfg), nbytes)
        for cfg in MOE_DOWN[1:][quick]:
            row("fused MoE", f"{n} tokens", f"down {cfg}", lambda: BK.MOE.fused_moe_triton(*args, down_config=cfg), nbytes)
    del flat
    free()
    run.save()
    h, cl, r = sz.bench.mla
    for s in sz.bench.mla_contexts[:2]:
        lat = torch.randn(1, s, cl, device=DEVICE).to(BF16)
        args = (torch.randn(1, h, cl, device=DEVICE), torch.randn(1, h, r, device=DEVICE), lat,
                torch.randn(1, s, r, device=DEVICE).to(BF16), s, 0.1)
        nbytes = s * (cl + r) * 2
        for cfg in MLA_CONFIGS[quick]:
            row("MLA decode", f"B=1, {h} heads, context {s}", str(cfg or "auto"),
                lambda: BK.MLA.mla_decode_triton(*args, config=cfg), nbytes)
        for split in MLA_SPLITS[1:][quick]:
            row("MLA decode", f"B=1, {h} heads, context {s}", f"num_splits={split}",
                lambda: BK.MLA.mla_decode_triton(*args, num_splits=split), nbytes)
    rep.add()


# ---- part 3: one full-size decoder layer ---------------------------------------------------------------------------


def random_layer(config: KimiConfig, layer_idx: int, seed: int) -> DecoderLayer:
    """A decoder layer at the config's full size with random weights, made on the device: built on the meta
    device, then every tensor filled (INT4 experts as random words, no quantization pass over 9.5 GB)."""
    layer = DecoderLayer(config, layer_idx, dtype=BF16, device="meta").to_empty(device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for name, p in layer.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=DEVICE)
        if name.endswith("bias"):
            p.data.copy_(0.02 * noise)
        elif p.dim() == 1:  # RMSNorm gains
            p.data.copy_(1 + 0.1 * noise)
        else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
            p.data.copy_(noise / p.shape[1] ** 0.5)
    for module in layer.modules():
        if isinstance(module, int4.W4A16Linear):
            packed, scale = int4_weight(gen, module.out_features, module.in_features)
            module.weight_packed.copy_(packed)
            module.weight_scale.copy_(scale)
            module.weight_shape.copy_(torch.tensor([module.out_features, module.in_features]))
    bias = layer.mlp.gate.e_score_correction_bias
    bias.copy_(0.05 * torch.randn(bias.shape, generator=gen, device=DEVICE))
    return layer.eval()


def layer_bytes(layer: DecoderLayer) -> tuple[int, int]:
    """(bytes of everything but the routed experts, bytes of one routed expert)."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    rest = sum(size(t) for name, t in tensors.items() if ".experts." not in name)
    one = next(iter(layer.mlp.experts.values()))
    return rest, sum(size(t) for t in list(one.parameters()) + list(one.buffers()))


def graph_replay(fn, timer: BK.Timer) -> tuple[float, torch.Tensor]:
    """Capture ``fn`` (one decode step) as a CUDA graph; (median ms of a replay, the replay's output)."""
    graph, out = BK.capture_graph(fn)
    ms = timer(graph.replay)
    graph.replay()
    sync()
    return ms, out


def part_layer(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    rep, c = run.rep, sz.config
    idx = c.first_k_dense_replace  # the first MoE layer
    rep.add(f"## 3. One full-size decoder layer (layer {idx} of {Path(c.source).name}: MLA + {c.n_routed_experts} INT4 experts "
            f"top-{c.num_experts_per_tok} + shared expert; random weights, bf16)")
    rep.add()
    run.progress("part 3: building the layer")
    layer = random_layer(c, idx, seed=7)
    rest, per_expert = layer_bytes(layer)
    rep.add(f"Weights: {(rest + c.n_routed_experts * per_expert) / 1e9:.2f} GB ({rest / 1e6:.0f} MB outside the routed "
            f"experts, {per_expert / 1e6:.2f} MB per INT4 expert). Byte roofline = weights read (every non-expert "
            f"tensor + each expert picked) + the latent cache read, over the copy bandwidth.")
    rep.add()
    header = ["step", "torch ms", "triton ms", "speed-up", "triton ms / token", "roofline ms", "triton / roofline",
              "graph replay ms", "router picks differ", "rel err (same picks)", "verdict"]
    rep.row(header)
    rep.row(["---"] * len(header))
    rotary = RotaryEmbedding(c.rope, c.qk_rope_head_dim)
    picks: list[torch.Tensor] = []
    hook = layer.mlp.gate.register_forward_hook(lambda module, args, out: picks.append(out[1]))
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    cases = [("prefill", 1, sz.prefill, 0)] + [("decode", b, 1, ctx) for b, ctx in sz.decode]
    decode_b1 = {}
    try:
        for kind, b, t, ctx in cases:
            label = f"{kind} B={b}" + (f" × {t} tokens" if kind == "prefill" else f", {ctx} cached")
            run.progress(f"part 3: {label}")
            try:
                decode_b1.update(layer_case(run, sz, layer, rotary, picks, gen, timer, label, b, t, ctx, rest, per_expert))
            except Exception as err:  # noqa: BLE001
                run.failures.append(f"layer {label}: {err}")
                rep.failed(label, len(header), err)
            run.save()
    finally:
        hook.remove()
    rep.add()
    for line in getattr(run, "breakdown", []):
        rep.add(line)
    extrapolate(run, sz, decode_b1, rest, per_expert)


def layer_case(run: Run, sz: Sizes, layer, rotary, picks, gen, timer, label, b, t, ctx, rest, per_expert) -> dict:
    c = sz.config
    x = torch.randn(b, t, c.hidden_size, generator=gen, device=DEVICE).to(BF16)
    positions = torch.arange(ctx, ctx + t, device=DEVICE)
    cos_sin = rotary(positions)
    cache = layer.self_attn.new_cache(b, ctx + t)
    for name, buf in cache.tensors.items():  # a filled cache: as the latent norm and RoPE would leave it
        buf[:, :ctx] = torch.randn(b, ctx, buf.shape[-1], generator=gen, device=DEVICE).to(buf.dtype)

    def step() -> torch.Tensor:
        cache.length = ctx  # rewind: every call writes the same position and reads ctx + t entries
        return layer(x, positions, cache, cos_sin=cos_sin)

    out, ids, ms = {}, {}, {}
    for backend in ("torch", "triton"):
        use_backend(layer, backend)
        picks.clear()
        out[backend] = step()
        ids[backend] = picks[-1].sort(dim=-1).values
        ms[backend] = timer(step)
    same = (ids["torch"] == ids["triton"]).all(-1)  # tokens the two backends sent to the same experts
    flat = lambda o: o.reshape(-1, c.hidden_size)[same]  # noqa: E731
    verdict = run.verdict(f"layer {label}: triton vs torch", flat(out["triton"]), f64(flat(out["torch"])), BF16)
    hit = int(torch.unique(ids["triton"]).numel())
    roof = (rest + hit * per_expert + b * ctx * cache.bytes_per_token()) / (run.copy_gbps * 1e6)
    graph, g_ms = "—", float("nan")
    if t == 1 and DEVICE.type == "cuda":
        try:
            g_ms, g_out = graph_replay(step, timer)
            graph = f"{g_ms:.3f}" + ("" if torch.equal(g_out, out["triton"]) else " (**output differs from eager**)")
            if not torch.equal(g_out, out["triton"]):
                run.failures.append(f"layer {label}: CUDA-graph replay differs from the eager triton step")
        except Exception as err:  # noqa: BLE001 - a step that cannot be captured says why, the row stays
            graph = f"capture failed: {type(err).__name__}: {str(err)[:80]}".replace("|", "/")
    decode_roof = t == 1
    run.rep.row([label, f"{ms['torch']:.3f}", f"{ms['triton']:.3f}", f"{ms['torch'] / ms['triton']:.1f}×",
                 f"{ms['triton'] / (b * t):.4f}", f"{roof:.3f}" if decode_roof else "— (compute-bound)",
                 f"{ms['triton'] / roof:.1f}×" if decode_roof else "—", graph,
                 f"{int((~same).sum())} of {b * t}", err_of(flat(out["triton"]), f64(flat(out["torch"])), BF16), verdict])
    if b == 1 and t == 1 and ctx == min(ctx_ for _, ctx_ in sz.decode):
        if DEVICE.type == "cuda":
            kernel_breakdown(run, step, f"{label}, triton backend")
        run.targets.append(("one layer, decode B=1 (triton): ≤ 2× its byte roofline", f"{ms['triton'] / roof:.1f}×",
                            "yes" if ms["triton"] <= 2 * roof else "**no**"))
        run.targets.append(("one layer, decode B=1: triton ≥ 3× faster than torch", f"{ms['torch'] / ms['triton']:.1f}×",
                            "yes" if ms["torch"] >= 3 * ms["triton"] else "**no**"))
        return {"eager_ms": ms["triton"], "graph_ms": g_ms,
                "ctx": ctx, "hit": hit}
    return {}


def kernel_breakdown(run: Run, step, label: str, repeats: int = 5, top: int = 12) -> None:
    """Where one step's GPU time goes, per kernel (torch.profiler over eager steps), after the layer table."""
    from torch.profiler import ProfilerActivity, profile  # only here: CUPTI is needed on a GPU alone

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        sync()
    kernels = [(e.key, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0), e.count)
               for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
    total = sum(us for _, us, _ in kernels) / repeats
    run.breakdown = [f"Per-kernel GPU time of one {label} step (torch.profiler, {repeats} eager steps): "
                     f"**{total / 1e3:.3f} ms of kernels** in {sum(n for *_, n in kernels) // repeats} launches.", "",
                     "| kernel | µs per step | launches per step |", "|---|---|---|"]
    for name, us, count in kernels[:top]:
        run.breakdown.append(f"| `{name[:70]}` | {us / repeats:.1f} | {count / repeats:g} |")
    run.breakdown.append("")


def extrapolate(run: Run, sz: Sizes, b1: dict, rest: int, per_expert: int) -> None:
    """61 layers at TP 8 from one layer at TP 1, every assumption printed beside the numbers."""
    rep, c = run.rep, sz.config
    if not b1:
        rep.add("No batch-1 decode measurement, so no extrapolation.")
        return
    tp, layers, allreduce_us = 8, c.num_hidden_layers, 15.0
    head = c.vocab_size * c.hidden_size * 2 / tp  # lm_head rows of one rank, bf16
    bw = run.copy_gbps * 1e6  # bytes per ms
    extra = 2 * layers * allreduce_us / 1e3 + head / bw
    cache = b1["ctx"] * (c.kv_lora_rank + c.qk_rope_head_dim) * 2  # per layer, bf16; every rank reads all of it
    dense_mlp = 3 * c.hidden_size * c.intermediate_size * 2
    moe_bytes = (layers - c.first_k_dense_replace) * (rest + c.num_experts_per_tok * per_expert)
    shared = c.n_shared_experts * 3 * c.hidden_size * c.moe_intermediate_size * 2
    dense_bytes = c.first_k_dense_replace * (rest - shared + dense_mlp)
    roof = (moe_bytes + dense_bytes + c.vocab_size * c.hidden_size * 2) / tp / bw + layers * cache / bw
    rep.add(f"### The whole model at TP {tp}, decode at batch 1 with {b1['ctx']} tokens of context (extrapolated)")
    rep.add()
    rep.row(["", "ms / token", "tokens / s"])
    rep.row(["---"] * 3)
    for what, layer_ms in (("kimi_ref triton, eager (measured layer)", b1["eager_ms"]),
                           ("kimi_ref triton, CUDA-graph replay (measured layer)", b1["graph_ms"])):
        total = layers * layer_ms / tp + extra
        rep.row([what, f"{total:.2f}", f"{1e3 / total:.0f}"] if total == total else [what, "not measured", "—"])
    rep.row(["byte roofline, 8 GPUs at this GPU's copy bandwidth", f"{roof:.2f}", f"{1e3 / roof:.0f}"])
    rep.row(["byte roofline quoted in issue 15 (8 × H200)", "≈ 0.86", "≈ 1160"])
    rep.row(["vLLM, Kimi-K2-Thinking TP 8 on 8 × H200 (published; a loaded server, see below)", "38 (median ITL)", "—"])
    rep.add()
    rep.add("Assumptions: (1) all 61 layers cost what this MoE layer costs (layer 0's dense MLP reads "
            f"{dense_mlp / 1e6:.0f} MB instead of the shared + {c.num_experts_per_tok} routed experts' "
            f"{(shared + c.num_experts_per_tok * per_expert) / 1e6:.0f} MB); "
            f"(2) TP {tp} divides the layer's time by {tp} — heads, experts and the shared expert split {tp} ways, but the "
            "latent cache is replicated and launch overhead does not shrink, so the eager line is optimistic; "
            f"(3) two all-reduces per layer at {allreduce_us:.0f} µs each (NCCL's small-message latency over NVLink, an "
            f"estimate, not measured here): {2 * layers * allreduce_us / 1e3:.2f} ms; (4) lm_head: {head / 1e6:.0f} MB per "
            "rank at the copy bandwidth; (5) nothing else (sampling, Python between layers) is counted. The byte "
            "roofline reads every non-expert weight and the 8 picked experts once per token, split 8 ways, plus each "
            "rank's full copy of the latent cache.")
    rep.add()
    rep.add("vLLM's number: vllm-project/recipes `moonshotai/Kimi-K2-Think.md` (commit 0d218d1), `vllm bench serve` "
            "on 8 × H200, TP 8, random 8000-in / 4000-out prompts, 1000 requests at 100 req/s: output 485.8 tok/s, "
            "median inter-token latency 38.0 ms, median TPOT 473 ms — a server under ~1000 concurrent requests, not "
            "batch-1 latency; the nearest published figure, not a like-for-like one.")
    rep.add()


# ---- part 4: a ~1 GB model end to end -----------------------------------------------------------------------------


def traced(model, fn):
    """``fn()`` with every MoE router watched: (its result, {layer: (router inputs [P, d] fp32, sorted picks [P, k])})
    over the P positions the calls saw, in order (a prefill's rows, then one row per decode step)."""
    seen: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            def hook(module, args, out, i=i):
                seen.setdefault(i, []).append((args[0].float().cpu(), out[1].sort(dim=-1).values.cpu()))
            handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        result = fn()
    finally:
        for handle in handles:
            handle.remove()
    return result, {i: (torch.cat([x for x, _ in calls]), torch.cat([ids for _, ids in calls])) for i, calls in seen.items()}


def first_flip(a: dict, b: dict, upto: int) -> tuple[int, int] | None:
    """(position, layer) of the first of the first ``upto`` positions where two runs' routers picked differently."""
    flips = [(int(rows[0]), layer) for layer in sorted(a)
             for rows in [(a[layer][1][:upto] != b[layer][1][:upto]).any(-1).nonzero().flatten()] if len(rows)]
    return min(flips) if flips else None


def near_tie(run: Run, what: str, flip: tuple[int, int], a: dict, b: dict) -> str:
    """A router flip is bf16 noise only if that router's input still agrees within the bf16 row: check it."""
    position, layer = flip
    err = rel_error(a[layer][0][position], b[layer][0][position])
    if err > RTOL[BF16]:
        run.failures.append(f"{what}: the router input at position {position}, layer {layer} differs by {err:.1e}")
    return (f"position {position}, layer {layer} (its input differs by {err:.1e}: "
            + ("a near-tie within bf16 noise)" if err <= RTOL[BF16] else "**beyond bf16 tolerance**)"))


def part_model(run: Run, sz: Sizes, timer: BK.Timer) -> None:
    """A random MoE flips a router choice now and then under bf16 noise (two experts' scores within ~1e-3),
    and from there on that token's hidden state is another one: so logits are compared at the positions
    before the first flip, and each flip is checked to be a near-tie (its router input within bf16 tolerance)."""
    rep, c = run.rep, sz.medium
    rep.add(f"## 4. A model end to end (d {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
            f"{c.n_routed_experts} INT4 experts top-{c.num_experts_per_tok}, vocabulary {c.vocab_size})")
    rep.add()
    with tempfile.TemporaryDirectory(prefix="kimi_ref_device_check_") as tmp:
        run.progress("part 4: writing the checkpoint")
        ckpt = write_checkpoint(Path(tmp) / "ckpt", c, random_tensors(c, seed=3))
        gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
        shards = len(list(ckpt.glob("*.safetensors")))
        rep.add(f"Checkpoint: {gb:.2f} GB in {shards} shards, written by `weights_tools.make_tiny.write_checkpoint` "
                "(the real layout: index json, INT4 experts packed as compressed-tensors does).")
        rep.add()
        prompt = torch.randint(0, 3840, (1, sz.prompt), generator=torch.Generator().manual_seed(4))  # BPE ids, no specials
        greedy = dict(max_new_tokens=sz.new_tokens, temperature=0.0)
        run.progress("part 4: the fp32 reference on the CPU")
        cpu_model = kimi_ref.load_model(ckpt, device="cpu", dtype=F32, progress=False)
        ref_logits, ref_route = traced(cpu_model, lambda: cpu_model(prompt)[0].double())
        ref_tokens = generate(cpu_model, prompt[0], **greedy).tokens
        del cpu_model
        run.progress("part 4: loading on the device")
        model = kimi_ref.load_model(ckpt, device=DEVICE, dtype=BF16, progress=False)
        runs = {}
        for backend in ("torch", "triton"):
            run.progress(f"part 4: {backend} backend")
            model.set_backend(backend)
            generate(model, prompt[0], max_new_tokens=3, temperature=0.0)  # compile the kernels outside the timing
            logits, route = traced(model, lambda: model(prompt.to(DEVICE))[0].float().cpu())
            gen, gen_route = traced(model, lambda: generate(model, prompt[0], **greedy))
            runs[backend] = (logits, route, gen, gen_route)
        del model
        free()
    header = ["backend (bf16 on the device)", "router picks first differ from fp32 at", "logits rel err before it",
              "same argmax", "greedy tokens", "= fp32 tokens", "decode tok/s", "verdict"]
    rep.row(header)
    rep.row(["---"] * len(header))
    for backend, (logits, route, gen, _) in runs.items():
        flip = first_flip(route, ref_route, sz.prompt)
        upto = sz.prompt if flip is None else flip[0]
        where = "nowhere" if flip is None else near_tie(run, f"{backend} prefill", flip, route, ref_route)
        agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
        same = next((i for i, (a, b) in enumerate(zip(gen.tokens, ref_tokens)) if a != b), len(gen.tokens))
        verdict = (run.verdict(f"{backend} logits vs CPU fp32", logits[:upto], ref_logits[:upto].numpy(), BF16)
                   if upto else "nothing to compare: the first position flipped")
        rep.row([backend, where, f"{err_of(logits[:upto], ref_logits[:upto].numpy(), BF16)} ({upto} positions)" if upto
                 else "—", f"{100 * agree:.0f}%", " ".join(map(str, gen.tokens)), f"first {same} of {len(gen.tokens)}",
                 f"{gen.decode_tokens_per_second:.1f}", verdict])
    rep.add()
    (_, _, gen_a, route_a), (_, _, gen_b, route_b) = runs["torch"], runs["triton"]
    diverge = next((i for i, (a, b) in enumerate(zip(gen_a.tokens, gen_b.tokens)) if a != b), None)
    if diverge is None:
        line = f"**yes**, all {len(gen_a.tokens)}"
    else:  # token j comes from the logits at position prompt + j - 1, which see positions up to there
        flip = first_flip(route_a, route_b, sz.prompt + diverge)
        if flip is None:
            run.failures.append(f"part 4: greedy tokens of the two backends differ at token {diverge} with no router flip before")
            line = f"**NO**: they differ at token {diverge} and no router choice differed before it"
        else:
            line = (f"the first {diverge}; they part after the routers' picks differed at "
                    + near_tie(run, "torch vs triton generate", flip, route_a, route_b))
    rep.add(f"Greedy tokens, torch backend = triton backend ({sz.new_tokens} tokens after a {sz.prompt}-token prompt): {line}.")
    rep.add()


# ---- the run --------------------------------------------------------------------------------------------------------


def summary(run: Run) -> None:
    rep = run.rep
    rep.add("## Targets (issue 15)")
    rep.add()
    rep.row(["target", "measured", "met"])
    rep.row(["---"] * 3)
    for target in run.targets:
        rep.row(list(target))
    rep.add()
    rep.add(f"Correctness checks failed: **{len(run.failures)}**" + ("" if not run.failures else ":"))
    for failure in run.failures:
        rep.add(f"- {failure[:300]}")
    rep.add()
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if DEVICE.type == "cuda" else ""
    rep.add(f"Total time {run.elapsed():.0f} s{peak}.")


def main() -> int:
    try:
        out = check_file(ARGS.out, force=ARGS.force, what="--out")
    except OutputError as err:
        print(f"device_check: {err}", file=sys.stderr)
        return 2
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if DEVICE.type == "cpu" and not ARGS.quick:
        print("device_check: Kimi's real shapes need a GPU; on a CPU use --quick", file=sys.stderr)
        return 2
    sz = Sizes(ARGS.quick)
    warmup, iters = sz.timer
    timer = BK.Timer(DEVICE, sz.bench.flush_bytes, warmup=warmup, iters=iters)
    run = Run(out, ARGS.budget_s)
    parts = {"0": part_machine, "1": part_kernels, "2": part_speed, "3": part_layer, "4": part_model}
    with torch.no_grad():
        for key, part in parts.items():
            if key != "0" and key not in ARGS.parts:
                continue
            if run.elapsed() > run.budget_s:
                run.rep.add(f"## Part {key}: skipped (the {run.budget_s:.0f} s budget was spent)")
                run.rep.add()
                continue
            try:
                part(run, sz, timer)
            except Exception as err:  # noqa: BLE001 - a broken part must not lose the others
                run.failures.append(f"part {key}: {type(err).__name__}: {err}")
                run.rep.add(f"**Part {key} FAILED**: {type(err).__name__}: {str(err)[:300]}")
                run.rep.add()
                traceback.print_exc()
            free()
            run.save()
    summary(run)
    run.save()
    print(f"wrote {out}", file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
