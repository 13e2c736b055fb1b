"""Putting the server together: load the model, build the engine and the app, listen, and stop cleanly.

* :func:`rank_main` is what every TP rank runs under ``launch`` (``python -m kimi_ref.serve``): load this
  rank's slices; rank 0 serves HTTP with uvicorn while its engine thread generates, the others follow.
* :func:`start` runs a server inside this process, in a background thread (TP 1): for notebooks and
  tests. ``with start() as server: OpenAI(base_url=server.base_url, api_key="none")``.

The listening socket is bound only after the model has loaded, and the "serving ..." line is printed
once it listens, so whoever waits for that line (or for ``GET /health``) talks to a ready server. Port 0
asks the system for a free port; the line says which one it gave.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_ref.chat import default_checkpoint
from kimi_ref.checkpoint import load_model
from kimi_ref.generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from kimi_ref.parallel import SINGLE, TP
from kimi_ref.serve.engine import Engine, follow
from kimi_ref.serve.prompt import Defaults, PromptBuilder
from kimi_ref.tokenizer import Tokenizer

__all__ = ["ServeSettings", "rank_main", "start", "BackgroundServer", "listen"]


@dataclass
class ServeSettings:
    """Everything the ranks need (picklable: it travels to spawned ranks)."""

    ckpt: str
    device: str = "cpu"
    dtype: str | None = None
    backend: str = "torch"
    variant: str = "k2.7-code"
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # a request without max_tokens; None: the rest of the context
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "kimi-nano"
    max_model_len: int | None = None    # None: the model's max_position_embeddings
    max_length: int | None = None       # generation_config.json's: prompt and answer together, within max_model_len
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's: they end an answer, beside <|im_end|>
    max_queue: int = 16
    max_body_bytes: int = 32 << 20
    media_dir: str | None = None        # --allowed-local-media-path
    api_key: str | None = None
    log_level: str = "info"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def context_limit(s: ServeSettings, config: Any) -> tuple[int, str]:
    """Prompt plus answer, in tokens, and what set it: the model's positions, --max-model-len, or
    generation_config.json's max_length (the chat obeys that too: ``Session._budget``)."""
    context = min(s.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    if s.max_length is not None and s.max_length < context:
        return s.max_length, "generation_config.json's max_length (prompt and answer together)"
    return context, "this server's context (--max-model-len)"


def _build(model: Any, s: ServeSettings, tp: TP, device: str) -> tuple[Any, Any]:
    """The engine (started) and the Starlette app around it."""
    from kimi_ref.serve.app import create_app

    tok = Tokenizer.from_pretrained(s.ckpt)
    context, context_from = context_limit(s, model.config)
    builder = PromptBuilder(tok, model.config, s.ckpt, s.variant, context,
                            Defaults(s.temperature, s.top_p, s.max_new_tokens, tuple(s.eos_token_ids)), s.media_dir,
                            context_from)
    engine = Engine(model, tok, tp, device, s.max_queue)
    engine.start()
    return create_app(engine, builder, s.model_name, s.max_body_bytes, s.api_key), engine


def _uvicorn(app: Any, engine: Any, log_level: str) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            engine.close()  # first: stop the generation, so open streams end instead of holding the shutdown
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off"))


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def rank_main(tp: TP, device: str, s: ServeSettings) -> int:
    model = load_model(s.ckpt, device=device, dtype=s.dtype, tp=tp, backend=s.backend,
                       progress=tp.rank == 0 and sys.stderr.isatty())
    if tp.rank != 0:
        follow(model, tp, device)
        return 0
    app, engine = _build(model, s, tp, device)
    try:
        sock = listen(s.host, s.port)
    except OSError as e:
        engine.close()
        print(f"kimi_ref.serve: error: cannot listen on {s.host}:{s.port} ({e.strerror})", file=sys.stderr)
        return 2
    server = _uvicorn(app, engine, s.log_level)
    print(f"kimi_ref.serve: serving {s.model_name} on {_url(sock)} (TP {tp.world_size}, {device}); "
          "Ctrl-C stops", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()  # tells the followers to exit
        sock.close()
    return 0


class BackgroundServer:
    """A server running in this process's background threads; ``stop()`` (or leaving ``with``) ends it."""

    def __init__(self, server: Any, engine: Any, sock: socket.socket, thread: threading.Thread) -> None:
        self._server, self.engine, self._sock, self._thread = server, engine, sock, thread
        self.base_url = _url(sock)

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.engine.close()
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(ckpt: str | Path | None = None, *, port: int = 0, model: Any = None, log_level: str = "warning",
          **settings: Any) -> BackgroundServer:
    """Serve ``ckpt`` (default kimi-nano) on 127.0.0.1:``port`` from background threads of this process.

    ``model``: an already loaded model of ``ckpt`` to serve (else it is loaded here, on the CPU);
    ``settings``: any other :class:`ServeSettings` field (``variant``, ``max_queue``, ...).
    """

    s = ServeSettings(ckpt=str(ckpt or default_checkpoint()), port=port, log_level=log_level, **settings)
    if model is None:
        model = load_model(s.ckpt, device=s.device, dtype=s.dtype, backend=s.backend, progress=False)
    app, engine = _build(model, s, SINGLE, s.device)
    try:
        sock = listen(s.host, s.port)
    except OSError:
        engine.close()
        raise
    server = _uvicorn(app, engine, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="kimi_ref-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        engine.close()
        sock.close()
        raise RuntimeError("the background server did not start within 30 s")
    return BackgroundServer(server, engine, sock, thread)
