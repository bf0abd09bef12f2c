"""KServe v2 / Triton HTTP endpoints: health, metadata, infer (JSON or binary tensors),
generate and generate_stream (SSE) with the TensorRT-LLM ensemble's input names."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .protocol import GenerationSpec, ProtocolError, parse_json_object
from .protocol_kserve import (
    decode_infer_request,
    generate_body_to_tensors,
    model_metadata,
    sparse_from_parameters,
    specs_from_tensors,
)
from .server_common import (
    AppState,
    EventStream,
    first_delta,
    handle_errors,
    prepare,
    read_body,
    require_ready,
    run_to_completion,
    sse,
    state_of,
)

SERVER_NAME = "spinserve"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"


async def live(request: Request) -> Response:
    return Response(status_code=200)


async def ready(request: Request) -> Response:
    st = state_of(request)
    if st.engine.ready:
        return Response(status_code=200)
    return JSONResponse({"error": f"engine is {st.engine.state.value}"}, status_code=503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse(
        {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data", "generate", "parameters"],
        }
    )


def _model(request: Request) -> tuple[AppState, str]:
    st = state_of(request)
    name = request.path_params["model"]
    version = request.path_params.get("version")
    if name != st.config.model_name:
        raise ProtocolError(404, f"Request for unknown model: '{name}' is not found")
    if version not in (None, "", MODEL_VERSION):
        raise ProtocolError(
            404,
            f"Request for unknown model: '{name}' version {version} is "
            f"not found (versions: {MODEL_VERSION})",
        )
    return st, name


@handle_errors
async def model_meta(request: Request) -> Response:
    _, name = _model(request)
    return JSONResponse(model_metadata(name))


@handle_errors
async def model_ready(request: Request) -> Response:
    st, _ = _model(request)
    require_ready(st)
    return Response(status_code=200)


async def _generate_one(
    request: Request,
    st: AppState,
    spec: GenerationSpec,
    prepared: tuple[list[int], Any] | None = None,
) -> str:
    prompt_ids, params = prepared or await prepare(st, spec, "text_input")
    done = await run_to_completion(request, st, prompt_ids, params)
    return (spec.prompt if spec.echo_prompt else "") + done.text  # type: ignore[operator]


@handle_errors
async def infer(request: Request) -> Response:
    st, name = _model(request)
    require_ready(st)
    body = await read_body(request, st.config.max_body_bytes)
    header = request.headers.get(HEADER_LENGTH)
    if header is not None and not header.isdigit():
        raise ProtocolError(400, f"{HEADER_LENGTH} must be an integer")
    req, tensors = decode_infer_request(body, int(header) if header is not None else None)
    sparse = sparse_from_parameters(req.parameters)
    if any(tensors.get("stream", ((), [False]))[1]):
        raise ProtocolError(400, "stream=true needs /v2/models/{m}/generate_stream", param="stream")
    specs = specs_from_tensors(tensors, sparse)
    prepared = [await prepare(st, s, "text_input") for s in specs]  # all rows valid first
    rows = [
        asyncio.ensure_future(_generate_one(request, st, s, p)) for s, p in zip(specs, prepared)
    ]
    try:
        texts = await asyncio.gather(*rows)
    except BaseException:
        for row in rows:  # one row failed: cancel (and so abort) the others
            row.cancel()
        raise
    shape = tensors["text_input"][0]
    binary = bool((req.parameters or {}).get("binary_data_output")) or any(
        bool((o.parameters or {}).get("binary_data")) for o in req.outputs or []
    )
    return _infer_response(name, req.id, shape, list(texts), binary)


def _infer_response(
    name: str, req_id: str | None, shape: list[int], texts: list[str], binary: bool
) -> Response:
    out: dict[str, Any] = {"name": "text_output", "datatype": "BYTES", "shape": shape}
    head: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
    if req_id is not None:
        head["id"] = req_id
    if not binary:
        out["data"] = texts
        head["outputs"] = [out]
        return JSONResponse(head)
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))
    out["parameters"] = {"binary_data_size": len(raw)}
    head["outputs"] = [out]
    header = json.dumps(head).encode()
    return Response(
        header + raw,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


async def _generate_spec(request: Request) -> tuple[AppState, str, GenerationSpec]:
    st, name = _model(request)
    require_ready(st)
    body = parse_json_object(await read_body(request, st.config.max_body_bytes))
    tensors, params = generate_body_to_tensors(body)
    specs = specs_from_tensors(tensors, sparse_from_parameters(params))
    if len(specs) != 1:
        raise ProtocolError(
            400, "generate takes one text_input; use infer for a batch", param="text_input"
        )
    return st, name, specs[0]


@handle_errors
async def generate(request: Request) -> Response:
    st, name, spec = await _generate_spec(request)
    text = await _generate_one(request, st, spec)
    return JSONResponse({"model_name": name, "model_version": MODEL_VERSION, "text_output": text})


@handle_errors
async def generate_stream(request: Request) -> Response:
    st, name, spec = await _generate_spec(request)
    prompt_ids, params = await prepare(st, spec, "text_input")
    stream = st.engine.submit(prompt_ids, params)
    first, rest = await first_delta(request, stream)
    prefix = spec.prompt if spec.echo_prompt else ""

    async def events() -> AsyncIterator[bytes]:
        base = {"model_name": name, "model_version": MODEL_VERSION}
        delta, head = first, prefix
        try:
            while True:
                if delta.text or head or delta.finished:
                    event = {**base, "text_output": head + delta.text}
                    if delta.finished:
                        event["finish_reason"] = delta.finish_reason
                    yield sse(event)
                    head = ""
                if delta.finished:
                    return
                delta = await rest.__anext__()
        except Exception as e:  # noqa: BLE001 - after the first chunk errors go in-stream
            yield sse({"error": str(e)})

    return EventStream(events(), stream.close)
