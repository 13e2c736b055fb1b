"""``python -m kimi_ref.serve``: the command line. Everything that can be refused is refused before loading.

The flags the chat CLI also has (--ckpt, --tp, --device, --dtype, --backend, --variant, --temperature,
--top-p, --max-new-tokens) mean the same here; the sampling ones are the defaults of requests that do
not say. Exit status: 0 after Ctrl-C, 2 for a refused command line; SIGTERM stops the server as cleanly
and then ends the process by that signal, as uvicorn does.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from pathlib import Path

import torch

from kimi_ref.chat import (ChatError, add_shared_flags, check_shared_flags, default_checkpoint, open_checkpoint,
                           resolve_chat_setup)
from kimi_ref.checkpoint import CheckpointError
from kimi_ref.config import ConfigError
from kimi_ref.launch import LaunchError, check_device, launch
from kimi_ref.parallel import TPError
from kimi_ref.serve.server import ServeSettings, listen

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimi_ref.serve",
                                description="An OpenAI-compatible chat-completions server for a Kimi K2.x checkpoint.")
    add_shared_flags(p, tp_help="tensor-parallel ranks; rank 0 serves, the others follow",
                     for_what="for requests that do not set it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients name (default: kimi-nano, or the checkpoint folder's name)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context, prompt plus answer, in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, MiB (default 32)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="image_url parts may name local files under DIR (default: none; data: URLs always)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _settings(args: argparse.Namespace):
    for flag, value, low in (("--tp", args.tp, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--max-model-len", args.max_model_len, 2), ("--max-queue", args.max_queue, 1)):
        if value is not None and value < low:
            raise ChatError(f"{flag} must be at least {low}, found {value}")
    if not 0 <= args.port <= 65535:
        raise ChatError(f"--port must lie in [0, 65535], found {args.port}")
    if not args.max_body_mb > 0:
        raise ChatError(f"--max-body-mb must be positive, found {args.max_body_mb}")
    check_shared_flags(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, args.tp)
    ckpt = default_checkpoint() if args.ckpt is None else Path(args.ckpt)
    checkpoint = open_checkpoint(ckpt, args.tp)
    # The checkpoint decides the variant and the sampling defaults, exactly as for the chat; the server
    # renders with kimi_ref's template, proven byte for byte against the checkpoint's own when it ships one.
    args.template = "kimi_ref"
    setup, (temperature, top_p, max_new_tokens), said = resolve_chat_setup(args, ckpt, checkpoint.config)
    for line in said:
        print(line, file=sys.stderr)
    media_dir = None
    if args.allowed_local_media_path is not None:
        media_dir = Path(args.allowed_local_media_path).expanduser().resolve()
        if not media_dir.is_dir():
            raise ChatError(f"--allowed-local-media-path {args.allowed_local_media_path}: no such directory")
    try:
        listen(args.host, args.port).close()  # a taken port is refused now, not after loading the model
    except OSError as e:
        raise ChatError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror})") from None
    name = args.served_model_name or ("kimi-nano" if args.ckpt is None else ckpt.resolve().name)
    return ServeSettings(ckpt=str(ckpt), device=device, dtype=args.dtype, backend=args.backend, variant=setup.variant,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         host=args.host, port=args.port, model_name=name, max_model_len=args.max_model_len,
                         max_length=setup.sampling.max_length, eos_token_ids=setup.sampling.eos_token_ids,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                         media_dir=None if media_dir is None else str(media_dir), api_key=args.api_key,
                         log_level=args.log_level)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        importlib.import_module("starlette")
        importlib.import_module("uvicorn")
    except ImportError as e:
        print(f"kimi_ref.serve: error: the server needs the 'serve' extra ({e.name} is missing): "
              "pip install -e '.[serve]'", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
    except (ChatError, TPError, LaunchError, CheckpointError, ConfigError, OSError) as e:
        print(f"kimi_ref.serve: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    if not _loopback(settings.host):
        print(f"kimi_ref.serve: note: listening on {settings.host}: other machines can reach this server"
              + ("" if settings.api_key else " and it asks for no key (--api-key)"), file=sys.stderr)
    rank_main = importlib.import_module("kimi_ref.serve.server").rank_main
    try:
        return launch(rank_main, args.tp, settings.device, settings)
    except KeyboardInterrupt:
        return 0
