"""MuonClip: Muon for weight matrices, AdamW for the rest, and QK-Clip for MLA (Kimi K2, arXiv 2507.20534).

Place in the project: the optimizer that trains kimi-nano (``weights_tools.train_nano``); the real K2
was pre-trained with it. Nothing here runs at inference.

**Muon** (one 2-D weight ``W`` [n, m], gradient ``G``, momentum ``μ``, learning rate ``η``, decay ``λ``)::

    M_t = μ·M_{t-1} + G_t                                 momentum buffer [n, m]
    O_t = NS(M_t) · 0.2·sqrt(max(n, m))                   NS ≈ U·Vᵀ of M_t = U·S·Vᵀ (the polar factor)
    W_t = W_{t-1} − η·(O_t + λ·W_{t-1})                   decoupled weight decay

``NS`` is five Newton–Schulz steps with the quintic ``X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X``, (a, b, c) =
(3.4445, −4.7750, 2.0315), after ``X = M / ||M||_F``. Each step maps every singular value σ to
``a·σ + b·σ³ + c·σ⁵`` and keeps the singular vectors, so the result is ``U·f(S)·Vᵀ`` with ``f(σ)``
pushed into roughly [0.7, 1.2] for every σ that is not tiny — "orthogonalized", not exactly orthogonal
(these coefficients trade exactness for speed). An orthogonal [n, m] matrix has RMS 1/sqrt(max(n, m)),
so the factor 0.2·sqrt(max(n, m)) gives updates of RMS ≈ 0.2, the typical RMS of an AdamW update:
AdamW's learning rate and weight decay carry over unchanged (Moonlight's "update RMS matching").

**AdamW** for embeddings, ``lm_head`` (their rows are looked up or scored one by one: an
orthogonalized update would mix tokens), and every 1-D parameter (RMSNorm weights, biases; these get no
weight decay: pulling a norm's gain towards 0 is not regularization).

**QK-Clip** (after each step; τ = 100 for K2). Attention logits can grow without bound under Muon. For
each head ``h`` whose largest scaled pre-softmax logit ``S_h`` over the step's batch exceeds τ,
``γ_h = τ / S_h`` and, in MLA::

    q_nope rows of head h (q_b_proj or q_proj)     × sqrt(γ_h)      logit part q_nope·k_nope scales by γ_h
    k_nope rows of head h (kv_b_proj)              × sqrt(γ_h)
    q_rope rows of head h (q_b_proj or q_proj)     × γ_h            logit part q_rope·k_rope scales by γ_h
    k_rope (kv_a_proj_with_mqa)                    never            shared by all heads: scaling it would
                                                                    clip every head for one head's sake
    value rows of kv_b_proj                        never            values are not in the logit

so head ``h``'s logits for the same input become exactly ``γ_h`` times what they were: its max is τ.
Row layouts (per local head, in order): q_b_proj [h × (nope + rope), q_lora_rank]; kv_b_proj
[h × (nope + v), kv_lora_rank]. The MLA module records the maxima when ``track_max_logit`` is True
(``module.max_logit``, fp32 [local heads]); with tensor parallelism each rank clips its own heads.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "is_muon_param", "MuonClip", "qk_clip_", "qk_clip_model_",
           "track_max_logits", "head_dims_of"]

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


# ---- Newton–Schulz -------------------------------------------------------------------------------------

def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize ``g`` [n, m]: ``U·f(S)·Vᵀ`` for ``g = U·S·Vᵀ`` (see the module doc).

    Runs in float32 whatever ``g``'s dtype (the reference path; on a GPU bf16 also works) and returns
    float32. Works on the short side: ``X·Xᵀ`` is [min(n, m)]².
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= the largest singular value: all σ start in [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


# ---- which parameters get Muon ------------------------------------------------------------------------------

_ADAMW_MATRICES = ("embed_tokens.weight", "lm_head.weight")


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """Muon for the hidden 2-D weight matrices; AdamW for embeddings, lm_head and every 1-D tensor.
    The router gate [E, d] is a hidden matrix like any other and gets Muon."""
    return param.ndim == 2 and not name.endswith(_ADAMW_MATRICES)


# ---- the optimizer ---------------------------------------------------------------------------------------------

class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, with QK-Clip after every step when ``tau`` is given.

    ``params``: a module, or ``(name, parameter)`` pairs (``model.named_parameters()``); names decide
    the groups (:func:`is_muon_param`, or ``muon_filter``). ``self.kinds[name]`` is "muon", "adamw" or
    "adamw_no_decay". One learning rate and weight decay for both methods (update RMS matching).

    QK-Clip needs the attention modules: pass a module as ``params`` (or ``attention=model``),
    ``tau``, and the head sizes as ``config`` (a KimiConfig) or ``head_dims=(nope, rope, value)``.
    After each update every module whose ``max_logit`` is set is clipped;
    ``self.clip_factors[module name]`` is that step's γ per head (1 where untouched).
    """

    def __init__(self, params: nn.Module | Iterable[tuple[str, torch.Tensor]], *, lr: float = 2e-4,
                 momentum: float = 0.95, weight_decay: float = 0.1, ns_steps: int = 5, update_rms: float = 0.2,
                 nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 tau: float | None = None, attention: nn.Module | None = None, config=None,
                 head_dims: tuple[int, int, int] | None = None,
                 muon_filter: Callable[[str, torch.Tensor], bool] = is_muon_param):
        if isinstance(params, nn.Module):
            attention = params if attention is None else attention
            named = list(params.named_parameters())
        else:
            named = list(params)
        if not named or not all(isinstance(item, tuple) and len(item) == 2 for item in named):
            raise ValueError("MuonClip takes a module or (name, parameter) pairs, e.g. model.named_parameters()")
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"bad hyperparameters: lr={lr} (> 0), momentum={momentum} (in [0, 1)), "
                             f"weight_decay={weight_decay} (>= 0), ns_steps={ns_steps} (>= 1)")
        self.kinds: dict[str, str] = {}
        groups: dict[str, list] = {"muon": [], "adamw": [], "adamw_no_decay": []}
        names: dict[str, list[str]] = {kind: [] for kind in groups}
        for name, p in named:
            if not p.requires_grad:
                continue
            kind = "muon" if muon_filter(name, p) else ("adamw" if p.ndim >= 2 else "adamw_no_decay")
            if kind == "muon" and p.ndim != 2:
                raise ValueError(f"{name}: Muon needs a 2-D matrix, got shape {tuple(p.shape)}")
            self.kinds[name] = kind
            groups[kind].append(p)
            names[kind].append(name)
        param_groups = [{"params": groups[kind], "names": names[kind], "kind": kind,
                         "weight_decay": 0.0 if kind == "adamw_no_decay" else weight_decay}
                        for kind in groups if groups[kind]]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                        update_rms=update_rms, nesterov=nesterov, betas=betas, eps=eps)
        super().__init__(param_groups, defaults)

        self.tau = tau
        self.attention = attention
        self.clip_factors: dict[str, torch.Tensor] = {}
        if tau is not None:
            if not tau > 0:
                raise ValueError(f"tau must be > 0, got {tau}")
            if attention is None:
                raise ValueError("QK-Clip (tau given) needs the model: pass a module as params or attention=model")
            self.head_dims = head_dims if head_dims is not None else head_dims_of(config)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)
        if self.tau is not None:
            self.clip_factors = qk_clip_model_(self.attention, self.tau, head_dims=self.head_dims)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad.float())
            direction = p.grad.float().add(buf, alpha=mu) if group["nesterov"] else buf
            n, m = p.shape
            update = newton_schulz(direction, group["ns_steps"]) * (group["update_rms"] * math.sqrt(max(n, m)))
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)

    def _adamw(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t, g = state["step"], p.grad.float()
            state["exp_avg"].lerp_(g, 1 - beta1)                              # m = β1·m + (1-β1)·g
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)   # v = β2·v + (1-β2)·g²
            m_hat = state["exp_avg"] / (1 - beta1 ** t)
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
            p.mul_(1 - lr * wd)
            p.add_((m_hat / (v_hat.sqrt() + eps)).to(p.dtype), alpha=-lr)


# ---- QK-Clip ----------------------------------------------------------------------------------------------------

def head_dims_of(config) -> tuple[int, int, int]:
    """(qk_nope_head_dim, qk_rope_head_dim, v_head_dim) from a KimiConfig."""
    if config is None:
        raise ValueError("QK-Clip needs the head sizes: pass config=KimiConfig or head_dims=(nope, rope, value)")
    return config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim


def _scale_rows_(linear: nn.Linear, rows: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply rows ``rows`` [k] of ``linear.weight`` (and bias) by ``factor`` [k], in fp32."""
    for tensor in (linear.weight, linear.bias):
        if tensor is not None:
            shape = (-1,) + (1,) * (tensor.ndim - 1)
            tensor[rows] = (tensor[rows].float() * factor.view(shape)).to(tensor.dtype)


@torch.no_grad()
def qk_clip_(attn: nn.Module, tau: float, *, head_dims: tuple[int, int, int],
             max_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Clip one MLA module in place; return γ [local heads] (1.0 for heads at or under τ).

    ``max_logit`` defaults to ``attn.max_logit`` (the last forward's maxima). The query projection is
    ``attn.q_b_proj`` or, without a q LoRA, ``attn.q_proj``; keys come from ``attn.kv_b_proj``.
    ``attn.kv_a_proj_with_mqa`` (the shared rope key) is never touched.
    """
    nope, rope, value = head_dims
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if max_logit is None:
        max_logit = getattr(attn, "max_logit", None)
    if max_logit is None:
        raise ValueError(f"{type(attn).__name__} has no max_logit: set track_max_logit=True before the forward")
    max_logit = max_logit.detach().float().reshape(-1)
    heads = max_logit.numel()
    q_proj = getattr(attn, "q_b_proj", None)
    if q_proj is None:
        q_proj = getattr(attn, "q_proj", None)
    kv_b = getattr(attn, "kv_b_proj", None)
    if q_proj is None or kv_b is None:
        raise ValueError(f"{type(attn).__name__} needs q_b_proj (or q_proj) and kv_b_proj for QK-Clip")
    for what, linear, per_head in (("q_b_proj/q_proj", q_proj, nope + rope), ("kv_b_proj", kv_b, nope + value)):
        if linear.weight.shape[0] != heads * per_head:
            raise ValueError(f"{what}.weight has {linear.weight.shape[0]} rows; max_logit has {heads} heads of "
                             f"{per_head} rows each, so {heads * per_head} were expected")
    if torch.isnan(max_logit).any():
        raise ValueError(f"max_logit holds NaN (heads {torch.isnan(max_logit).nonzero().flatten().tolist()}): "
                         "the forward diverged; clipping cannot repair it")

    gamma = torch.ones_like(max_logit)
    over = max_logit > tau
    gamma[over] = tau / max_logit[over]
    clipped = over.nonzero().flatten()
    if clipped.numel() == 0:
        return gamma
    g = gamma[clipped]
    dev = q_proj.weight.device
    offsets = torch.arange(nope + rope, device=dev)
    q_rows = (clipped.to(dev)[:, None] * (nope + rope) + offsets).reshape(-1)
    q_factor = torch.where(offsets < nope, g.to(dev)[:, None].sqrt(), g.to(dev)[:, None]).reshape(-1)
    _scale_rows_(q_proj, q_rows, q_factor)  # q_nope × sqrt(γ), q_rope × γ
    dev = kv_b.weight.device
    k_rows = (clipped.to(dev)[:, None] * (nope + value) + torch.arange(nope, device=dev)).reshape(-1)
    _scale_rows_(kv_b, k_rows, g.to(dev).sqrt().repeat_interleave(nope))  # k_nope × sqrt(γ); values untouched
    return gamma


def qk_clip_model_(model: nn.Module, tau: float, *, head_dims: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Clip every attention module of ``model`` whose ``max_logit`` is set; ``{module name: γ}``."""
    factors = {name: qk_clip_(module, tau, head_dims=head_dims) for name, module in model.named_modules()
               if getattr(module, "max_logit", None) is not None and hasattr(module, "kv_b_proj")}
    if not factors:
        raise ValueError("QK-Clip found no attention module with a recorded max_logit: call "
                         "track_max_logits(model) before the forward")
    return factors


def track_max_logits(model: nn.Module, on: bool = True) -> int:
    """Set ``track_max_logit`` on every module that has it; return how many were set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "track_max_logit"):
            module.track_max_logit = on
            count += 1
    return count
