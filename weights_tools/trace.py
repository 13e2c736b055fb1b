"""Record every named activation of one forward pass — kimi_ref, the float64 oracle or HF — into one file.

    python -m weights_tools.trace CKPT (--prompt TEXT | --ids 5,17,300) --out FILE [--force]
        [--dtype float32|bfloat16|float16] [--backend torch|triton] [--tp N] [--mla-mode absorbed|naive]
        [--device cpu|cuda]                     kimi_ref (the default)
        --oracle                                 the float64 numpy oracle (kimi_ref/oracle/)
        --hf                                     HF transformers' DeepseekV3ForCausalLM (needs transformers)

    trace_kimi(ckpt, ids, ...) / trace_oracle(ckpt, ids) / trace_hf(ckpt, ids, dtype) -> {name: Tensor}

The names and the file are described in ``weights_tools/trace_file.py`` and docs/numerics.md; compare
two traces with ``python -m weights_tools.diff A B``. kimi_ref and HF are observed through forward
hooks on their own modules, so the model code is exactly what runs without a trace; the oracle takes a
``record`` callback. ``router_scores`` of kimi_ref is the gate's first step, ``sigmoid(x·Wᵀ)`` in fp32,
recomputed from the input the gate received (``route`` does not return it). Under ``--tp N`` rank 0
records: every recorded activation is whole there (after its all-reduce or all-gather).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from weights_tools.safe_write import OutputError, check_file
from weights_tools.trace_file import DTYPES, TraceError, canonical_order, save_trace

__all__ = ["trace_kimi", "trace_oracle", "trace_hf", "record_kimi", "prompt_ids", "main"]


# ---- hooks -------------------------------------------------------------------------------------------------


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _get(module, path: str):
    """The submodule at ``path`` ("self_attn.q_a_layernorm"), or None (a dense layer has no ``mlp.gate``)."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


LAYER_MODULES = (("attn_in", "input_layernorm"), ("q_latent", "self_attn.q_a_layernorm"),
                 ("kv_latent", "self_attn.kv_a_layernorm"), ("attn_out", "self_attn"),
                 ("mlp_in", "post_attention_layernorm"), ("mlp_out", "mlp"), ("residual", ""))


def _record_forward(inner, run, batch_shape, scores_of, experts_of) -> dict[str, torch.Tensor]:
    """Hook ``inner``'s (a decoder stack's) modules, ``run()`` the forward once, return what they saw.

    kimi_ref and HF name their modules alike (both follow DeepSeek-V3); the router's two arrays are
    read by ``scores_of(gate, inputs, output)`` and ``experts_of(output)``.
    """
    found: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, inputs, output: found.__setitem__(name, _first(output).detach().clone())

    def router(prefix):
        def hook(gate, inputs, output):
            found[f"{prefix}.router_scores"] = scores_of(gate, inputs, output).reshape(*batch_shape, -1).detach().clone()
            found[f"{prefix}.router_experts"] = experts_of(output).reshape(*batch_shape, -1).long().clone()
        return hook

    handles = [inner.embed_tokens.register_forward_hook(keep("embed")), inner.norm.register_forward_hook(keep("final_norm"))]
    for i, layer in enumerate(inner.layers):
        for act, path in LAYER_MODULES:
            module = _get(layer, path) if path else layer
            if module is not None:
                handles.append(module.register_forward_hook(keep(f"layers.{i}.{act}")))
        gate = _get(layer, "mlp.gate")
        if gate is not None:
            handles.append(gate.register_forward_hook(router(f"layers.{i}")))
    try:
        with torch.inference_mode():
            found["logits"] = run().detach().clone()
    finally:
        for h in handles:
            h.remove()
    return {name: found[name].cpu() for name in canonical_order(found)}


# ---- kimi_ref ----------------------------------------------------------------------------------------------


def record_kimi(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` (a KimiForCausalLM) on ``ids`` [B,T] once and return every named activation."""
    return _record_forward(model.model, lambda: model(ids), tuple(ids.shape),
                           # route()'s first line, fp32, from the input the gate received
                           lambda gate, inputs, output: torch.sigmoid(inputs[0].float() @ gate.weight.float().T),
                           lambda output: output[1])


def _kimi_rank(tp, device, ckpt: str, ids: list[list[int]], dtype: str, backend: str, mla_mode: str):
    """One tensor-parallel rank (module level: spawned workers import it); rank 0 returns the trace."""
    import kimi_ref

    model = kimi_ref.load_model(ckpt, device=device, dtype=DTYPES[dtype], tp=tp, mla_mode=mla_mode, backend=backend,
                                progress=False)
    found = record_kimi(model, torch.tensor(ids, device=device))
    return found if tp.rank == 0 else None


def trace_kimi(ckpt: str | Path, ids: list[list[int]], *, dtype: str = "float32", backend: str = "torch", tp: int = 1,
               mla_mode: str = "absorbed", device: str = "cpu") -> dict[str, torch.Tensor]:
    """kimi_ref's activations for ``ids`` (the chat's own loader, ``tp`` ranks launched as the chat does)."""
    from kimi_ref.launch import launch

    return launch(_kimi_rank, tp, device, str(ckpt), ids, dtype, backend, mla_mode)


# ---- the oracle ----------------------------------------------------------------------------------------------


def trace_oracle(ckpt: str | Path, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """The float64 oracle's activations for ``ids``, through its ``record`` callback."""
    from kimi_ref.oracle import checkpoint, model

    config, weights = checkpoint.load_weights(ckpt)
    found: dict[str, torch.Tensor] = {}

    def record(name: str, value: np.ndarray) -> None:
        found[name] = torch.from_numpy(np.array(value, dtype=np.int64 if name.endswith("experts") else np.float64))

    model.logits(np.asarray(ids), weights, config, record=record)
    return found


# ---- HF transformers ---------------------------------------------------------------------------------------


def trace_hf(ckpt: str | Path, ids: list[list[int]], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """HF DeepseekV3's activations for ``ids`` (see ``weights_tools/hf_peer.py`` for how it gets the weights)."""
    from weights_tools.hf_peer import hf_model

    model = hf_model(ckpt, DTYPES[dtype])
    x = torch.tensor(ids)
    # HF's gate returns (router_logits, weights, indices); its scores are the logits' sigmoid
    return _record_forward(model.model, lambda: model(x).logits, tuple(x.shape),
                           lambda gate, inputs, output: torch.sigmoid(output[0].float()), lambda output: output[2])


# ---- the command line ----------------------------------------------------------------------------------------


def prompt_ids(ckpt: str | Path, prompt: str | None, ids: str | None) -> list[list[int]]:
    """[[token ids]] from ``--ids 1,2,3`` or from ``--prompt`` through the checkpoint's own tokenizer."""
    if (prompt is None) == (ids is None):
        raise TraceError("give exactly one of --prompt TEXT and --ids 1,2,3")
    if ids is not None:
        try:
            values = [int(v) for v in ids.split(",") if v.strip()]
        except ValueError:
            raise TraceError(f"--ids must be comma-separated integers, found {ids!r}") from None
        if not values:
            raise TraceError("--ids holds no token ids")
        return [values]
    from kimi_ref.tokenizer import Tokenizer

    if not (Path(ckpt) / "tiktoken.model").is_file():
        raise TraceError(f"{ckpt}: no tiktoken.model to turn --prompt into tokens; pass --ids 1,2,3 instead")
    values = Tokenizer.from_pretrained(ckpt).encode(prompt)
    if not values:
        raise TraceError("--prompt is empty: it gives no tokens")
    return [values]


def _versions() -> dict[str, str]:
    import kimi_ref

    out = {"kimi_ref": kimi_ref.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_tools.trace", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--prompt", help="text, tokenized with the checkpoint's tiktoken.model")
    p.add_argument("--ids", help="token ids instead of a prompt, e.g. 5,17,300")
    p.add_argument("--out", required=True, help="the trace file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--oracle", action="store_true", help="trace the float64 numpy oracle")
    who.add_argument("--hf", action="store_true", help="trace HF transformers' DeepseekV3ForCausalLM")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of kimi_ref or HF (default float32)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"], help="kimi_ref kernels (default torch)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for kimi_ref (default 1)")
    p.add_argument("--mla-mode", default="absorbed", choices=["absorbed", "naive"], help="kimi_ref MLA form")
    p.add_argument("--device", default="cpu", help="cpu or cuda (kimi_ref only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kimi_ref.checkpoint import CheckpointError
    from kimi_ref.config import ConfigError
    from kimi_ref.launch import LaunchError
    from kimi_ref.parallel import TPError
    from kimi_ref.tokenizer import TokenizerError
    from weights_tools.hf_peer import PeerError

    try:
        try:  # before the forward, not after it; never into the checkpoint being read
            out = check_file(args.out, force=args.force, protect=[args.ckpt], what="--out")
        except OutputError as err:
            raise TraceError(str(err)) from None
        if (args.oracle or args.hf) and (args.backend != "torch" or args.tp != 1 or args.device != "cpu"):
            raise TraceError("--backend, --tp and --device are kimi_ref's; the oracle and HF run on the CPU alone")
        if args.oracle and args.dtype != "float32":
            raise TraceError("--dtype does not apply to --oracle: the oracle is float64")
        ids = prompt_ids(args.ckpt, args.prompt, args.ids)
        header = {"checkpoint": str(Path(args.ckpt).resolve()), "prompt": args.prompt, "input_ids": ids,
                  "versions": _versions()}
        if args.oracle:
            tensors = trace_oracle(args.ckpt, ids)
            header.update(source="oracle", dtype="float64")
        elif args.hf:
            tensors = trace_hf(args.ckpt, ids, args.dtype)
            header.update(source="hf", dtype=args.dtype)
        else:
            tensors = trace_kimi(args.ckpt, ids, dtype=args.dtype, backend=args.backend, tp=args.tp,
                                 mla_mode=args.mla_mode, device=args.device)
            header.update(source="kimi_ref", dtype=args.dtype, backend=args.backend, tp=args.tp, mla_mode=args.mla_mode)
            if args.backend == "triton":
                from kimi_ref import kernels

                # without a GPU (or TRITON_INTERPRET=1) each kernel call runs its torch fallback: say which ran
                header["kernels"] = "triton" if kernels.available() else "torch fallback (triton cannot run here)"
                if args.dtype == "float32" and torch.device(args.device).type == "cuda":
                    header["precision"] = "tf32"  # the kernels' tl.dot on fp32 inputs (kimi_ref/kernels/_runtime.py)
        save_trace(out, tensors, header, force=args.force)
    except (TraceError, CheckpointError, ConfigError, LaunchError, TPError, TokenizerError, PeerError, OSError,
            ValueError) as err:
        print(f"trace: error: {err}", file=sys.stderr)
        return 2
    layers = {n.split(".")[1] for n in tensors if n.startswith("layers.")}
    print(f"wrote {out}: {len(tensors)} activations ({len(layers)} layers) of {header['source']} "
          f"({header['dtype']}) for {len(ids[0])} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
