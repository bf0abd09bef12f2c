"""The HTTP server end to end: uvicorn in a subprocess on loopback, driven by the official
tritonclient and openai clients, outputs checked against the offline LLMEngine.generate."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import numpy as np
import openai
import pytest
import torch
import tritonclient.http as triton
from server_harness import API_KEY, MAX_CONTEXT, MODEL, ServerProcess, build_tiny_engine, scrape
from tritonclient.utils import InferenceServerException

from spinserve.control.engine import LLMEngine
from spinserve.runtime.sampling import SamplingParams

TIMEOUT_S = 60.0
WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "café", "文字", "→", "zeta"]


def random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("srv"), seed=random.randrange(1 << 16))


@pytest.fixture(scope="module")
def server(engine_dir):
    srv = ServerProcess(engine_dir)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def offline(engine_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (see server_harness): fast on shared cores
    yield LLMEngine.from_engine_dir(engine_dir, device="cpu", **{"cache.kv_cache_tokens": 4096})
    torch.set_num_threads(threads)


def greedy(offline, prompts, max_tokens: int, chat: bool = False, ignore_eos: bool = True):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    ids = [offline.encode(p, chat=chat) for p in prompts]
    return offline.generate(ids, params)


def oai(server, cls=openai.OpenAI):
    return cls(base_url=f"{server.base_url}/v1", api_key=API_KEY, timeout=TIMEOUT_S, max_retries=0)


def wait_idle(server, since_idle_checks: float, timeout_s: float = 20.0) -> dict[str, float]:
    """Poll /metrics until the engine went idle after `since_idle_checks`; return the scrape."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = scrape(server)
        if (
            m["spinserve_engine_idle_total"] > since_idle_checks
            and m["spinserve_requests_inflight"] == 0
        ):
            return m
        time.sleep(0.05)
    raise TimeoutError("engine did not go idle")


# ---- KServe v2 with tritonclient ------------------------------------------------------------
def test_triton_health_and_metadata(server):
    client = triton.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    h = server.headers
    assert client.is_server_live(headers=h) and client.is_server_ready(headers=h)
    assert client.is_model_ready(MODEL, headers=h)
    meta = client.get_server_metadata(headers=h)
    assert meta["name"] == "spinserve" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(MODEL, headers=h)
    assert model["name"] == MODEL
    names = {i["name"]: i["datatype"] for i in model["inputs"]}
    assert names["text_input"] == "BYTES" and names["max_tokens"] == "INT32"
    assert [o["name"] for o in model["outputs"]] == ["text_output"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model", headers=h)


@pytest.mark.parametrize("binary", [True, False])
def test_triton_infer_batch_equals_offline(server, offline, binary):
    prompts = random_prompts(2, seed=random.randrange(1 << 30))
    want = greedy(offline, prompts, max_tokens=7, ignore_eos=False)  # KServe has no ignore_eos
    client = triton.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    text = triton.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[p] for p in prompts], dtype=object), binary_data=binary)
    max_tokens = triton.InferInput("max_tokens", [2, 1], "INT32")
    max_tokens.set_data_from_numpy(np.full((2, 1), 7, np.int32), binary_data=binary)
    temp = triton.InferInput("temperature", [1, 1], "FP32")
    temp.set_data_from_numpy(np.zeros((1, 1), np.float32), binary_data=binary)
    out = triton.InferRequestedOutput("text_output", binary_data=binary)
    result = client.infer(
        MODEL, [text, max_tokens, temp], outputs=[out], headers=server.headers, request_id="req-7"
    )
    got = result.as_numpy("text_output")
    assert got.shape == (2, 1)
    decoded = [v.decode() if isinstance(v, bytes) else v for v in got.ravel()]
    assert decoded == [w.text for w in want]
    assert result.get_response()["id"] == "req-7"


def test_generate_and_generate_stream_equal_offline(server, offline):
    prompt = random_prompts(1, seed=random.randrange(1 << 30))[0]
    want = greedy(offline, [prompt], max_tokens=9, ignore_eos=False)[0]
    url = f"{server.base_url}/v2/models/{MODEL}"
    body = {
        "text_input": prompt,
        "max_tokens": 9,
        "temperature": 0.0,
        "parameters": {"algorithm": "dense"},
    }
    r = httpx.post(f"{url}/generate", json=body, headers=server.headers, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": MODEL, "model_version": "1", "text_output": want.text}
    events = []
    with httpx.stream(
        "POST", f"{url}/generate_stream", json=body, headers=server.headers, timeout=TIMEOUT_S
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(httpx.Response(200, content=line[6:]).json())
    assert "".join(e["text_output"] for e in events) == want.text
    assert events[-1]["finish_reason"] == want.finish_reason


# ---- OpenAI with the openai client ----------------------------------------------------------
def test_completions_equal_offline(server, offline):
    prompt = random_prompts(1, seed=random.randrange(1 << 30))[0]
    want = greedy(offline, [prompt], max_tokens=10)[0]
    client = oai(server)
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 10
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_equal_offline_with_template(server, offline):
    content = random_prompts(1, seed=random.randrange(1 << 30))[0]
    want = greedy(offline, [content], max_tokens=8, chat=True)[0]
    client = oai(server)
    messages = [{"role": "user", "content": content}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)  # the chat template was applied
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stop_string_cuts_output(server, offline):
    # a stop string taken from the greedy output (whole characters, past its start); random
    # weights can emit mostly partial UTF-8, so draw prompts until one yields such a string
    for _ in range(20):
        prompt = random_prompts(1, seed=random.randrange(1 << 30))[0]
        full = greedy(offline, [prompt], max_tokens=24)[0].text
        windows = (full[i : i + 2] for i in range(2, len(full) - 1))
        stops = [w for w in windows if "\ufffd" not in w and full.index(w) >= 2]
        if stops:
            break
    stop = stops[0]
    client = oai(server)
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_complete_and_correct(server, offline):
    prompts = random_prompts(32, seed=random.randrange(1 << 30))
    want = [w.text for w in greedy(offline, prompts, max_tokens=12)]

    async def one(client, prompt):
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), reasons[-1]

    async def main():
        async with oai(server, openai.AsyncOpenAI) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert [t for t, _ in results] == want
    assert all(reason == "length" for _, reason in results)


def test_disconnect_mid_stream_cancels_request(server):
    before = scrape(server)
    body = {
        "model": MODEL,
        "prompt": "cancel me",
        "max_tokens": MAX_CONTEXT - 20,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/completions",
        json=body,
        headers=server.headers,
        timeout=TIMEOUT_S,
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert received  # the stream had started
    after = wait_idle(server, before["spinserve_engine_idle_total"])
    cancelled = 'spinserve_requests_total{outcome="cancelled"}'
    assert after[cancelled] == before.get(cancelled, 0) + 1
    generated = (
        after["spinserve_generation_tokens_total"] - before["spinserve_generation_tokens_total"]
    )
    assert 0 < generated < MAX_CONTEXT - 20  # stopped early
    assert after["spinserve_requests_running"] == 0 and after["spinserve_requests_waiting"] == 0
    assert after["spinserve_kv_pages_used"] == 0  # every page freed
    assert after["spinserve_engine_integrity_ok"] == 1  # engine.check_integrity() passed


def test_metrics_agree_with_requests(server):
    before = scrape(server)
    client = oai(server)
    prompts = random_prompts(3, seed=random.randrange(1 << 30))
    n_prompt = 0
    for i, p in enumerate(prompts):
        r = client.completions.create(
            model=MODEL, prompt=p, max_tokens=4 + i, temperature=0, extra_body={"ignore_eos": True}
        )
        n_prompt += r.usage.prompt_tokens
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=server.headers,
        json={"model": MODEL, "prompt": "x", "max_tokens": -1},
    )
    assert r.status_code == 400
    after = wait_idle(server, before["spinserve_engine_idle_total"])

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('spinserve_requests_total{outcome="length"}') == 3
    assert delta('spinserve_requests_total{outcome="rejected"}') == 1
    assert delta('spinserve_http_errors_total{code="400"}') == 1
    assert delta("spinserve_prompt_tokens_total") == n_prompt
    assert delta("spinserve_generation_tokens_total") == 4 + 5 + 6
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "time_per_output_token_seconds",
    ):
        assert delta(f"spinserve_{hist}_count") == 3
        assert delta(f"spinserve_{hist}_sum") > 0
    assert after["spinserve_kv_pages_total"] > 0


def test_graceful_shutdown_finishes_inflight(server, offline):
    """SIGTERM mid-stream: the in-flight stream still completes, then the server exits."""
    prompt = random_prompts(1, seed=random.randrange(1 << 30))[0]
    want = greedy(offline, [prompt], max_tokens=16)[0].text
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    parts = []
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/completions",
        json=body,
        headers=server.headers,
        timeout=TIMEOUT_S,
    ) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                parts.append(line)
                break
        server.proc.send_signal(signal.SIGTERM)
        parts.extend(line for line in lines if line.startswith("data: "))
    assert parts[-1] == "data: [DONE]"
    text = "".join(
        httpx.Response(200, content=p[6:]).json()["choices"][0]["text"] for p in parts[:-1]
    )
    assert text == want
    assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/v2/health/live", timeout=2)
