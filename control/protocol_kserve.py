"""KServe v2 / Triton requests with the TensorRT-LLM ensemble's input names -> GenerationSpec.

`/v2/models/{m}/infer` carries tensors: JSON `data`, or the binary tensor extension (a JSON header
of `Inference-Header-Content-Length` bytes, then each input's raw bytes, BYTES elements as
4-byte little-endian length + bytes), which is what tritonclient sends by default.
`/generate` and `/generate_stream` carry the same inputs as top-level JSON keys. Inputs the
ensemble defines but spinserve does not implement are accepted only at their neutral value.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import (
    GenerationSpec,
    ProtocolError,
    SparseParameters,
    _stop_list,
    check_text,
    parse_json_object,
    validation_error,
)

INT_TYPES = {
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
}
FLOAT_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}

# ensemble input name -> (family, description); family in BYTES / INT / FP / BOOL
ENSEMBLE_INPUTS: dict[str, tuple[str, str]] = {
    "text_input": ("BYTES", "prompt text, one per batch row"),
    "max_tokens": ("INT", "tokens to generate"),
    "temperature": ("FP", "0 = greedy"),
    "top_k": ("INT", "0 = off"),
    "top_p": ("FP", "1 = off"),
    "random_seed": ("INT", "sampling seed"),
    "end_id": ("INT", "extra stop token id"),
    "pad_id": ("INT", "accepted, unused"),
    "stop_words": ("BYTES", "stop strings"),
    "bad_words": ("BYTES", "must be empty"),
    "stream": ("BOOL", "generate_stream only"),
    "exclude_input_in_output": ("BOOL", "default true: text_output is the completion only"),
    "beam_width": ("INT", "must be 1"),
    "length_penalty": ("FP", "must be 1"),
    "repetition_penalty": ("FP", "must be 1"),
    "presence_penalty": ("FP", "must be 0"),
    "frequency_penalty": ("FP", "must be 0"),
    "min_length": ("INT", "must be <= 1"),
    "return_log_probs": ("BOOL", "must be false"),
    "return_context_logits": ("BOOL", "must be false"),
    "return_generation_logits": ("BOOL", "must be false"),
}
NEUTRAL = {
    "beam_width": (1,),
    "length_penalty": (1.0,),
    "repetition_penalty": (1.0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "min_length": (0, 1),
    "return_log_probs": (False,),
    "return_context_logits": (False,),
    "return_generation_logits": (False,),
}
OUTPUTS = {"text_output"}
REQUEST_PARAMETERS = {"algorithm", "budget", "binary_data_output", "priority"}


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _decode_binary(t: InferTensor, raw: bytes) -> list[Any]:
    if t.datatype == "BYTES":
        values, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ProtocolError(400, f"input {t.name}: truncated BYTES element")
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > len(raw):
                raise ProtocolError(400, f"input {t.name}: truncated BYTES element")
            values.append(raw[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return values
    np_type = {**INT_TYPES, **FLOAT_TYPES, "BOOL": "?"}.get(t.datatype)
    if np_type is None or len(raw) % np.dtype(np_type).itemsize:
        raise ProtocolError(400, f"input {t.name}: {len(raw)} bytes do not hold {t.datatype}")
    return np.frombuffer(raw, dtype=np_type).tolist()


def _check_values(t: InferTensor, values: list[Any]) -> list[Any]:
    family = ENSEMBLE_INPUTS[t.name][0]
    kind_ok = {
        "BYTES": t.datatype == "BYTES",
        "INT": t.datatype in INT_TYPES,
        "FP": t.datatype in FLOAT_TYPES or t.datatype in INT_TYPES,
        "BOOL": t.datatype == "BOOL",
    }[family]
    if not kind_ok:
        raise ProtocolError(
            400, f"input {t.name} must be {family} (got {t.datatype})", param=t.name
        )
    if math.prod(t.shape) != len(values) or any(d < 0 for d in t.shape):
        raise ProtocolError(
            400,
            f"input {t.name}: shape {t.shape} does not match {len(values)} elements",
            param=t.name,
        )
    out = []
    for v in values:
        if family == "BYTES":
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(
                        400, f"input {t.name} is not valid UTF-8", param=t.name
                    ) from None
            if not isinstance(v, str):
                raise ProtocolError(400, f"input {t.name}: elements must be strings")
            v = check_text(v, t.name)
        elif family == "INT" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ProtocolError(400, f"input {t.name}: elements must be integers")
        elif family == "FP" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ProtocolError(400, f"input {t.name}: elements must be numbers")
        elif family == "BOOL" and not isinstance(v, bool):
            raise ProtocolError(400, f"input {t.name}: elements must be booleans")
        out.append(v)
    return out


def decode_infer_request(body: bytes, header_len: int | None) -> tuple[InferRequest, dict]:
    """Parse an infer body -> (request, {input name: (shape, flat values)})."""
    if header_len is not None and not 0 < header_len <= len(body):
        raise ProtocolError(
            400,
            f"Inference-Header-Content-Length {header_len} is outside the body ({len(body)} bytes)",
        )
    head, tail = (body, b"") if header_len is None else (body[:header_len], body[header_len:])
    try:
        req = InferRequest.model_validate(parse_json_object(head))
    except ValidationError as e:
        raise validation_error(e) from None
    tensors, offset = {}, 0
    for t in req.inputs:
        if t.name not in ENSEMBLE_INPUTS:
            raise ProtocolError(
                400,
                f"unexpected inference input {t.name!r}; known: {', '.join(ENSEMBLE_INPUTS)}",
                param=t.name,
            )
        if t.name in tensors:
            raise ProtocolError(400, f"input {t.name!r} given twice", param=t.name)
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise ProtocolError(
                    400, f"input {t.name}: binary_data_size {size} runs past the body"
                )
            values = _decode_binary(t, tail[offset : offset + size])
            offset += size
        elif t.data is not None:
            values = _flatten(t.data)
        else:
            raise ProtocolError(400, f"input {t.name} has neither data nor binary_data_size")
        tensors[t.name] = (t.shape, _check_values(t, values))
    if offset != len(tail):
        raise ProtocolError(400, f"{len(tail) - offset} trailing bytes after the binary inputs")
    for o in req.outputs or []:
        if o.name not in OUTPUTS:
            raise ProtocolError(400, f"unknown output {o.name!r}; this model has text_output")
    return req, tensors


def generate_body_to_tensors(body: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """A /generate JSON body -> ({input name: (shape, values)}, parameters)."""
    tensors = {}
    params = body.pop("parameters", None) or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "parameters must be a JSON object", param="parameters")
    body.pop("id", None)
    for name, value in body.items():
        if name not in ENSEMBLE_INPUTS:
            raise ProtocolError(
                400,
                f"unexpected inference input {name!r}; known: {', '.join(ENSEMBLE_INPUTS)}",
                param=name,
            )
        values = _flatten(value) if isinstance(value, list) else [value]
        family = ENSEMBLE_INPUTS[name][0]
        datatype = _json_datatype(family, values)
        t = InferTensor(name=name, shape=[len(values)], datatype=datatype)
        tensors[name] = ([len(values)], _check_values(t, values))
    return tensors, params


def _json_datatype(family: str, values: list[Any]) -> str:
    if family == "FP" and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    return {"BYTES": "BYTES", "INT": "INT64", "FP": "FP64", "BOOL": "BOOL"}[family]


def sparse_from_parameters(params: dict[str, Any] | None) -> SparseParameters:
    params = dict(params or {})
    unknown = set(params) - REQUEST_PARAMETERS
    if unknown:
        raise ProtocolError(
            400,
            f"unknown parameters {sorted(unknown)}; known: {sorted(REQUEST_PARAMETERS)}",
            param="parameters",
        )
    if params.get("priority", 0) != 0:
        raise ProtocolError(400, "priority is not supported: leave it at 0", param="priority")
    try:
        return SparseParameters.model_validate(
            {k: params[k] for k in ("algorithm", "budget") if k in params}
        )
    except ValidationError as e:
        raise validation_error(e) from None


def specs_from_tensors(tensors: dict, sparse: SparseParameters) -> list[GenerationSpec]:
    """One GenerationSpec per text_input row; scalars broadcast, per-row values split."""
    if "text_input" not in tensors:
        raise ProtocolError(400, "input text_input is required", param="text_input")
    shape, prompts = tensors["text_input"]
    rows = len(prompts)
    if rows == 0:
        raise ProtocolError(400, "text_input is empty", param="text_input")
    for name, neutral in NEUTRAL.items():
        if name in tensors and any(v not in neutral for v in tensors[name][1]):
            raise ProtocolError(
                400, f"{name} is not supported by spinserve: use {neutral[0]!r}", param=name
            )
    if any(tensors.get("bad_words", ((), []))[1]):
        raise ProtocolError(
            400, "bad_words is not supported by spinserve: send it empty", param="bad_words"
        )

    def per_row(name: str, default: Any) -> list[Any]:
        if name not in tensors:
            return [default] * rows
        values = tensors[name][1]
        if len(values) == 1:
            return values * rows
        if len(values) != rows:
            raise ProtocolError(
                400,
                f"input {name} has {len(values)} elements for {rows} "
                "prompts: give 1 or one per prompt",
                param=name,
            )
        return values

    stop_rows = _stop_rows(tensors, rows)
    cols = {
        name: per_row(name, default)
        for name, default in (
            ("max_tokens", 16),
            ("temperature", 1.0),
            ("top_p", 1.0),
            ("top_k", 0),
            ("random_seed", None),
            ("end_id", None),
            ("exclude_input_in_output", True),
        )
    }
    specs = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ProtocolError(400, "text_input is empty", param="text_input")
        max_tokens = cols["max_tokens"][i]
        if max_tokens < 1:
            raise ProtocolError(
                400, f"max_tokens must be >= 1 (got {max_tokens})", param="max_tokens"
            )
        end_id = cols["end_id"][i]
        specs.append(
            GenerationSpec(
                prompt,
                max_tokens,
                float(cols["temperature"][i]),
                float(cols["top_p"][i]),
                cols["top_k"][i],
                cols["random_seed"][i],
                stop_rows[i],
                [end_id] if end_id is not None else [],
                False,
                sparse.algorithm,
                sparse.budget,
                echo_prompt=not cols["exclude_input_in_output"][i],
            )
        )
    return specs


def _stop_rows(tensors: dict, rows: int) -> list[list[str]]:
    if "stop_words" not in tensors:
        return [[] for _ in range(rows)]
    shape, words = tensors["stop_words"]
    if rows > 1 and len(shape) >= 2 and shape[0] == rows:
        per = len(words) // rows
        return [_stop_list([w for w in words[i * per : (i + 1) * per] if w]) for i in range(rows)]
    shared = _stop_list([w for w in words if w])
    return [list(shared) for _ in range(rows)]


def model_metadata(name: str) -> dict[str, Any]:
    """GET /v2/models/{m}: the ensemble-style inputs and the text_output output."""
    dtype = {"BYTES": "BYTES", "INT": "INT32", "FP": "FP32", "BOOL": "BOOL"}
    inputs = [
        {
            "name": n,
            "datatype": dtype[f] if n != "random_seed" else "UINT64",
            "shape": [-1, -1] if n in ("text_input", "stop_words", "bad_words") else [-1, 1],
            "optional": n != "text_input",
        }
        for n, (f, _) in ENSEMBLE_INPUTS.items()
    ]
    return {
        "name": name,
        "versions": ["1"],
        "platform": "spinserve",
        "inputs": inputs,
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}],
    }
