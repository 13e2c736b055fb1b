"""The HTTP side (Starlette): routes, request bodies, OpenAI-shaped errors, server-sent events.

    GET  /health                 {"status": "ok", "model", "running", "waiting", "completed", ...}
    GET  /v1/models              the one served model (its id is --served-model-name)
    GET  /v1/models/{id}
    POST /v1/chat/completions    a chat.completion, or with "stream": true a text/event-stream of
                                 chat.completion.chunk events ending in ``data: [DONE]``

A handler reads the body (at most --max-body-mb; more is a 413), checks it
(``requests``), prepares the prompt and images off the event loop (``prompt``), queues the job
(``engine``; a full queue is a 503) and relays the job's deltas. Every error leaves as
``{"error": {"message", "type", "param", "code"}}``, the shape OpenAI's clients read, never as a
traceback. When the client goes away (closes a stream, or gives up on a plain request) its job is
cancelled: skipped if still waiting, stopped after the next token if running.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kimi_ref.serve.engine import Engine, Job
from kimi_ref.serve.prompt import PromptBuilder
from kimi_ref.serve.requests import RequestError, parse_chat_request
from kimi_ref.serve.shapes import (ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, ErrorBody,
                                   ErrorResponse, ModelCard, ModelList, payload)
from kimi_ref.serve.turn import Answer

__all__ = ["create_app", "error_response"]

_POLL_S = 0.25  # how often a waiting plain request looks for its client having left


def error_response(error: RequestError) -> JSONResponse:
    body = ErrorResponse(ErrorBody(error.message, error.type, error.param, error.code))
    return JSONResponse(payload(body), status_code=error.status)


def create_app(engine: Engine, builder: PromptBuilder, model_name: str, max_body_bytes: int,
               api_key: str | None = None) -> Starlette:
    started = int(time.time())
    card = ModelCard(id=model_name, created=started, max_model_len=builder.max_model_len)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise RequestError("a valid API key is required: Authorization: Bearer KEY (--api-key)", status=401,
                               code="invalid_api_key")

    async def health(request: Request) -> Response:
        status = engine.status()
        if engine.closed:
            return JSONResponse({"status": "shutting down", "model": model_name, **status}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name, **status})

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse(payload(ModelList([card])))

    async def model(request: Request) -> Response:
        authorize(request)
        if request.path_params["model"] != model_name:
            raise _no_such_model(request.path_params["model"], model_name)
        return JSONResponse(payload(card))

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        chat = parse_chat_request(await _read_body(request, max_body_bytes))
        if chat.model is not None and chat.model != model_name:
            raise _no_such_model(chat.model, model_name)
        engine.check_room()  # a full queue refuses before the images are decoded
        prepared = await run_in_threadpool(builder.prepare, chat)  # images decode here: off the event loop
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopped): no one is listening
                pass

        job = Job(prepared, emit)
        engine.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if prepared.stream:
            return StreamingResponse(_stream(job, events, head, prepared.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), _POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # no one reads it; the finally cancels the job
                    continue
                if isinstance(event, RequestError):
                    raise event
                if isinstance(event, Answer):
                    choice = Choice(event.message, event.finish_reason)
                    return JSONResponse(payload(ChatCompletion(**head, choices=[choice], usage=event.usage)))
        finally:
            job.cancel.set()  # a finished job ignores it; a waiting or running one stops

    async def on_request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                                           status=exc.status_code, type=kind))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                           type="server_error"))

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/models/{model:path}", model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={RequestError: on_request_error, HTTPException: on_http_error,
                                                       Exception: on_unexpected})


def _no_such_model(name: str, served: str) -> RequestError:
    return RequestError(f"the model {name!r} does not exist here; this server serves {served!r}", "model",
                        status=404, type="not_found_error", code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413. An oversize body is still read to its end (and dropped, up to 4 times the limit)
    so that the client, still sending, gets to read the 413 instead of a reset connection."""
    def too_large(size: int) -> RequestError:
        return RequestError(f"the request body is {size} bytes or more; this server takes at most {limit} bytes "
                            "(--max-body-mb)", status=413, code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * limit:
            raise too_large(size)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large(size)
    return b"".join(chunks)


def _event(obj: Any) -> str:
    return f"data: {json.dumps(payload(obj), ensure_ascii=False)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """The chunks of one answer: role first, then each delta, the finish reason, the usage, ``[DONE]``."""
    def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**head, choices=[ChunkChoice(delta, finish)])

    try:
        yield _event(chunk(Delta(role="assistant", content="")))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _event(chunk(event))
            elif isinstance(event, Answer):
                yield _event(chunk(Delta(), event.finish_reason))
                if include_usage:
                    yield _event(ChatCompletionChunk(**head, choices=[], usage=event.usage))
                break
            elif isinstance(event, RequestError):  # after the headers were sent: an error event, as vLLM does
                yield _event(ErrorResponse(ErrorBody(event.message, event.type, event.param, event.code)))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client closed the stream (or it ended): a running generation stops
