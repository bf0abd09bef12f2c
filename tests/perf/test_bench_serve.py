"""`spinserve bench serve` against the real server (uvicorn in a subprocess, tiny engine, CPU):
exact token totals, vLLM key names, plots; failures (HTTP errors, an unreachable server, a
server killed mid-run, in-stream error chunks, cut streams) counted with exit status 1."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from spinserve.perf.bench_serve import load_tokenizer, send_request
from spinserve.perf.cli_bench import bench_main
from spinserve.perf.serve_metrics import RequestResult
from spinserve.perf.workloads import get_workload, make_requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "control"))
from server_harness import API_KEY, ServerProcess, build_tiny_engine, scrape  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALE = "0.002"  # longbench-v2 x 0.002: prompts 64-240 tokens, outputs 1-30 tokens


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("bench"), seed=random.randrange(1 << 16))


@pytest.fixture(scope="module")
def server(engine_dir):
    srv = ServerProcess(engine_dir)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def text_file(tmp_path):
    words = ["light", "water", "earth", "heaven", "day", "night", "seed", "fruit", "firmament"]
    rng = random.Random()
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(20000)))
    return path


def serve_args(url: str, engine_dir: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [
        "serve",
        "--base-url",
        url,
        "--api-key",
        API_KEY,
        "--tokenizer",
        str(engine_dir),
        "--workload",
        "longbench-v2",
        "--scale",
        SCALE,
        "--text-file",
        str(text),
        "--result-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


def only_result(out: Path) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_serve_exact_totals_keys_and_plots(server, engine_dir, text_file, tmp_path):
    seed = random.randrange(1 << 20)
    before = scrape(server)
    rc = bench_main(
        serve_args(
            server.base_url,
            engine_dir,
            tmp_path,
            text_file,
            "--num-prompts",
            "6",
            "--seed",
            str(seed),
            "--request-rate",
            "20",
            "--max-concurrency",
            "3",
            "--num-warmups",
            "1",
            "--goodput",
            "e2el:600000",
            "--save-detailed",
        )
    )
    assert rc == 0
    res = only_result(tmp_path)
    reqs = make_requests(
        get_workload("longbench-v2").scaled(float(SCALE)),
        load_tokenizer(engine_dir),
        6,
        seed,
        text_file.read_text(),
    )
    assert (res["completed"], res["failed"]) == (6, 0)
    assert res["total_input_tokens"] == sum(r.prompt_len for r in reqs)
    assert res["total_output_tokens"] == sum(r.output_len for r in reqs)  # ignore_eos
    assert res["output_lens"] == [r.output_len for r in reqs]
    assert res["request_goodput"] == pytest.approx(6 / res["duration"])
    assert 1 <= res["max_concurrent_requests"] <= 3
    for k in (
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "p90_tpot_ms",
        "mean_itl_ms",
        "median_e2el_ms",
        "p99_e2el_ms",
    ):
        assert isinstance(res[k], float), k
    assert res["request_rate"] == 20.0 and res["max_concurrency"] == 3
    for ttft, lat in zip(res["ttfts"], res["latencies"]):
        assert 0 < ttft <= lat
    # the server generated exactly what the client counted (+ the warm-up request)
    after = scrape(server)
    gen = "spinserve_generation_tokens_total"
    assert after[gen] - before[gen] == res["total_output_tokens"] + reqs[0].output_len
    for png in ("throughput", "latency-cdf"):
        path = tmp_path / f"{res['label']}-{png}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_http_errors_are_counted(server, engine_dir, text_file, tmp_path):
    rc = bench_main(
        serve_args(
            server.base_url,
            engine_dir,
            tmp_path,
            text_file,
            "--num-prompts",
            "3",
            "--model",
            "no-such-model",
            "--num-warmups",
            "0",
            "--no-plots",
        )
    )
    res = only_result(tmp_path)
    assert rc == 1
    assert (res["completed"], res["failed"]) == (0, 3)
    assert res["error_summary"][0].startswith("3 x HTTP 4")


def test_unreachable_server(engine_dir, text_file, tmp_path):
    from server_harness import free_port

    url = f"http://127.0.0.1:{free_port()}"
    rc = bench_main(serve_args(url, engine_dir, tmp_path, text_file, "--num-prompts", "4"))
    res = only_result(tmp_path)
    assert rc == 1
    assert (res["completed"], res["failed"]) == (0, 4)
    assert "unreachable" in res["error_summary"][0]


def test_server_killed_mid_run(engine_dir, text_file, tmp_path, capsys):
    srv = ServerProcess(engine_dir)
    rc: list[int] = []
    try:
        srv.wait_ready()
        args = serve_args(
            srv.base_url,
            engine_dir,
            tmp_path,
            text_file,
            "--num-prompts",
            "8",
            "--workload",
            "longgenbench",
            "--scale",
            "0.01",
            "--request-rate",
            "4",
            "--num-warmups",
            "0",
            "--no-plots",
        )  # outputs of 70-320 tokens
        bench = threading.Thread(target=lambda: rc.append(bench_main(args)))
        bench.start()
        deadline = time.monotonic() + 60
        while scrape(srv).get("spinserve_requests_inflight", 0) < 1:
            assert time.monotonic() < deadline and bench.is_alive()
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGKILL)
        bench.join(60)
    finally:
        srv.stop()
    res = only_result(tmp_path)
    assert rc == [1]
    assert res["failed"] >= 1 and res["completed"] + res["failed"] == 8
    assert "FAILED:" in capsys.readouterr().out


def _sse_client(body: bytes, status: int = 200) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _send(body: bytes, status: int = 200) -> RequestResult:
    async def go():
        async with _sse_client(body, status) as client:
            return await send_request(
                client, "http://x/v1/completions", {}, {}, RequestResult(4, 2)
            )

    return asyncio.run(go())


def test_stream_chunks_errors_and_cuts():
    ok = (
        b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
        b'data: {"choices":[{"text":"b","finish_reason":null}]}\n\n'
        b'data: {"choices":[{"text":"","finish_reason":"length"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    r = _send(ok)
    assert (r.success, r.output_tokens, len(r.itl), r.error) == (True, 2, 1, "")
    assert 0 < r.ttft <= r.latency
    err = (
        b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
        b'data: {"error":{"message":"generation failed: boom","type":"internal"}}\n\n'
        b"data: [DONE]\n\n"
    )
    r = _send(err)
    assert not r.success and r.error == "in-stream error: generation failed: boom"
    r = _send(b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n')
    assert not r.success and r.error == "stream ended before `data: [DONE]`"
    r = _send(b'{"error":{"message":"queue full"}}', status=503)
    assert not r.success and r.error == "HTTP 503: queue full"
    r = _send(b"data: {not json}\n\n")
    assert not r.success and r.error.startswith("malformed stream chunk")
