"""Talk to the model: ``python -m kimi_ref.chat``.

    python -m kimi_ref.chat                                  # the embedded tiny checkpoint, CPU (answers are noise)
    python -m kimi_ref.chat --ckpt DIR --tp 8                # the real checkpoint on 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 ... -m kimi_ref.chat --ckpt DIR --tp 8 --pp 2   # two nodes (full_weight_run.md)
    python -m kimi_ref.chat --ckpt DIR --tp 2 --device cpu --prompt "..." --max-new-tokens N --seed S
    python -m kimi_ref.chat ... --temperature 0              # greedy (defaults: generation_config.json, else 1.0 / 0.95)
    python -m kimi_ref.chat --ckpt DIR --template checkpoint  # render with the checkpoint's own chat_template.jinja
    python -m kimi_ref.chat ... --tools demo | --tools FILE.json   --save FILE.json   --load FILE.json
    python -m kimi_ref.chat --ckpt DIR --image cat.png --prompt "What is in the picture?"   # K2.5+ checkpoints

The checkpoint decides (:mod:`kimi_ref.checkpoint_chat`): the template variant comes from its
``chat_template.jinja`` (or the variant its ``tokenizer_config.json`` records; ``--variant`` overrides),
kimi_ref's template is proven equal to the checkpoint's on a built-in suite before the model loads (or
refused with a diff; ``--template checkpoint`` renders with the checkpoint's own through jinja2), the
special-token ids are checked, and ``generation_config.json`` sets the sampling defaults and extra stop
ids. The chat prints the variant chosen and why, and the sampling and where it came from.

Every rank runs :func:`_rank_main`: ``launch.py`` starts the ranks, ``parallel.make_layout`` splits
them into ``--pp`` stages of ``--tp``, each loads its own slices of its own layers; rank 0 then leads a
:class:`kimi_ref.session.Session` (render, generate, parse, run tools, save) and every other rank
follows what ``control.py`` tells it. A call is answered with an "error: ..." result instead of being
run when it names a tool the conversation does not declare, when the parser found it malformed, or
when --max-new-tokens cut the output off (then the turn ends there).

--save FILE is checked before the model loads (a new file, the --load file, or --force) and written
atomically after every turn; if a write fails the session goes on and says so (exit status 1).
Exit status: 0, 2 for a refused command line, 1 if a --save failed, 130 for Ctrl-C under --prompt.

Images (``--image PATH``, repeatable) ride with the first user message (the ``--prompt`` one, or the
first REPL line) as content parts ``{"type": "image_url", "image_url": {"url": PATH}}`` placed before its
text; --save keeps them so, and --load reads such parts back (a path, a ``file://`` URL or a base64
``data:`` URL). Each turn re-prefills the whole conversation, so the images of every user message go in
again each time. Pixels never travel between ranks: every rank holds the same Settings and runs the
same deterministic MoonViT preprocessing on the same files (an :class:`ImageTable`); rank 0 only sends,
with each prompt, which table entries the conversation shows, in order.

REPL commands: ``/reset`` (forget the conversation), ``/exit`` (or Ctrl-D). Ctrl-C during a generation
stops that generation (what was written so far is kept); Ctrl-C at the prompt only clears the line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import torch

from kimi_ref import control, parallel
from kimi_ref.chat_template import VARIANTS, ChatTemplateError
from kimi_ref.checkpoint import Checkpoint, CheckpointError, load_model
from kimi_ref.checkpoint_chat import K27_CODE_SAMPLING, ChatSetupError, chat_setup
from kimi_ref.config import ConfigError
from kimi_ref.control import EXIT, receive_ids
from kimi_ref.generate import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ContextError,
                               check_context, check_sampling, expanded_length, generate)
from kimi_ref.launch import LaunchError, check_device, launch, torchrun_env
from kimi_ref.media import ImageTable, MediaError, image_part, image_source, message_images
from kimi_ref.parallel import PP, TP, TPError
from kimi_ref.session import (VARIANTS_WITH_PRESERVE, ChatError, Session, Settings, load_conversation, load_tools,
                              save_conversation, session_images)
from kimi_ref.tokenizer import Tokenizer, TokenizerError
from kimi_ref.tools import BUILTIN_TOOLS, calculator, current_time, run_tool
from weights_tools.safe_write import OutputError, check_file

__all__ = ["main", "default_checkpoint", "checkpoint_tools", "add_shared_flags", "check_shared_flags", "open_checkpoint",
           "resolve_chat_setup",
           # re-exported from where they live: the session (kimi_ref.session), the demo tools (kimi_ref.tools),
           # the chat's image input (kimi_ref.media)
           "ChatError", "Settings", "Session", "load_tools", "save_conversation", "load_conversation", "calculator",
           "current_time", "BUILTIN_TOOLS", "run_tool", "image_part", "image_source", "message_images", "ImageTable"]

NANO_DIR = Path(__file__).resolve().parent / "data" / "nano"
CHECKPOINT_TOOLS_FILE = "tools.json"  # the tools a checkpoint was trained with (kimi-nano ships one)


def default_checkpoint() -> Path:
    """The checkpoint used when no --ckpt is given: kimi-nano, shipped in the package.

    kimi-nano is a miniature Kimi trained from scratch with ``python -m weights_tools.train_nano``
    (same architecture and checkpoint format, INT4 experts, the real chat template and tool calls).
    """
    if not (NANO_DIR / "config.json").is_file():
        raise ChatError(f"the embedded kimi-nano checkpoint is missing from {NANO_DIR} (a broken install?); "
                        "rebuild it with `python -m weights_tools.train_nano kimi_ref/data/nano --force` or pass --ckpt")
    return NANO_DIR


def checkpoint_tools(ckpt: str | Path) -> list[dict]:
    """The tool definitions a checkpoint directory declares in ``tools.json`` (none when it has no such file)."""
    path = Path(ckpt) / CHECKPOINT_TOOLS_FILE
    return load_tools(str(path)) if path.is_file() else []


# ---- images ---------------------------------------------------------------------------------------------

def _check_vision(config: Any, ckpt: str | Path, what: str) -> None:
    if config.vision is None:
        raise ChatError(f"{what}: the checkpoint {ckpt} has no vision tower (its config.json has no vision_config; "
                        "a text-only layout such as K2-Instruct/K2-Thinking), so it cannot read images")


# ---- every rank: load, then lead or follow ----------------------------------------------------------


def _follow(model: Any, tp: TP, pp: PP, device: str, images: ImageTable) -> None:
    """Every rank but 0: generate whenever rank 0 says so, with the prompt and images it names, until it says exit."""
    while True:
        command, max_new_tokens = control.command(tp, pp, device, -1)
        if command == EXIT:
            return
        ids = receive_ids(None, tp, device, pp)
        media = images.media(receive_ids(None, tp, device, pp))  # indices into this rank's own ImageTable
        generate(model, ids, max_new_tokens=max_new_tokens, tp=tp, media=media)  # sampling settings: rank 0's alone


def _rank_main(world: TP, device: str, s: Settings) -> int:
    """What every rank runs: find its stage and TP group, load its slices of its layers, then lead (rank 0) or follow."""
    if device == "cpu":  # before the first op: kimi-nano's matrices are too small to share between cores
        torch.set_num_threads(s.threads)
    tp, pp = parallel.make_layout(world, s.tp, s.pp)
    model = load_model(s.ckpt, device=device, dtype=s.dtype, tp=tp, pp=pp, backend=s.backend,
                       progress=world.rank == 0 and sys.stderr.isatty())
    images = ImageTable(session_images(s), s.ckpt)  # the same files, the same pixels, on every rank
    if world.rank != 0:
        _follow(model, tp, pp, device, images)
        return 0
    session = Session(model, Tokenizer.from_pretrained(s.ckpt), s, tp, device, images=images)
    broken = False  # a stage died: the protocol is cut, so no EXIT goes out (it would meet a half-sent step)
    try:
        if s.prompt is not None:
            ok = session.user_turn(s.prompt)
            if session.interrupted:
                print("(interrupted)", file=sys.stderr)
                return 130
            return 1 if session.save_failed else 0 if ok else 2
        session.repl()
        return 1 if session.save_failed else 0
    except parallel.PeerError:
        broken = True
        raise
    finally:
        if not broken:
            control.command(tp, pp, device, EXIT)


# ---- the command line -------------------------------------------------------------------------------------

def add_shared_flags(p: argparse.ArgumentParser, *, tp_help: str, for_what: str = "") -> None:
    """The flags the chat and the server share, meaning the same in both (checked by check_shared_flags;
    None = the checkpoint decides). ``for_what`` says whose defaults the sampling flags are, if not the chat's."""
    p.add_argument("--ckpt", help="checkpoint directory (default: kimi-nano, shipped in the package)")
    p.add_argument("--tp", type=int, default=1, help=tp_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype of the dense weights (default: the config's)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"], help="kernels (default torch)")
    p.add_argument("--variant", default=None,
                   help="chat template variant (default: the checkpoint's, from its chat_template.jinja or the "
                        "variant its tokenizer_config.json records)")
    prefix = f"{for_what}; " if for_what else ""
    p.add_argument("--temperature", type=float, default=None,
                   help=f"{prefix}0 = greedy (default: generation_config.json's, else {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"{prefix}nucleus mass (default: generation_config.json's, else {DEFAULT_TOP_P})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"{for_what or 'per generation'} (default: generation_config.json's, else {DEFAULT_MAX_NEW_TOKENS})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimi_ref.chat", description="Chat with a Kimi K2.x checkpoint.")
    add_shared_flags(p, tp_help="tensor-parallel ranks per pipeline stage; started here (or by torchrun)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages, each --tp ranks holding a contiguous block of layers (default 1); "
                        "world size = tp × pp, e.g. --tp 8 --pp 2 on two nodes of 8 GPUs under torchrun")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a rank waits for another (loading, a dead node, and the followers' wait while "
                        "you type) before it gives up (default 1800)")
    p.add_argument("--template", default="kimi_ref", choices=["kimi_ref", "checkpoint"],
                   help="kimi_ref (default): kimi_ref's template, proven equal to the checkpoint's own at start; "
                        "checkpoint: render with the checkpoint's chat template through jinja2")
    p.add_argument("--prompt", help="one message, answer, exit (no REPL)")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach an image to the first user message (repeatable; K2.5+ checkpoints with a vision tower)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tools", help="'demo' (calculator, current_time) or a JSON file of OpenAI tool definitions "
                   "(default: the checkpoint's tools.json, if it has one)")
    p.add_argument("--max-tool-rounds", type=int, default=8, help="tool round trips per user message")
    p.add_argument("--save", help="write the conversation here (OpenAI format) after every turn; a new file, "
                   "or the --load file, unless --force")
    p.add_argument("--force", action="store_true", help="let --save replace an existing file")
    p.add_argument("--load", help="continue a conversation written by --save")
    p.add_argument("--no-timings", action="store_true", help="omit the per-turn token counts and speed")
    # 1: kimi-nano's 128-wide matrices gain nothing from a second core, and on a busy machine two threads
    # made decode swing between 2 and 130 tok/s (one answer 4-41 s; one thread: a steady 4-5 s).
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per rank (default 1; raise it for a large checkpoint on CPU)")
    return p


def check_shared_flags(args: argparse.Namespace) -> None:
    """The flags the chat and the server share: a known --variant, a sampling pair generate accepts."""

    if args.variant is not None and args.variant not in VARIANTS:
        raise ChatError(f"--variant {args.variant!r}: expected one of {', '.join(VARIANTS)}")
    try:
        check_sampling(DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                       DEFAULT_TOP_P if args.top_p is None else args.top_p)
    except ValueError as e:
        raise ChatError(f"--temperature / --top-p: {e}") from None


def open_checkpoint(ckpt: Path, tp: int, pp: int = 1):
    """The checkpoint the chat (or the server) will run, checked before any rank starts: the directory, its
    config and tokenizer files, every shard's header, that ``tp`` divides the model and ``pp`` stages fit."""

    if not ckpt.exists():
        raise ChatError(f"--ckpt {ckpt}: no such directory")
    if not (ckpt / "config.json").is_file():
        raise ChatError(f"--ckpt {ckpt}: no config.json there (is it a checkpoint directory?)")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        if not (ckpt / name).is_file():
            raise ChatError(f"--ckpt {ckpt}: no {name} there (the tokenizer ships with the checkpoint)")
    checkpoint = Checkpoint.open(ckpt)
    checkpoint.raise_if_problems()
    parallel.validate_layout(checkpoint.config, tp, pp)
    return checkpoint


def _settings(args: argparse.Namespace) -> tuple[Settings, int]:
    """Check everything that can be checked before any rank starts; refusals raise."""

    if args.tp < 1:
        raise ChatError(f"--tp must be at least 1, found {args.tp}")
    if args.pp < 1:
        raise ChatError(f"--pp must be at least 1, found {args.pp}")
    if not args.timeout > 0:
        raise ChatError(f"--timeout must be a positive number of seconds, found {args.timeout}")
    world_size = args.tp * args.pp
    env = torchrun_env()
    if env is not None and env[1] > 1 and env[1] != world_size:  # before any rank loads a byte
        raise ChatError(f"torchrun started {env[1]} processes (WORLD_SIZE), but --tp {args.tp} × --pp {args.pp} = "
                        f"{world_size}; they must be equal (--nnodes × --nproc-per-node = --tp × --pp)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, found {args.max_new_tokens}")
    if args.max_tool_rounds < 0:
        raise ChatError(f"--max-tool-rounds must be at least 0, found {args.max_tool_rounds}")
    if args.threads < 1:
        raise ChatError(f"--threads must be at least 1, found {args.threads}")
    check_shared_flags(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, world_size)
    if args.ckpt is None:
        ckpt = default_checkpoint()
        if (torchrun_env() or (0,))[0] == 0:  # under torchrun, say it once
            print(f"(no --ckpt: kimi-nano, the miniature Kimi shipped in the package, {ckpt})", file=sys.stderr)
    else:
        ckpt = Path(args.ckpt)
    checkpoint = open_checkpoint(ckpt, args.tp, args.pp)
    setup, sampling, said = resolve_chat_setup(args, ckpt, checkpoint.config)
    variant = setup.variant
    # Without --tools, a checkpoint's own tools.json (kimi-nano: the calculator it was trained to call).
    tools = load_tools(args.tools) if args.tools else checkpoint_tools(ckpt)
    history: list[dict] = []
    if args.load:
        history, saved_tools = load_conversation(args.load)
        tools = tools or saved_tools
    if args.save:  # now, not after the first answer: a refused --save must not cost a conversation
        same = bool(args.load) and Path(args.load).resolve() == Path(args.save).resolve()
        try:
            check_file(args.save, force=args.force, protect=[ckpt], what="--save", allow_existing=same)
        except OutputError as e:
            raise ChatError(str(e)) from None
    images = [str(Path(p).expanduser().absolute()) for p in args.image]
    if images:
        _check_vision(checkpoint.config, ckpt, "--image")
    if message_images(history):
        _check_vision(checkpoint.config, ckpt, f"--load {args.load} (its messages hold images)")
    table = ImageTable(message_images(history) + images, ckpt)  # refuses missing / unreadable files now
    if args.prompt is not None:
        messages = history + ([{"role": "system", "content": args.system}] if args.system and not history else [])
        content: str | list[dict] = args.prompt
        if images:
            content = [image_part(s) for s in images] + [{"type": "text", "text": args.prompt}]
        messages = messages + [{"role": "user", "content": content}]
        preserve = True if variant in VARIANTS_WITH_PRESERVE else None
        try:
            ids = setup.render_ids(messages, Tokenizer.from_pretrained(ckpt), tools=tools or None,
                                   preserve_thinking=preserve)
        except ChatTemplateError as e:
            raise ChatError(f"--prompt: {e}") from None
        try:
            n = expanded_length(ids, table.media(table.indices(message_images(messages))), checkpoint.config)
        except ValueError as e:
            raise ChatError(str(e)) from None
        check_context(n, checkpoint.config.max_position_embeddings)
        if setup.sampling.max_length is not None and n >= setup.sampling.max_length:
            raise ContextError(f"the prompt is {n} tokens, but generation_config.json's max_length is "
                               f"{setup.sampling.max_length} (prompt and answer together)")
    settings = Settings(ckpt=str(ckpt), device=device, dtype=args.dtype, backend=args.backend, variant=variant,
                        temperature=sampling[0], top_p=sampling[1], max_new_tokens=sampling[2],
                        seed=args.seed, prompt=args.prompt, system=args.system, tools=tools, images=images,
                        history=history, save=args.save, force=args.force, max_tool_rounds=args.max_tool_rounds,
                        timings=not args.no_timings, threads=args.threads, tp=args.tp, pp=args.pp,
                        timeout=args.timeout, setup=setup)
    if (torchrun_env() or (0,))[0] == 0:  # once everything is accepted; under torchrun, once
        for line in said:
            print(line, file=sys.stderr)
    return settings, world_size


def resolve_chat_setup(args: argparse.Namespace, ckpt: Path, config: Any) -> tuple[Any, tuple[float, float, int], list[str]]:
    """The checkpoint's ChatSetup, the (temperature, top_p, max_new_tokens) to use, and the lines saying so.

    ``args`` carries the flags the chat and the server share (variant, template, temperature, top_p,
    max_new_tokens; None = the checkpoint decides)."""

    try:
        setup = chat_setup(ckpt, args.variant, args.template, layout=config.layout)
    except ChatSetupError as e:
        if e.details:  # the proof's diff, above the one-line error
            print(e.details, file=sys.stderr)
        raise ChatError(str(e)) from None
    s = setup.sampling
    temperature = s.temperature if args.temperature is None else args.temperature
    top_p = s.top_p if args.top_p is None else args.top_p
    max_new = s.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    try:
        check_sampling(temperature, top_p)
    except ValueError as e:
        raise ChatError(f"{s.sources.get('temperature')} / {s.sources.get('top_p')}: {e}") from None
    def said(name: str, value: Any, flag: str) -> str:
        return f"{value} ({'--' + flag if getattr(args, flag.replace('-', '_')) is not None else s.sources[name]})"

    lines = [f"({line})" for line in setup.describe().splitlines()]
    extra = "".join(f"; {k} {v} ({s.sources[k]})" for k, v in
                    (("max_length", s.max_length), ("eos_token_id", list(s.eos_token_ids))) if k in s.sources)
    lines.append(f"(sampling: temperature {said('temperature', temperature, 'temperature')}, top-p "
                 f"{said('top_p', top_p, 'top-p')}, max new tokens {said('max_new_tokens', max_new, 'max-new-tokens')}"
                 f"{extra})")
    lines += [f"note: {note}" for note in setup.notes]
    overridden = (args.temperature is not None and temperature != K27_CODE_SAMPLING[0]) or \
        (args.top_p is not None and top_p != K27_CODE_SAMPLING[1])
    if setup.variant == "k2.7-code" and overridden:  # the user's choice, not the checkpoint's own file
        lines.append(f"note: K2.7-Code was trained for temperature {K27_CODE_SAMPLING[0]} and top-p "
                     f"{K27_CODE_SAMPLING[1]} (thinking on, earlier reasoning kept); temperature {temperature}, "
                     f"top-p {top_p} is not what it was trained for")
    return setup, (temperature, top_p, max_new), lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings, world_size = _settings(args)
    except (ChatError, MediaError, ContextError, TPError, LaunchError, CheckpointError, ConfigError, TokenizerError,
            OSError) as e:
        print(f"kimi_ref.chat: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkimi_ref.chat: interrupted", file=sys.stderr)
        return 130
    # By module name, so spawned ranks find it even when this file runs as __main__.
    rank_main = importlib.import_module("kimi_ref.chat")._rank_main
    try:
        return launch(rank_main, world_size, settings.device, settings, timeout_s=settings.timeout,
                      flags=f"--tp {settings.tp} × --pp {settings.pp}" if settings.pp > 1 else "--tp")
    except parallel.PeerError as e:  # another stage (node) died or hung: say which, do not hang
        print(f"kimi_ref.chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
