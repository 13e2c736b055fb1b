"""SwiGLU MLPs and the mixture of experts: what each decoder layer does after attention.

    swiglu(x [N,d]) = down_proj( silu(gate_proj(x)) ⊙ up_proj(x) )          gate, up [f,d]; down [d,f]

Three kinds in Kimi K2.x (f in brackets):

* **dense MLP** (``mlp`` of the first ``first_k_dense_replace`` layers, layer 0 only) [18432];
* **routed experts** (``mlp.experts.E``, E = 0..383) [2048], stored INT4 (``int4.W4A16Linear``) when
  ``config.quantization`` says so, else ``nn.Linear``;
* **shared expert** (``mlp.shared_experts``) [2048 × n_shared_experts], bf16, seen by every token.

The MoE (every later layer):

    weights [N,k], ids [N,k] = router(x)                        (router.py; weights already × 2.827)
    moe(x)[n] = Σ_j weights[n,j] · expert_{ids[n,j]}(x[n])  +  shared_experts(x[n])

**Dispatch / combine.** Looping over tokens would run N·k tiny matmuls. Instead the N·k (token, expert)
picks are sorted by expert, so each expert's tokens sit in one contiguous run: one matmul per expert
over its run (*dispatch*), then each result row, times its routing weight, is added back into its
token's row (*combine*, ``index_add_``). The sum is accumulated in fp32.

**Tensor parallelism** (``parallel.py``): a rank holds whole experts, [r·E/N, (r+1)·E/N), and only
those are in ``experts`` (a ModuleDict keyed by the *global* expert index); picks of other ranks'
experts contribute nothing here. The shared expert and the dense MLP are split Megatron-style
(gate/up by rows, down by columns), so every rank holds a partial sum; routed and shared partial
sums meet in **one** ``all_reduce``.

**Kernels.** With a ``kernel`` (``kernels.fused_moe``, handed over by :mod:`kimi_ref.backend`) the routed
part goes to it when all of
this rank's experts are INT4 and form one contiguous range (their packed buffers are stacked once,
and each expert's buffers become views of its row: see ``MoE._stacked_int4``); otherwise the torch
path below runs (it is the reference).

Float64 twin: ``kimi_ref/oracle/experts.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_ref import parallel
from kimi_ref.config import KimiConfig
from kimi_ref.int4 import W4A16Linear, quantize
from kimi_ref.parallel import SINGLE, TP
from kimi_ref.router import Router

__all__ = ["SwiGLU", "DenseMLP", "MoE", "routed_expert"]

_PROJS = ("gate_proj", "up_proj", "down_proj")
_STACKED = tuple((p, buf) for p in _PROJS for buf in ("weight_packed", "weight_scale"))  # fused_moe's argument order


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` [.., d] -> [.., d]; under TP a partial sum (the caller all-reduces).

    ``tp`` splits the width f (gate/up rows, down columns); routed experts pass ``SINGLE``: a rank
    holds them whole. ``quantized`` names the projections stored as INT4 (``W4A16Linear``).
    """

    def __init__(self, hidden: int, width: int, *, tp: TP = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, quantized: frozenset[str] = frozenset(), group_size: int = 32,
                 what: str = "SwiGLU width"):
        super().__init__()
        f = tp.local(width, what)

        def linear(name: str, fan_in: int, fan_out: int) -> nn.Module:
            if name in quantized:
                layer = W4A16Linear(fan_in, fan_out, group_size=group_size, device=device)
                if layer.weight_packed.device.type != "meta":
                    # fresh buffers pack q = -8 everywhere (a weight of -8): start from a quantized random init
                    dense = nn.Linear(fan_in, fan_out, bias=False, device=device).weight.detach()
                    packed, scale = quantize(dense.to(dtype), group_size)
                    layer.weight_packed.copy_(packed)
                    layer.weight_scale.copy_(scale)
                return layer
            return nn.Linear(fan_in, fan_out, bias=False, dtype=dtype, device=device)

        self.gate_proj = linear("gate_proj", hidden, f)
        self.up_proj = linear("up_proj", hidden, f)
        self.down_proj = linear("down_proj", f, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(SwiGLU):
    """The dense MLP of the first ``first_k_dense_replace`` layers: a SwiGLU of width intermediate_size
    whose TP partial sums are all-reduced here."""

    def __init__(self, config: KimiConfig, *, tp: TP = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__(config.hidden_size, config.intermediate_size, tp=tp, dtype=dtype, device=device,
                         what="intermediate_size (dense MLP)")
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel.all_reduce(super().forward(x), self.tp)


def routed_expert(config: KimiConfig, layer: int, expert: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> SwiGLU:
    """Routed expert ``expert`` of layer ``layer``: INT4 projections wherever the quantization config says."""
    q = config.quantization
    names = ("gate_proj", "up_proj", "down_proj")
    quantized = frozenset() if q is None else frozenset(
        n for n in names if q.is_quantized(f"model.layers.{layer}.mlp.experts.{expert}.{n}"))
    return SwiGLU(config.hidden_size, config.moe_intermediate_size, dtype=dtype, device=device, quantized=quantized,
                  group_size=q.group_size if q is not None else 32)


class MoE(nn.Module):
    """Router + this rank's routed experts + the shared expert: [B,T,d] or [N,d] -> the same shape."""

    def __init__(self, config: KimiConfig, layer: int, *, tp: TP = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config, self.layer, self.tp = config, layer, tp
        self.kernel, self.backend = None, "torch"
        self.gate = Router(config, dtype=dtype, device=device)
        start, size = tp.split(config.n_routed_experts, "n_routed_experts")
        self.experts = nn.ModuleDict(
            {str(e): routed_expert(config, layer, e, dtype=dtype, device=device) for e in range(start, start + size)})
        if config.n_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                         tp=tp, dtype=dtype, device=device,
                                         what="moe_intermediate_size × n_shared_experts (shared expert)")
        else:
            self.shared_experts = None
        self._stacked: tuple[int, tuple[torch.Tensor, ...]] | None = None  # see _stacked_int4
        self._stacked_experts: list[nn.Module] = []
        self._restack = False
        self.register_load_state_dict_post_hook(MoE._loaded)

    # ---- the routed part, two ways -----------------------------------------------------------------

    def routed_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[n,j] · expert_{ids[n,j]}(x[n]) over this rank's experts, fp32 [N,d]."""
        n, k = ids.shape
        out = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        flat_ids = ids.flatten()  # pick p = n·k + j
        order = torch.argsort(flat_ids, stable=True)  # picks grouped by expert, tokens in order within each
        counts = torch.bincount(flat_ids, minlength=self.config.n_routed_experts)
        ends = counts.cumsum(0).tolist()
        token_of_pick = order // k
        weight_of_pick = weights.flatten()[order]
        for e in counts.nonzero().flatten().tolist():  # only experts that got tokens (8 of 384 in decode)
            expert = self.experts[str(e)] if str(e) in self.experts else None
            if expert is None:
                continue  # another rank's expert: its share arrives through the all-reduce
            run = slice(ends[e] - int(counts[e]), ends[e])  # this expert's picks, contiguous after the sort
            tokens = token_of_pick[run]
            y = expert(x[tokens])  # dispatch: one matmul over every token routed here
            out.index_add_(0, tokens, y.float() * weight_of_pick[run, None])  # combine (a token picks e once)
        return out

    def _stacked_int4(self) -> tuple[int, tuple[torch.Tensor, ...]] | None:
        """(expert_offset, stacked packed/scale buffers [E, ...]) for fused_moe, or None if the kernel cannot serve.

        The first call stacks this rank's experts into six [E, ...] tensors and points every expert's
        buffers at its row of them, so the weights exist once: a stacked *copy* would double the experts'
        memory (71 GB per rank at TP 8, on a 141 GB H200), and a write into an expert's buffer
        (``load_state_dict`` copies in place) lands where the kernel reads. Replacing buffer objects instead
        (``load_state_dict(assign=True)``, ``.to(device)``, ``.float()``) is caught by a post-load hook and a
        check that the first and last buffers still sit where the stack put them, so each call costs O(1)
        rather than a look at all 6·E buffers; assigning a new tensor to one expert's buffer by hand is not
        caught (write into it instead, or load it).
        """
        if self._stacked is not None and not self._restack and self._views_intact():
            return self._stacked
        keys = sorted(int(k) for k in self.experts.keys())
        if not keys or keys != list(range(keys[0], keys[0] + len(keys))):
            return None  # e.g. load_layer with a subset of experts: not one contiguous range
        experts = [self.experts[str(e)] for e in keys]
        if not all(isinstance(getattr(m, p), W4A16Linear) for m in experts for p in _PROJS):
            return None
        stacked = tuple(torch.stack([getattr(getattr(m, p), buf) for m in experts]) for p, buf in _STACKED)
        for i, m in enumerate(experts):
            for (p, buf), whole in zip(_STACKED, stacked):
                setattr(getattr(m, p), buf, whole[i])  # a view: the expert's own buffer is now row i of the stack
        self._stacked, self._stacked_experts, self._restack = (keys[0], stacked), list(self.experts.values()), False
        return self._stacked

    def _views_intact(self) -> bool:
        offset, stacked = self._stacked
        if len(self.experts) != len(self._stacked_experts) or any(
                a is not b for a, b in zip(self.experts.values(), self._stacked_experts)):
            return False  # an expert module was added, removed or replaced
        first = self.experts[str(offset)].gate_proj.weight_packed
        last = self.experts[str(offset + stacked[0].shape[0] - 1)].down_proj.weight_scale
        return first.data_ptr() == stacked[0].data_ptr() and last.data_ptr() == stacked[-1][-1].data_ptr()

    @staticmethod
    def _loaded(module: "MoE", incompatible_keys) -> None:
        module._restack = True  # load_state_dict may have assigned new buffers: check them all on the next call

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            stacked = self._stacked_int4()
            if stacked is not None:
                offset, (gp, gs, up, us, dp, ds) = stacked
                return self.kernel(x, weights, ids, gp, gs, up, us, dp, ds, expert_offset=offset)
        return self.routed_torch(x, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"MoE (layer {self.layer}): input has {x.shape[-1]} features, "
                             f"expected hidden_size {self.config.hidden_size}")
        flat = x.reshape(-1, x.shape[-1])  # the MoE sees tokens, not sequences
        weights, ids = self.gate(flat)
        out = self.routed(flat, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat).float()  # unscaled: routed_scaling_factor is for routed only
        # One all-reduce joins other ranks' experts and the shared expert's partial sums (fp32 on the wire:
        # summing bf16 partials would round once per rank).
        out = parallel.all_reduce(out, self.tp)
        return out.to(x.dtype).view(x.shape)

    def extra_repr(self) -> str:
        keys = [int(k) for k in self.experts.keys()]
        span = f"{min(keys)}..{max(keys)}" if keys else "none"
        return f"layer={self.layer}, local_experts={len(keys)} ({span}), backend={self.backend!r}"
