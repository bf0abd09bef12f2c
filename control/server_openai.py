"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Streams are SSE chunks ending in `data: [DONE]`; with stream_options.include_usage every chunk
carries "usage": null and one last chunk with empty choices carries the usage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .async_engine import StreamDelta
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationSpec,
    ProtocolError,
    parse_json_object,
    validation_error,
)
from .server_common import (
    AppState,
    EventStream,
    check_model,
    first_delta,
    handle_errors,
    prepare,
    read_body,
    require_ready,
    run_to_completion,
    sse,
    state_of,
)

OWNER = "spinserve"


async def list_models(request: Request) -> Response:
    st = state_of(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": st.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": OWNER,
                    "max_model_len": st.engine.max_context if st.engine.ready else None,
                }
            ],
        }
    )


async def _parse(request: Request, model_cls: type) -> tuple[AppState, Any]:
    st = state_of(request)
    body = parse_json_object(await read_body(request, st.config.max_body_bytes))
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    check_model(st, req.model)
    require_ready(st)
    return st, req


def _usage(n_prompt: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _chat_prompt(st: AppState, messages: list[dict[str, str]]) -> str:
    tok = st.engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ProtocolError(
            400, "this model has no chat template: use /v1/completions", param="messages"
        )
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja errors name the problem in the messages
        raise ProtocolError(
            400, f"chat template failed on these messages: {e}", param="messages"
        ) from None


@handle_errors
async def completions(request: Request) -> Response:
    st, req = await _parse(request, CompletionRequest)
    spec = req.to_spec()
    return await _respond(request, st, req, spec, chat=False)


@handle_errors
async def chat_completions(request: Request) -> Response:
    st, req = await _parse(request, ChatCompletionRequest)
    spec, messages = req.to_spec()
    spec.prompt = _chat_prompt(st, messages)
    spec.add_special_tokens = False
    return await _respond(request, st, req, spec, chat=True)


async def _respond(
    request: Request, st: AppState, req: Any, spec: GenerationSpec, chat: bool
) -> Response:
    prompt_ids, params = await prepare(st, spec, "messages" if chat else "prompt")
    if req.stream:
        return await _stream(request, st, req, prompt_ids, params, chat)
    done = await run_to_completion(request, st, prompt_ids, params)
    prefix = "chatcmpl" if chat else "cmpl"
    body: dict[str, Any] = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": st.config.model_name,
    }
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }
    else:
        choice = {
            "index": 0,
            "text": done.text,
            "logprobs": None,
            "finish_reason": done.finish_reason,
        }
    body["choices"] = [choice]
    body["usage"] = _usage(done.num_prompt_tokens, done.num_output_tokens)
    return JSONResponse(body)


class _ChunkMaker:
    def __init__(self, st: AppState, chat: bool, include_usage: bool) -> None:
        prefix = "chatcmpl" if chat else "cmpl"
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": st.config.model_name,
        }
        self.chat = chat
        self.include_usage = include_usage

    def choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {**self.base, "choices": [c]}
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def usage(self, d: StreamDelta) -> bytes:
        return sse(
            {**self.base, "choices": [], "usage": _usage(d.num_prompt_tokens, d.num_output_tokens)}
        )


async def _stream(
    request: Request, st: AppState, req: Any, prompt_ids: list[int], params: Any, chat: bool
) -> Response:
    stream = st.engine.submit(prompt_ids, params)
    first, rest = await first_delta(request, stream)
    make = _ChunkMaker(st, chat, req.include_usage)

    async def events() -> AsyncIterator[bytes]:
        delta = first
        try:
            if chat:
                yield make.choice("", None, role=True)
            while True:
                if delta.text:
                    yield make.choice(delta.text, None)
                if delta.finished:
                    yield make.choice(None if chat else "", delta.finish_reason)
                    if make.include_usage:
                        yield make.usage(delta)
                    break
                delta = await rest.__anext__()
        except Exception as e:  # noqa: BLE001 - after the first chunk errors go in-stream
            yield sse(ProtocolError(500, f"generation failed: {e}").openai_body())
        yield sse("[DONE]")

    return EventStream(events(), stream.close)
