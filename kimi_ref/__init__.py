"""kimi_ref: Kimi K2.x (K2.7-Code) from scratch — a float64 oracle, a readable torch model, Triton kernels.

    import kimi_ref
    model = kimi_ref.load_model(path, device="cpu", dtype=torch.float32)
    logits = model(input_ids)                                  # [B, T] -> [B, T, vocab]
    logits_np = kimi_ref.oracle.forward(path, input_ids_np)     # the float64 numpy oracle

Submodules load on first use, so ``import kimi_ref`` stays cheap (the oracle never imports torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "config", "bpe", "tokenizer", "chat_template", "tool_declarations", "tool_parsing", "norms", "rope", "mla",
    "router", "experts", "int4", "backend", "media", "moonvit", "tools", "model", "checkpoint", "parallel",
    "generate", "control", "session", "chat", "serve", "oracle", "kernels", "muonclip", "launch", "checkpoint_chat", "template_proof",
    "tolerances",
}


def load_model(path: Any, device: Any = "cpu", dtype: Any = None, **kwargs: Any) -> Any:
    """Load a checkpoint directory (config.json + safetensors, either layout) as a ``KimiForCausalLM``.

    See :func:`kimi_ref.checkpoint.load_model` for the options (tensor parallelism, backend, MLA form).
    """
    return importlib.import_module(".checkpoint", __name__).load_model(path, device=device, dtype=dtype, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kimi_ref' has no attribute {name!r}")
