"""Make a tiny checkpoint in exactly the real Kimi layout: ``python -m weights_tools.make_tiny OUT``.

    python -m weights_tools.make_tiny OUT [--layout kimi_k25|flat] [--variant V] [--seed S] [--force]

Everything a real K2.5 / K2.7-Code directory has, at toy size (d = 64, 3 layers, 8 heads, 8 experts top-2,
vocabulary 4096), so that loading, the oracle, the CLI and the chapters exercise the real code paths:

    config.json                     tiny_config(K2.5 fixture) — nested kimi_k25 (or flat kimi_k2, K2-Thinking
                                    style), quantization_config included, every behaviour flag kept
    model.safetensors.index.json    {"metadata": {"total_size"}, "weight_map"}
    model-00001-of-000006…          split like the real one: dense layer 0, one shard per MoE layer,
                                    embed_tokens + norm + lm_head, mm_projector, vision_tower last
                                    (the real files count with 5 digits, then "of" 6: model-00001-of-000064)
    tiktoken.model, tokenizer_config.json   the demo vocabulary (kimi_ref/data/tokenizer; 4096 ids); the
                                    tokenizer config also records the chat template variant
                                    (``kimi_ref_chat_variant``: k2.7-code for kimi_k25, k2-thinking for
                                    flat, or --variant), so the chat never has to guess it
    preprocessor_config.json        (kimi_k25 layout) MoonViT image preprocessing

Weights: routed experts INT4 (compressed-tensors pack-quantized, quantized from bf16 with
``kimi_ref.int4``), everything else bf16, ``e_score_correction_bias`` fp32 and non-zero. They are
random but well-conditioned: Linear weights ~ N(0, 1/in), norm weights 1 + N(0, 0.1²), small biases.
Each tensor draws from its own generator, seeded by (seed, its model key), so the two layouts hold
the same text weights and the files are byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

import kimi_ref
from kimi_ref import int4
from kimi_ref.chat_template import VARIANTS
from kimi_ref.checkpoint import INDEX_FILE, ITEMSIZE, expected_tensors, flat_name, is_quantized
from kimi_ref.checkpoint_chat import VARIANT_FIELD
from kimi_ref.config import KimiConfig, fixture_path, load_config, tiny_config
from kimi_ref.model import KimiForCausalLM

from ._cli import FAILURE, INTERRUPTED, USAGE, fail
from .safe_write import OutputError, check_dir, write_dir

__all__ = ["TINY_VOCAB", "LAYOUTS", "MakeTinyError", "tiny_checkpoint_config", "make_tiny", "write_checkpoint", "checkpoint_tensors",
           "random_tensors", "random_model",
           "tiny_checkpoint", "shard_plan", "main"]

TINY_VOCAB = 4096  # the demo tokenizer: 3840 BPE ranks + 256 special slots
LAYOUTS = {"kimi_k25": "kimi_k25", "flat": "kimi_k2_thinking"}  # --layout → shipped config fixture
DEFAULT_VARIANTS = {"kimi_k25": "k2.7-code", "flat": "k2-thinking"}  # --layout → the chat template it records
DATA = Path(kimi_ref.__file__).parent / "data"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json")


class MakeTinyError(RuntimeError):
    """The tiny checkpoint cannot be written (bad output dir, missing demo tokenizer)."""


def tiny_checkpoint_config(layout: str = "kimi_k25") -> KimiConfig:
    """The tiny config: the real K2.5 (or flat K2-Thinking-style) config, shrunk in size only."""
    if layout not in LAYOUTS:
        raise MakeTinyError(f"--layout must be one of {sorted(LAYOUTS)}, found {layout!r}")
    # 8 heads (tiny_config's default is 4) so that `--tp 8` divides heads, experts and vocabulary alike.
    return tiny_config(load_config(fixture_path(LAYOUTS[layout])), vocab_size=TINY_VOCAB, num_attention_heads=8)


def shard_plan(config: KimiConfig, names: list[str]) -> list[list[str]]:
    """Group stored names into shards as the real checkpoint does: one per decoder layer (dense
    layer 0 first, then each MoE layer), then embeddings + final norm + lm_head, then the projector,
    then the vision tower."""
    layers: list[list[str]] = [[] for _ in range(config.num_hidden_layers)]
    rest: list[str] = []
    projector: list[str] = []
    vision: list[str] = []
    for name in names:
        key = flat_name(name, config)
        if key.startswith("model.layers."):
            layers[int(key.split(".")[2])].append(name)
        elif key.startswith("mm_projector."):
            projector.append(name)
        elif key.startswith("vision_tower."):
            vision.append(name)
        else:
            rest.append(name)
    return [group for group in (*layers, rest, projector, vision) if group]


def _generator(seed: int, key: str) -> torch.Generator:
    # One stream per tensor, keyed by its model key: adding a tensor never changes the others.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def _init(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A well-conditioned random float32 value for the model tensor ``key``."""
    noise = torch.randn(shape, generator=_generator(seed, key), dtype=torch.float32)
    last = key.rsplit(".", 1)[-1]
    if key.endswith("e_score_correction_bias"):
        return 0.05 * noise  # non-zero, so selection (scores + bias) differs from the weights (scores)
    if last == "bias":
        return 0.02 * noise
    if len(shape) == 1:  # RMSNorm / LayerNorm gains
        return 1.0 + 0.1 * noise
    if key.endswith("embed_tokens.weight"):
        return noise
    if key.endswith("pos_emb.weight"):
        return 0.1 * noise
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return noise / fan_in**0.5  # Linear [out, in] and the patch Conv2d [out, 3, p, p]


def checkpoint_tensors(config: KimiConfig, dense: Callable[[str, tuple[int, ...]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected_tensors(config)``, stored as the real checkpoint stores it.

    ``dense(key, shape)`` gives the float value of the model tensor ``key`` (flat name) of ``shape``.
    Modules the quantization config names become INT4 (quantized from that value rounded to bf16, as
    compressed-tensors does from a bf16 model); the rest is bf16, or fp32 where the list says F32.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (shape, tag) in expected_tensors(config).items():
        key = flat_name(name, config)
        module, _, part = key.rpartition(".")
        if part in ("weight_packed", "weight_scale", "weight_shape"):
            if part != "weight_packed":
                continue  # written together with weight_packed
            if not is_quantized(config, module):
                raise MakeTinyError(f"{name}: packed in the tensor list but not quantized by the config")
            out_f, in_f = shape[0], shape[1] * int4.PACK_FACTOR
            weight = dense(module + ".weight", (out_f, in_f)).to(torch.bfloat16)
            packed, scale = int4.quantize(weight, config.quantization.group_size)  # type: ignore[union-attr]
            prefix = name[: -len("weight_packed")]
            out[prefix + "weight_packed"] = packed
            out[prefix + "weight_scale"] = scale
            out[prefix + "weight_shape"] = int4.weight_shape((out_f, in_f))
            continue
        value = dense(key, shape)
        out[name] = value.to(torch.float32 if tag == "F32" else torch.bfloat16).contiguous()
    return out  # write_checkpoint checks it against the list


def random_tensors(config: KimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint for ``config``: make_tiny's random weights, stored as the real one stores them
    (for any config: ``benchmarks/device_check.py`` writes a ~1 GB one with it)."""
    return checkpoint_tensors(config, lambda key, shape: _init(key, shape, seed))


def random_model(config: KimiConfig, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> KimiForCausalLM:
    """A model in memory with random weights (no checkpoint): torch's init, then every norm weight moved
    away from 1 and a non-zero router bias, so neither can hide a bug; INT4 experts where the config
    says. ``kw`` goes to ``KimiForCausalLM`` (e.g. ``mla_mode``). The tests and the HF benchmark use it."""
    torch.manual_seed(seed)
    model = KimiForCausalLM(config, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            if name == "vision_tower.patch_embed.pos_emb.weight":  # a fresh table of its own scale
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def make_tiny(out: str | Path, layout: str = "kimi_k25", seed: int = 0, *, force: bool = False,
              tokenizer: bool = True, variant: str | None = None) -> Path:
    """Write the tiny checkpoint as directory ``out`` (created; if it exists it must be empty, or
    ``force`` replaces the checkpoint in it as a whole). ``variant``: the chat template variant its
    tokenizer config records (default: the layout's, :data:`DEFAULT_VARIANTS`)."""
    config = tiny_checkpoint_config(layout)
    check_dir(out, force=force)
    return write_checkpoint(out, config, random_tensors(config, seed), force=force, tokenizer=tokenizer,
                            variant=variant or DEFAULT_VARIANTS[layout])


def write_checkpoint(out: str | Path, config: KimiConfig, tensors: dict[str, torch.Tensor], *, force: bool = False,
                     tokenizer: bool = True, extra: Callable[[Path], None] | None = None,
                     variant: str | None = None) -> Path:
    """Write ``tensors`` ({stored name: tensor}, exactly ``expected_tensors(config)``) as a checkpoint
    directory in the real layout: shards split as :func:`shard_plan`, the index, ``config.json``, the
    demo tokenizer (``tokenizer``; its ``tokenizer_config.json`` records ``variant``, by default k2.7-code
    for the kimi_k25 layout and k2-thinking for flat) and, with vision, ``preprocessor_config.json``. Also used by
    ``weights_tools.train_nano`` for trained weights; ``extra(directory)`` adds its own files.

    The directory is built under a temporary name and renamed into place (:mod:`weights_tools.safe_write`):
    an interrupted write leaves the old checkpoint whole, and ``force`` leaves no stale shard behind."""
    out = Path(out)
    check_dir(out, force=force)
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: {t.dtype} {list(t.shape)}, expected {expected[n][1]} {list(expected[n][0])}"
             for n, t in tensors.items() if n in expected
             and (tuple(t.shape) != expected[n][0] or t.element_size() != ITEMSIZE[expected[n][1]])]
    if missing or unexpected or wrong:
        raise MakeTinyError(f"tensors do not match {config.source}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                            f"wrong {wrong[:5]}")
    sources = [DATA / "tokenizer" / f for f in TOKENIZER_FILES] if tokenizer else []
    variant = variant or DEFAULT_VARIANTS[config.layout]
    if variant not in VARIANTS:
        raise MakeTinyError(f"variant must be one of {', '.join(VARIANTS)}, found {variant!r}")
    absent = [str(p) for p in sources if not p.is_file()]
    if absent:
        raise MakeTinyError(f"demo tokenizer file(s) missing: {absent} (they ship with kimi_ref in kimi_ref/data/tokenizer/)")

    def fill(directory: Path) -> None:
        _write_files(directory, config, tensors, list(expected), sources, variant)
        if extra is not None:
            extra(directory)

    return write_dir(out, fill, force=force)


def _write_files(out: Path, config: KimiConfig, tensors: dict[str, torch.Tensor], names: list[str],
                 sources: list[Path], variant: str) -> None:
    groups = shard_plan(config, names)  # the same order whatever order the dict came in
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):06d}.safetensors"
        shard = {name: tensors[name].contiguous() for name in group}
        save_file(shard, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o644)  # safetensors writes 0600; a downloaded checkpoint is world-readable
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config.save(out / "config.json")
    for src in sources:
        if src.name == "tokenizer_config.json":  # the demo config, plus the variant it is to be chatted with
            tokenizer_config = json.loads(src.read_text(encoding="utf-8"))
            tokenizer_config[VARIANT_FIELD] = variant
            (out / src.name).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        else:
            shutil.copyfile(src, out / src.name)
    if config.vision is not None:
        shutil.copyfile(DATA / "configs" / "kimi_k25_preprocessor_config.json", out / "preprocessor_config.json")


def _cache_root() -> Path:
    return Path(os.environ.get("KIMI_REF_CACHE", Path.home() / ".cache" / "kimi_ref"))


def _digest() -> str:
    # Rebuild the cached checkpoint whenever anything that shapes it changes.
    here = Path(__file__)
    parts = [here, DATA / "configs" / "kimi_k25.json", DATA / "configs" / "kimi_k2_thinking.json",
             DATA / "configs" / "kimi_k25_preprocessor_config.json", Path(kimi_ref.__file__).parent / "config.py",
             Path(kimi_ref.__file__).parent / "checkpoint.py", Path(kimi_ref.__file__).parent / "int4.py",
             Path(kimi_ref.__file__).parent / "checkpoint_chat.py",
             # the tensor list is read off the model these files build (checkpoint.expected_tensors)
             *(Path(kimi_ref.__file__).parent / f for f in ("model.py", "mla.py", "experts.py", "router.py", "norms.py",
                                                           "moonvit.py")),
             *(DATA / "tokenizer" / f for f in TOKENIZER_FILES)]
    h = hashlib.sha256()
    for p in parts:
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()[:12]


def tiny_checkpoint(layout: str = "kimi_k25", seed: int = 0) -> Path:
    """The tiny checkpoint, built once into ``$KIMI_REF_CACHE`` (default ``~/.cache/kimi_ref``) and reused:
    the embedded default of ``python -m kimi_ref.chat`` and of the chapters."""
    target = _cache_root() / f"tiny-{layout}-seed{seed}-{_digest()}"
    if (target / INDEX_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        make_tiny(tmp, layout, seed, force=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not (target / INDEX_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.make_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (created; must be empty unless --force, which replaces "
                                    "the checkpoint there as a whole)")
    parser.add_argument("--layout", default="kimi_k25", choices=sorted(LAYOUTS),
                        help="kimi_k25: nested config, language_model.* names, vision (K2.5/K2.7-Code); "
                             "flat: model.* names, no vision (K2-Thinking)")
    parser.add_argument("--variant", default=None, choices=VARIANTS,
                        help="the chat template variant the checkpoint records (default: k2.7-code for kimi_k25, "
                             "k2-thinking for flat)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace the checkpoint in a non-empty directory")
    args = parser.parse_args(argv)
    try:
        check_dir(args.out, force=args.force)
    except OutputError as e:
        return fail("make_tiny", e, USAGE)
    try:
        out = make_tiny(args.out, args.layout, args.seed, force=args.force, variant=args.variant)
    except (MakeTinyError, OutputError) as e:
        return fail("make_tiny", e, FAILURE)
    except KeyboardInterrupt:
        return fail("make_tiny", "interrupted; the output directory was left as it was", INTERRUPTED)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    print(f"wrote {out}: {len(index['weight_map'])} tensors in {len(shards)} shards, "
          f"{index['metadata']['total_size'] / 1e6:.2f} MB ({args.layout} layout, seed {args.seed}, chat variant "
          f"{args.variant or DEFAULT_VARIANTS[args.layout]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
