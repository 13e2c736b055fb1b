"""benchmarks/device_check.py works before any GPU time is spent on it, and its checks can fail.

The whole script runs with ``--quick`` (toy shapes; Triton's interpreter on a CPU) exactly as it will on
a GPU; then its checks are fed broken kernels to show each would be caught, and its router-flip logic is
fed a flip that is not a near-tie.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_quick_run_passes_every_part(tmp_path):
    out = tmp_path / "quick.md"
    done = _run("--quick", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    for part in ("# kimi_ref device check", "## 1. Kernels", "## 2. Speed", "### Launch configurations swept",
                 "## 3. One full-size decoder layer", "### The whole model at TP 8", "## 4. A model end to end",
                 "## Targets (issue 15)", "Correctness checks failed: **0**"):
        assert part in text, f"{part!r} missing from the quick run's results"
    assert "FAIL" not in text
    for kernel in ("| W4A16 |", "| fused MoE |", "| MLA decode |", "| RMSNorm + residual |", "| RoPE |"):
        assert text.count(kernel) >= (1 if "RMSNorm" in kernel else 2), f"{kernel} has too few checked cases"
    assert "[" in done.stderr and "part 3" in done.stderr  # progress lines as it goes


def test_refuses_to_overwrite_and_full_shapes_without_gpu(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("keep me")
    done = _run("--quick", "--device", "cpu", "--out", str(out))
    assert done.returncode == 2 and "already exists" in done.stderr and out.read_text() == "keep me"
    done = _run("--device", "cpu", "--out", str(tmp_path / "full.md"))
    assert done.returncode == 2 and "--quick" in done.stderr and not (tmp_path / "full.md").exists()


@pytest.fixture(scope="module")
def dc():
    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("device_check")


def _checked(dc, tmp_path, check) -> list[str]:
    run = dc.Run(tmp_path / "r.md", budget_s=60)
    check(run, dc.Sizes(quick=True), torch.Generator(device=dc.DEVICE).manual_seed(0))
    return run.failures


def test_part1_catches_a_wrong_w4a16(dc, tmp_path, monkeypatch):
    assert _checked(dc, tmp_path, dc.check_w4a16) == []
    good = dc.BK.W4.w4a16_matmul_triton
    monkeypatch.setattr(dc.BK.W4, "w4a16_matmul_triton", lambda *a, **k: good(*a, **k) * 1.01)  # a scale 1% off
    failures = _checked(dc, tmp_path, dc.check_w4a16)
    assert failures and all("W4A16" in f for f in failures)


def test_part1_catches_a_cache_read_past_length(dc, tmp_path, monkeypatch):
    good = dc.BK.MLA.mla_decode_triton
    monkeypatch.setattr(dc.BK.MLA, "mla_decode_triton",
                        lambda q, qr, lat, kr, length, scale, **k: good(q, qr, lat, kr, lat.shape[1], scale, **k))
    failures = _checked(dc, tmp_path, dc.check_mla)
    assert any("NaN positions differ" in f for f in failures)


def test_part1_catches_a_moe_that_keeps_other_ranks_picks(dc, tmp_path, monkeypatch):
    good = dc.BK.MOE.fused_moe_triton
    monkeypatch.setattr(dc.BK.MOE, "fused_moe_triton",
                        lambda *a, expert_offset=0, **k: good(*a[:2], a[2] % a[3].shape[0], *a[3:], expert_offset=0, **k))
    assert any("fused MoE" in f for f in _checked(dc, tmp_path, dc.check_moe))


def test_router_flip_is_a_near_tie_only_when_its_input_agrees(dc, tmp_path):
    x = torch.randn(4, 8)
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    flipped = ids.clone()
    flipped[2] = torch.tensor([0, 3])
    a = {1: (x, ids), 2: (x, ids)}
    assert dc.first_flip(a, a, 4) is None
    b = {1: (x, ids), 2: (x + 1e-4, flipped)}
    assert dc.first_flip(a, b, 4) == (2, 2) and dc.first_flip(a, b, 2) is None
    run = dc.Run(tmp_path / "r.md", budget_s=60)
    assert "near-tie" in dc.near_tie(run, "noise", (2, 2), a, b) and run.failures == []
    c = {1: (x, ids), 2: (x + 1.0, flipped)}  # the router's input itself is wrong: a bug, not a tie
    assert "beyond bf16 tolerance" in dc.near_tie(run, "bug", (2, 2), a, c) and run.failures
