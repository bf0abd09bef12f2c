"""`spinserve bench engine`: the serve workloads offline through LLMEngine (tiny engine, CPU):
exact totals, the concurrency cap, the same key names as `bench serve`; refused requests count
as failures (exit status 1)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from spinserve.perf.cli_bench import bench_main
from spinserve.perf.workloads import get_workload, make_requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "control"))
from server_harness import build_tiny_engine  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(
        tmp_path_factory.mktemp("bench-engine"), seed=random.randrange(1 << 16)
    )


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a few shared cores OpenMP teams spin against each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def text_file(tmp_path):
    rng = random.Random()
    path = tmp_path / "text.txt"
    path.write_text(
        " ".join(rng.choice(["morning", "evening", "waters", "light"]) for _ in range(20000))
    )
    return path


def engine_args(engine_dir: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return [
        "engine",
        "--engine",
        str(engine_dir),
        "--device",
        "cpu",
        "--workload",
        "longbench-v2",
        "--scale",
        "0.002",
        "--text-file",
        str(text),
        "--result-dir",
        str(out),
        "--no-progress",
        "--no-plots",
        "--num-warmups",
        "1",
        *extra,
    ]


def test_engine_exact_totals_and_cap(engine_dir, text_file, tmp_path):
    from spinserve.engines.loader import load_tokenizer

    seed = random.randrange(1 << 20)
    rc = bench_main(
        engine_args(
            engine_dir,
            tmp_path,
            text_file,
            "--num-prompts",
            "7",
            "--seed",
            str(seed),
            "--max-concurrency",
            "2",
            "--request-rate",
            "inf",
            "50",
            "--save-detailed",
        )
    )
    assert rc == 0
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [
        "spinserve-engine-longbench-v2-50.0qps-concurrency2.json",
        "spinserve-engine-longbench-v2-infqps-concurrency2.json",
    ]
    reqs = make_requests(
        get_workload("longbench-v2").scaled(0.002),
        load_tokenizer(engine_dir),
        7,
        seed,
        text_file.read_text(),
    )
    serve_keys = {
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p90_itl_ms",
        "mean_e2el_ms",
        "request_goodput",
    }
    for f in files:
        res = json.loads(f.read_text())
        assert serve_keys <= set(res)
        assert (res["completed"], res["failed"]) == (7, 0)
        assert res["total_input_tokens"] == sum(r.prompt_len for r in reqs)
        assert res["output_lens"] == [r.output_len for r in reqs]
        assert res["max_concurrent_requests"] <= 2
        for n_out, itl, ttft, lat in zip(
            res["output_lens"], res["itls"], res["ttfts"], res["latencies"]
        ):
            assert len(itl) == n_out - 1  # one token per step per request
            assert ttft + sum(itl) == pytest.approx(lat, abs=1e-6)
    # one comparison figure from the saved runs (per-request lists give the CDFs)
    assert bench_main(["plot", *map(str, files), "--out-prefix", str(tmp_path / "cmp")]) == 0
    for png in ("throughput", "latency-cdf"):
        assert (tmp_path / f"cmp-{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refused_requests_are_failures(engine_dir, text_file, tmp_path):
    # a 48-token KV pool: every prompt (64+ tokens) is refused by add_request
    rc = bench_main(
        engine_args(
            engine_dir,
            tmp_path,
            text_file,
            "--num-prompts",
            "3",
            "--num-warmups",
            "0",
            "--kv-cache-tokens",
            "48",
            "--save-detailed",
        )
    )
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rc == 1
    assert (res["completed"], res["failed"]) == (0, 3)
    assert len(res["errors"]) == 3
    assert all(e.startswith("RequestError: prompt of ") for e in res["errors"])
