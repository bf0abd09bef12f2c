"""Pieces every HTTP handler shares: app state, body reading, errors, prompt preparation, and
running a request to completion or as an SSE stream with cancellation on client disconnect.

Data flow of one request: read_body (size limit) -> protocol model -> GenerationSpec ->
prepare() (tokenize, context check, SamplingParams) -> AsyncEngine.submit() -> RequestStream ->
collect() (whole text) or first_delta() + EventStream (SSE). A client that disconnects closes its
RequestStream, which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .async_engine import AsyncEngine, EngineUnavailable, RequestStream, StreamDelta
from .engine import RequestError
from .metrics import ServerMetrics
from .protocol import GenerationSpec, ProtocolError, resolve_max_tokens

log = logging.getLogger("spinserve.server")
LONG_PROMPT_CHARS = 20_000  # tokenize longer prompts in a worker thread, off the event loop


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_s: float = 30.0  # in-flight requests may finish within this on shutdown
    max_inflight: int = 4096  # more concurrent requests get 503
    integrity_checks: bool = False  # engine.check_integrity() whenever the engine goes idle


@dataclass
class AppState:
    config: ServerConfig
    engine: AsyncEngine
    metrics: ServerMetrics


class ClientDisconnected(Exception):
    """The client went away before the response started."""


def state_of(request: Request) -> AppState:
    return request.app.state.spin


def error_response(
    request_path: str, err: ProtocolError, metrics: ServerMetrics | None = None
) -> JSONResponse:
    if metrics is not None:
        metrics.rejected(err.status)
    body = err.openai_body() if request_path.startswith("/v1") else err.kserve_body()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def handle_errors(fn: Callable[[Request], Awaitable[Response]]):
    """Turn ProtocolError / EngineUnavailable / engine rejections into protocol errors."""

    async def wrapper(request: Request) -> Response:
        st = state_of(request)
        try:
            return await fn(request)
        except ProtocolError as e:
            return error_response(request.url.path, e, st.metrics)
        except EngineUnavailable as e:
            return error_response(request.url.path, ProtocolError(503, str(e)), st.metrics)
        except ClientDisconnected:
            return Response(status_code=499)
        except RequestError as e:  # the engine refused the request
            return error_response(request.url.path, ProtocolError(400, str(e)), st.metrics)
        except Exception as e:  # noqa: BLE001 - answer in the protocol's shape, keep serving
            log.exception("request failed")
            return error_response(
                request.url.path,
                ProtocolError(500, f"internal error: {type(e).__name__}: {e}"),
                st.metrics,
            )

    wrapper.__name__ = fn.__name__
    return wrapper


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            413,
            f"request body of {declared} bytes exceeds the limit of "
            f"{limit} bytes (server.max_body_bytes)",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                413, f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def check_model(st: AppState, name: str) -> None:
    if name != st.config.model_name:
        raise ProtocolError(
            404,
            f"model {name!r} is not served here; the model is {st.config.model_name!r}",
            param="model",
            code="model_not_found",
        )


def require_ready(st: AppState) -> None:
    if not st.engine.ready:
        raise EngineUnavailable(
            f"engine is {st.engine.state.value}: retry when /v2/health/ready answers 200"
        )


async def tokenize(st: AppState, text: str, add_special_tokens: bool = True) -> list[int]:
    tok = st.engine.tokenizer
    if len(text) > LONG_PROMPT_CHARS:
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
    return tok.encode(text, add_special_tokens=add_special_tokens)


async def prepare(st: AppState, spec: GenerationSpec, prompt_param: str) -> tuple[list[int], Any]:
    """Tokenize, check the context and vocabulary, build SamplingParams."""
    from spinserve.runtime.sampling import SamplingParams

    require_ready(st)
    if isinstance(spec.prompt, str):
        prompt_ids = await tokenize(st, spec.prompt, spec.add_special_tokens)
    else:
        prompt_ids = list(spec.prompt)
        vocab = st.engine.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ProtocolError(400, f"token ids must be in [0, {vocab})", param=prompt_param)
    if not prompt_ids:
        raise ProtocolError(400, "the prompt is empty after tokenization", param=prompt_param)
    max_tokens = resolve_max_tokens(spec, len(prompt_ids), st.engine.max_context, prompt_param)
    try:
        params = SamplingParams(**spec.sampling_kwargs(max_tokens))
    except ValueError as e:
        raise ProtocolError(400, str(e)) from None
    return prompt_ids, params


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable` unless the client disconnects first (ClientDisconnected)."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientDisconnected
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


async def collect(stream: RequestStream) -> Completion:
    parts = []
    async for delta in stream:
        parts.append(delta.text)
    return Completion(
        "".join(parts), stream.finish_reason, stream.num_prompt_tokens, stream.num_output_tokens
    )


async def run_to_completion(
    request: Request, st: AppState, prompt_ids: list[int], params: Any
) -> Completion:
    stream = st.engine.submit(prompt_ids, params)
    try:
        return await race_disconnect(request, collect(stream))
    finally:
        stream.close()


async def first_delta(request: Request, stream: RequestStream) -> tuple[StreamDelta, AsyncIterator]:
    """Wait for the first delta (so engine errors still become an HTTP status)."""
    it = stream.__aiter__()
    try:
        first = await race_disconnect(request, it.__anext__())
    except BaseException:
        stream.close()
        raise
    return first, it


def sse(obj: Any) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


class EventStream(Response):
    """SSE response that watches for the client's disconnect and always runs on_close."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def body() -> None:
                    try:
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": self.raw_headers,
                            }
                        )
                        async for chunk in self.chunks:
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # client gone mid-send
                        pass
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                tg.start_soon(watch)
        finally:
            self.on_close()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
