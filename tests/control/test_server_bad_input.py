"""Bad requests: each gets a 4xx in its protocol's error shape with a message, and the server
keeps serving (health and a real generation) afterwards."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
from server_harness import MAX_BODY_BYTES, MAX_CONTEXT, MODEL, ServerProcess, build_tiny_engine

TIMEOUT_S = 30.0
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INFER = f"/v2/models/{MODEL}/infer"
GENERATE = f"/v2/models/{MODEL}/generate"
STREAM = f"/v2/models/{MODEL}/generate_stream"


def completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra}


def chat(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


def infer_json(*inputs: dict, **extra) -> dict:
    text = {"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hello"]}
    return {"inputs": [text, *inputs], **extra}


def binary_infer(payload: bytes) -> tuple[bytes, dict]:
    """A binary-tensor infer body whose text_input element is `payload` (raw bytes)."""
    raw = struct.pack("<I", len(payload)) + payload
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text_input",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


# (id, path, body: dict | bytes, extra headers, status, substring of the message)
CASES = [
    (
        "malformed-json-openai",
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": ',
        {},
        400,
        "malformed JSON",
    ),
    ("malformed-json-kserve", GENERATE, b"{not json}", {}, 400, "malformed JSON"),
    ("not-an-object", CHAT, b"[1, 2]", {}, 400, "JSON object"),
    ("wrong-type-max-tokens", COMPLETIONS, completion(max_tokens="16"), {}, 400, "max_tokens"),
    ("wrong-type-temperature", CHAT, chat(temperature="hot"), {}, 400, "temperature"),
    ("wrong-type-messages", CHAT, chat(messages="hi"), {}, 400, "messages"),
    (
        "wrong-type-kserve-input",
        GENERATE,
        {"text_input": 42, "max_tokens": 4},
        {},
        400,
        "text_input",
    ),
    (
        "wrong-datatype-infer",
        INFER,
        infer_json({"name": "max_tokens", "shape": [1, 1], "datatype": "BYTES", "data": ["4"]}),
        {},
        400,
        "max_tokens must be INT",
    ),
    (
        "shape-mismatch-infer",
        INFER,
        infer_json({"name": "max_tokens", "shape": [1, 2], "datatype": "INT32", "data": [4]}),
        {},
        400,
        "shape",
    ),
    ("unknown-field-openai", COMPLETIONS, completion(frobnicate=1), {}, 400, "frobnicate"),
    (
        "unknown-input-kserve",
        GENERATE,
        {"text_input": "hi", "max_tokens": 4, "colour": "red"},
        {},
        400,
        "colour",
    ),
    (
        "unknown-input-infer",
        INFER,
        infer_json({"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}),
        {},
        400,
        "colour",
    ),
    (
        "unknown-parameter",
        GENERATE,
        {"text_input": "hi", "max_tokens": 4, "parameters": {"algoritm": "quest"}},
        {},
        400,
        "algoritm",
    ),
    (
        "unknown-sparse-algorithm",
        COMPLETIONS,
        completion(parameters={"algorithm": "magic"}),
        {},
        400,
        "unknown sparse algorithm",
    ),
    (
        "zero-sparse-budget",
        GENERATE,
        {"text_input": "hi", "max_tokens": 4, "parameters": {"budget": 0}},
        {},
        400,
        "budget",
    ),
    ("unsupported-n", COMPLETIONS, completion(n=2), {}, 400, "not supported"),
    (
        "unsupported-beam-width",
        GENERATE,
        {"text_input": "hi", "max_tokens": 4, "beam_width": 4},
        {},
        400,
        "beam_width",
    ),
    ("negative-max-tokens", COMPLETIONS, completion(max_tokens=-3), {}, 400, "max_tokens"),
    (
        "negative-max-tokens-kserve",
        STREAM,
        {"text_input": "hi", "max_tokens": -1},
        {},
        400,
        "max_tokens",
    ),
    ("huge-max-tokens", CHAT, chat(max_tokens=10**9), {}, 400, "maximum context length"),
    (
        "huge-max-tokens-kserve",
        GENERATE,
        {"text_input": "hi", "max_tokens": 10**6},
        {},
        400,
        "maximum context length",
    ),
    ("unknown-model-openai", COMPLETIONS, completion(model="gpt-17"), {}, 404, "gpt-17"),
    (
        "unknown-model-kserve",
        "/v2/models/gpt-17/generate",
        {"text_input": "hi"},
        {},
        404,
        "unknown model",
    ),
    (
        "prompt-over-context",
        COMPLETIONS,
        completion(prompt="x" * (MAX_CONTEXT + 10)),
        {},
        400,
        "maximum context length",
    ),
    (
        "prompt-over-context-kserve",
        INFER,
        {
            "inputs": [
                {
                    "name": "text_input",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": ["y" * MAX_CONTEXT],
                }
            ]
        },
        {},
        400,
        "maximum context length",
    ),
    (
        "invalid-utf8-body",
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": "\xff\xfe"}',
        {},
        400,
        "UTF-8",
    ),
    ("invalid-utf8-binary-tensor", INFER, *binary_infer(b"ok \xc3\x28 bad"), 400, "UTF-8"),
    (
        "lone-surrogate",
        CHAT,
        b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud800"}]}',
        {},
        400,
        "surrogate",
    ),
    (
        "oversize-body",
        COMPLETIONS,
        completion(prompt="z" * (MAX_BODY_BYTES + 1)),
        {},
        413,
        "exceeds the limit",
    ),
    ("empty-messages", CHAT, chat(messages=[]), {}, 400, "messages"),
    ("bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), {}, 400, "role"),
    ("empty-prompt", GENERATE, {"text_input": "", "max_tokens": 4}, {}, 400, "empty"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(build_tiny_engine(tmp_path_factory.mktemp("bad"), seed=3))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _check_shape(path: str, body: dict, message_part: str) -> None:
    if path.startswith("/v1"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        message = err["message"]
    else:
        assert set(body) == {"error"}
        message = body["error"]
    assert isinstance(message, str) and message_part.lower() in message.lower(), message


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_4xx_in_protocol_shape(server, case):
    _, path, body, headers, status, message_part = case
    all_headers = {**server.headers, **headers}
    if isinstance(body, bytes):
        all_headers.setdefault("Content-Type", "application/json")
        r = httpx.post(server.base_url + path, content=body, headers=all_headers, timeout=TIMEOUT_S)
    else:
        r = httpx.post(server.base_url + path, json=body, headers=all_headers, timeout=TIMEOUT_S)
    assert r.status_code == status, r.text
    _check_shape(path, r.json(), message_part)
    assert httpx.get(f"{server.base_url}/v2/health/ready", timeout=5).status_code == 200


@pytest.mark.parametrize("path", [COMPLETIONS, GENERATE, "/metrics", f"/v2/models/{MODEL}"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "test-key-1234"])
def test_missing_or_wrong_auth_is_401(server, path, auth):
    headers = {"Authorization": auth} if auth else {}
    method = "POST" if path in (COMPLETIONS, GENERATE) else "GET"
    r = httpx.request(method, server.base_url + path, json={}, headers=headers, timeout=TIMEOUT_S)
    assert r.status_code == 401
    _check_shape(path, r.json(), "API key")
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_auth_and_server_still_generates(server):
    for probe in ("live", "ready"):
        assert httpx.get(f"{server.base_url}/v2/health/{probe}", timeout=5).status_code == 200
    r = httpx.post(
        server.base_url + COMPLETIONS,
        json=completion(max_tokens=3, ignore_eos=True),
        headers=server.headers,
        timeout=TIMEOUT_S,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = httpx.post(
        server.base_url + GENERATE,
        json={"text_input": "hi", "max_tokens": 2},
        headers=server.headers,
        timeout=TIMEOUT_S,
    )
    assert r.status_code == 200 and isinstance(r.json()["text_output"], str)
    nulls = chat(max_tokens=3, temperature=None, top_p=None, stop=None, seed=None, ignore_eos=True)
    r = httpx.post(server.base_url + CHAT, json=nulls, headers=server.headers, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text  # null means "default", as OpenAI's API takes it
    assert r.json()["usage"]["completion_tokens"] == 3
