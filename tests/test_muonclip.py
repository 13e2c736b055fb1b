"""MuonClip (kimi_ref/muonclip.py): Newton–Schulz, the Muon and AdamW updates, QK-Clip on MLA weights.

Oracles and peers: Newton–Schulz against float64 numpy (an SVD, then the quintic applied to the
singular values); AdamW against torch.optim.AdamW; QK-Clip against the logits of a small MLA-shaped
module built here (so these tests do not depend on kimi_ref/mla.py), recomputed after the clip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from kimi_ref.muonclip import (NS_COEFFICIENTS, MuonClip, is_muon_param, newton_schulz, qk_clip_, qk_clip_model_,
                               track_max_logits)
from tolerances import RTOL, assert_close


def ns_oracle(g: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    """float64: the quintic acts on singular values only, so NS(G) = U·f(S/||S||)·Vᵀ."""
    u, s, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    x = s / (np.sqrt((s ** 2).sum()) + eps)
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return (u * x) @ vt


def matrix_with_spectrum(rows: int, cols: int, seed: int, cond: float, scale: float) -> torch.Tensor:
    """A random [rows, cols] matrix whose singular values lie in [scale/cond, scale]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = scale * torch.exp(-torch.rand(k, generator=gen, dtype=torch.float64) * math.log(cond))
    return ((u * s) @ v.T).float()


# ---- Newton–Schulz ----------------------------------------------------------------------------------------

@given(rows=st.integers(2, 40), cols=st.integers(2, 40), seed=st.integers(0, 2 ** 16),
       cond=st.floats(1.0, 10.0), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_newton_schulz_orthogonalizes(rows, cols, seed, cond, scale):
    g = matrix_with_spectrum(rows, cols, seed, cond, scale)
    out = newton_schulz(g)
    assert out.dtype == torch.float32 and out.shape == g.shape
    assert_close(out, ns_oracle(g.numpy()), torch.float32, what="Newton–Schulz vs float64 oracle")
    # singular values near 1 (this quintic lands them in about [0.68, 1.21], by design), singular
    # vectors those of g: Uᵀ·NS(g)·V is diagonal
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.68 and sv.max() < 1.21, sv
    u, _, vt = torch.linalg.svd(g.double(), full_matrices=False)
    core = u.T @ out.double() @ vt.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-4


def test_newton_schulz_bf16_input_and_errors():
    g = matrix_with_spectrum(8, 24, 0, 4.0, 1.0)
    assert_close(newton_schulz(g.to(torch.bfloat16)), ns_oracle(g.to(torch.bfloat16).float().numpy()),
                 torch.float32, what="NS of a bf16 matrix (computed in fp32)")
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(2, 3, 4\)"):
        newton_schulz(torch.zeros(2, 3, 4))
    assert torch.equal(newton_schulz(torch.zeros(3, 5)), torch.zeros(3, 5))  # no NaN from 0/0


# ---- the updates -------------------------------------------------------------------------------------------

def test_parameter_groups():
    names = {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4),
             "model.layers.0.self_attn.q_b_proj.weight": (12, 6), "model.layers.0.mlp.gate.weight": (8, 4),
             "model.layers.0.input_layernorm.weight": (4,), "model.norm.weight": (4,), "x.bias": (3,)}
    params = [(n, nn.Parameter(torch.zeros(shape))) for n, shape in names.items()]
    opt = MuonClip(params, lr=1e-3)
    assert opt.kinds == {
        "model.embed_tokens.weight": "adamw", "lm_head.weight": "adamw",
        "model.layers.0.self_attn.q_b_proj.weight": "muon", "model.layers.0.mlp.gate.weight": "muon",
        "model.layers.0.input_layernorm.weight": "adamw_no_decay", "model.norm.weight": "adamw_no_decay",
        "x.bias": "adamw_no_decay"}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert is_muon_param("a.weight", torch.zeros(2, 2)) and not is_muon_param("a.weight", torch.zeros(2))


def test_muon_step_matches_formula():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 20, generator=gen)
    grads = [torch.randn(12, 20, generator=gen) for _ in range(3)]
    p = nn.Parameter(w0.clone())
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = MuonClip([("layer.weight", p)], lr=lr, momentum=mu, weight_decay=wd)
    w, m = w0.double(), torch.zeros(12, 20, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m = mu * m + g.double()
        update = torch.from_numpy(ns_oracle(m.numpy())) * 0.2 * math.sqrt(20)
        w = w - lr * (update + wd * w)
        assert_close(p.data, w, torch.float32, what="Muon parameter after a step")
    # update RMS matching: without decay the step's RMS is about 0.2·lr
    q = nn.Parameter(torch.zeros(64, 16))
    q.grad = torch.randn(64, 16, generator=gen)
    MuonClip([("q.weight", q)], lr=1.0, weight_decay=0.0).step()
    rms = float(q.data.pow(2).mean().sqrt())
    assert 0.15 < rms < 0.23, rms


def test_nesterov_variant():
    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    p = nn.Parameter(torch.zeros(6, 6))
    opt = MuonClip([("w", p)], lr=1.0, momentum=0.5, weight_decay=0.0, nesterov=True)
    p.grad = g.clone()
    opt.step()  # buffer = g; direction = g + 0.5·g
    expected = -torch.from_numpy(ns_oracle((1.5 * g).double().numpy())) * 0.2 * math.sqrt(6)
    assert_close(p.data, expected, torch.float32, what="Nesterov Muon step")


def test_adamw_matches_torch():
    gen = torch.Generator().manual_seed(2)
    ours = {"embed_tokens.weight": nn.Parameter(torch.randn(10, 4, generator=gen)),
            "norm.weight": nn.Parameter(torch.ones(4))}
    peer = {n: nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    opt = MuonClip(list(ours.items()), lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    torch_opt = torch.optim.AdamW([{"params": [peer["embed_tokens.weight"]], "weight_decay": 0.1},
                                   {"params": [peer["norm.weight"]], "weight_decay": 0.0}],
                                  lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        for name in ours:
            g = torch.randn(ours[name].shape, generator=gen)
            ours[name].grad, peer[name].grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        for name in ours:
            assert_close(ours[name].data, peer[name].data, torch.float32, what=f"AdamW {name}")


def test_optimizer_errors():
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="a module or \\(name, parameter\\) pairs"):
        MuonClip([p])
    with pytest.raises(ValueError, match="a module or"):
        MuonClip([])
    with pytest.raises(ValueError, match="momentum=1.5"):
        MuonClip([("w", p)], momentum=1.5)
    with pytest.raises(ValueError, match="x.weight: Muon needs a 2-D matrix, got shape \\(2, 2, 2\\)"):
        MuonClip([("x.weight", nn.Parameter(torch.zeros(2, 2, 2)))], muon_filter=lambda n, t: True)
    with pytest.raises(ValueError, match="needs the model"):
        MuonClip([("w", p)], tau=10.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        MuonClip(nn.Linear(2, 2), tau=0.0, head_dims=(1, 1, 1))
    with pytest.raises(ValueError, match="pass config=KimiConfig or head_dims"):
        MuonClip(nn.Linear(2, 2), tau=10.0)


# ---- QK-Clip on an MLA-shaped module -------------------------------------------------------------------------

class ToyMLA(nn.Module):
    """MLA's projections and logits (no RoPE rotation: it is orthogonal per position and commutes with
    row scaling). logits[b,h,t,s] = scale·(q_nope[t,h]·k_nope[s,h] + q_rope[t,h]·k_rope[s])."""

    def __init__(self, d=16, heads=4, nope=8, rope=4, value=6, q_rank: int | None = 12, latent=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.nope, self.rope, self.value, self.latent = heads, nope, rope, value, latent
        if q_rank is None:
            self.q_proj = nn.Linear(d, heads * (nope + rope), bias=False)
        else:
            self.q_a_proj = nn.Linear(d, q_rank, bias=False)
            self.q_b_proj = nn.Linear(q_rank, heads * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, latent + rope, bias=False)
        self.kv_b_proj = nn.Linear(latent, heads * (nope + value), bias=False)
        self.o_proj = nn.Linear(heads * value, d, bias=False)
        self.scale = (nope + rope) ** -0.5
        self.track_max_logit, self.max_logit = False, None

    def logits_and_values(self, x):
        b, t, _ = x.shape
        q_in = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_proj(x))
        q = q_in.view(b, t, self.heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).view(b, t, self.heads, self.nope + self.value)
        k_nope, v = kv.split([self.nope, self.value], dim=-1)
        logits = (torch.einsum("bthn,bshn->bhts", q_nope, k_nope)
                  + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)) * self.scale
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return logits.masked_fill(~causal, float("-inf")), v

    def forward(self, x):
        logits, v = self.logits_and_values(x)
        if self.track_max_logit:
            self.max_logit = logits.detach().float().amax(dim=(0, 2, 3))
        out = torch.einsum("bhts,bshv->bthv", logits.softmax(-1), v)
        return self.o_proj(out.flatten(2))


def _max_logits(attn, x):
    with torch.no_grad():
        return attn.logits_and_values(x)[0].amax(dim=(0, 2, 3))


@pytest.mark.parametrize("q_rank", [12, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_clip_brings_exploding_head_under_tau(q_rank, dtype):
    attn = ToyMLA(q_rank=q_rank).to(dtype)
    q = attn.q_b_proj if q_rank is not None else attn.q_proj
    with torch.no_grad():
        q.weight[1 * 12:2 * 12] *= 40  # head 1 explodes (rows h·(nope+rope) ... per head)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    track_max_logits(attn)
    attn(x)
    before = attn.max_logit.clone()
    tau = 0.5 * float(before[1])
    assert before[1] > tau and (before[[0, 2, 3]] < tau).all()
    saved = {n: p.detach().clone() for n, p in attn.named_parameters()}

    gamma = qk_clip_(attn, tau, head_dims=(8, 4, 6))
    assert torch.equal(gamma[[0, 2, 3]], torch.ones(3)) and abs(float(gamma[1]) - 0.5) < 1e-6
    after = _max_logits(attn, x).float()
    # head 1's logits are exactly γ times what they were: its max is now τ
    assert abs(float(after[1]) - tau) <= RTOL[dtype] * 10 * tau
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]].to(after.dtype))  # other heads: bit for bit

    # exactly the per-head rows of head 1 changed, by sqrt(γ) (nope) and γ (rope)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, saved["kv_a_proj_with_mqa.weight"])  # shared k_rope
    q_name = "q_b_proj.weight" if q_rank is not None else "q_proj.weight"
    q_new, q_old = q.weight.view(4, 12, -1).float(), saved[q_name].view(4, 12, -1).float()
    kv_new, kv_old = attn.kv_b_proj.weight.view(4, 14, -1).float(), saved["kv_b_proj.weight"].view(4, 14, -1).float()
    for h in (0, 2, 3):
        assert torch.equal(q_new[h], q_old[h]) and torch.equal(kv_new[h], kv_old[h])
    root = math.sqrt(float(gamma[1]))
    assert_close(q_new[1, :8], q_old[1, :8] * root, dtype, what="q_nope rows × sqrt(γ)")
    assert_close(q_new[1, 8:], q_old[1, 8:] * float(gamma[1]), dtype, what="q_rope rows × γ")
    assert_close(kv_new[1, :8], kv_old[1, :8] * root, dtype, what="k_nope rows × sqrt(γ)")
    assert torch.equal(kv_new[1, 8:], kv_old[1, 8:])  # value rows untouched
    if q_rank is not None:
        assert torch.equal(attn.q_a_proj.weight, saved["q_a_proj.weight"])
    assert torch.equal(attn.o_proj.weight, saved["o_proj.weight"])


def test_qk_clip_leaves_a_calm_model_alone():
    attn = ToyMLA()
    track_max_logits(attn)
    attn(torch.randn(1, 5, 16))
    saved = {n: p.detach().clone() for n, p in attn.named_parameters()}
    gamma = qk_clip_(attn, float(attn.max_logit.max()) + 1.0, head_dims=(8, 4, 6))
    assert torch.equal(gamma, torch.ones(4))
    assert all(torch.equal(p, saved[n]) for n, p in attn.named_parameters())


def test_qk_clip_errors():
    attn = ToyMLA()
    with pytest.raises(ValueError, match="has no max_logit: set track_max_logit=True"):
        qk_clip_(attn, 10.0, head_dims=(8, 4, 6))
    with pytest.raises(ValueError, match=r"q_b_proj/q_proj.weight has 48 rows; max_logit has 3 heads of 12 rows"):
        qk_clip_(attn, 10.0, head_dims=(8, 4, 6), max_logit=torch.ones(3))
    with pytest.raises(ValueError, match=r"kv_b_proj.weight has 56 rows; .* 4 heads of 12 rows each, so 48"):
        qk_clip_(attn, 10.0, head_dims=(8, 4, 4), max_logit=torch.ones(4))
    with pytest.raises(ValueError, match=r"NaN \(heads \[2\]\)"):
        qk_clip_(attn, 10.0, head_dims=(8, 4, 6), max_logit=torch.tensor([1.0, 1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="tau must be > 0"):
        qk_clip_(attn, -1.0, head_dims=(8, 4, 6), max_logit=torch.ones(4))
    with pytest.raises(ValueError, match="needs q_b_proj"):
        qk_clip_(nn.Linear(2, 2), 1.0, head_dims=(1, 1, 1), max_logit=torch.ones(1))
    with pytest.raises(ValueError, match="no attention module with a recorded max_logit"):
        qk_clip_model_(nn.Sequential(ToyMLA()), 10.0, head_dims=(8, 4, 6))


# ---- training ---------------------------------------------------------------------------------------------------

class ToyLM(nn.Module):
    """embed -> norm -> MLA -> norm -> MLP -> lm_head: every kind of parameter MuonClip sorts."""

    def __init__(self, vocab=24, d=16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.attn_norm = nn.RMSNorm(d)
        self.self_attn = ToyMLA(d=d, seed=1)
        self.mlp_norm = nn.RMSNorm(d)
        self.up = nn.Linear(d, 32)
        self.down = nn.Linear(32, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.self_attn(self.attn_norm(h))
        h = h + self.down(torch.relu(self.up(self.mlp_norm(h))))
        return self.lm_head(h)


def _train(tau: float | None, steps: int = 60):
    torch.manual_seed(0)
    model = ToyLM()
    data = torch.randint(0, 24, (8, 12), generator=torch.Generator().manual_seed(9))
    track_max_logits(model)
    opt = MuonClip(model, lr=0.02, weight_decay=0.01, tau=tau, head_dims=(8, 4, 6))
    losses, maxima = [], []
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 24), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        maxima.append(float(_max_logits(model.self_attn, model.attn_norm(model.embed_tokens(data[:, :-1]))).max()))
    return losses, maxima, opt


def test_training_decreases_loss_and_qk_clip_caps_logits():
    losses, maxima, opt = _train(tau=None)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert set(opt.kinds.values()) == {"muon", "adamw", "adamw_no_decay"}
    tau = 0.5 * max(maxima)  # a cap the unclipped run would cross
    clipped_losses, clipped_maxima, clipped_opt = _train(tau=tau)
    assert clipped_losses[-1] < 0.5 * clipped_losses[0]
    # The clip uses the maxima of the step's own forward, and the same step also moved the other
    # weights (embeddings, norms), so the logits after the step sit near τ, not exactly under it;
    # without the clip they grow to 2τ.
    assert max(maxima) == 2 * tau and max(clipped_maxima) < 1.15 * tau, (max(clipped_maxima), tau)
    assert set(clipped_opt.clip_factors) == {"self_attn"}
    assert (clipped_opt.clip_factors["self_attn"] <= 1).all()


# ---- the real MLA module (kimi_ref/mla.py), through the track_max_logit contract ----------------------------

@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_qk_clip_on_kimi_mla(mode):
    """The contract of HELPERS.md: MLA(config, mode=, track_max_logit=True) stores max_logit [heads].
    With RoPE applied (q_rope rotated, the shared k_rope rotated) the clipped head's max is τ."""
    mla = pytest.importorskip("kimi_ref.mla")
    from kimi_ref.config import fixture_path, load_config, tiny_config
    from kimi_ref.muonclip import head_dims_of

    config = tiny_config(load_config(fixture_path("kimi_k25")))
    assert head_dims_of(config) == (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    torch.manual_seed(0)
    attn = mla.MLA(config, mode=mode, track_max_logit=True)
    per_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    with torch.no_grad():
        attn.q_b_proj.weight[per_head:2 * per_head] *= 30  # head 1 explodes
    x = torch.randn(2, 6, config.hidden_size, generator=torch.Generator().manual_seed(1))
    attn(x)
    before = attn.max_logit.clone()
    tau = float(before[1]) / 2
    k_rope_weight = attn.kv_a_proj_with_mqa.weight.detach().clone()
    model = nn.ModuleDict({"self_attn": attn})
    gamma = qk_clip_model_(model, tau, head_dims=head_dims_of(config))["self_attn"]
    attn(x)
    assert abs(float(attn.max_logit[1]) - tau) <= 1e-5 * tau
    others = [h for h in range(len(before)) if h != 1]
    assert torch.equal(attn.max_logit[others], before[others]) and torch.equal(gamma[others], torch.ones(len(others)))
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, k_rope_weight)
