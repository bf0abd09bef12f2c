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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ---- fixed lengths, token-id prompts, engine-side metrics, the headline table ----------------
@pytest.fixture(scope="module")
def random_engine_dir(tmp_path_factory):
    from spinserve.engines.random_engine import build_random_engine

    return build_random_engine(
        "tiny-llama", tmp_path_factory.mktemp("rnd") / "eng", seed=random.randrange(1 << 16)
    )


def test_fixed_lengths_and_token_id_prompts(random_engine_dir):
    from spinserve.engines.loader import load_tokenizer

    tok = load_tokenizer(random_engine_dir)
    wl = get_workload("longgenbench").with_fixed(output_len=100).fit_context(4096)
    assert (wl.output_len.lo, wl.output_len.hi) == (100, 100)
    assert wl.input_len.hi <= 3996 and wl.max_total_tokens <= 4096
    assert wl.describe()["output_len"]["fixed"] and "fixed" not in wl.describe()["input_len"]
    both = wl.with_fixed(input_len=3000)
    assert both.fit_context(3100) == both  # nothing left to scale
    with pytest.raises(ValueError, match="leave no room"):
        both.fit_context(3099)

    seed = random.randrange(1 << 20)
    fixed = wl.with_fixed(input_len=50)
    reqs = make_requests(fixed, tok, 5, seed, prompt_ids="random", vocab_size=512)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(50, 100)] * 5
    ids = [t for r in reqs for t in r.prompt_ids]
    assert min(ids) >= 3 and max(ids) < 512  # never <unk>, <s>, </s>
    again = make_requests(fixed, tok, 5, seed, prompt_ids="random", vocab_size=512)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]

    # text-rank: b (3 times) -> first regular id 3, a (2) -> 4, c (1) -> 5
    two = wl.with_fixed(input_len=6)
    (req,) = make_requests(two, tok, 1, seed, "b a b c b a", prompt_ids="text-rank")
    ring = [3, 4, 3, 5, 3, 4]
    start = next(i for i in range(6) if (ring * 2)[i : i + 6] == req.prompt_ids)
    assert req.prompt_ids == (ring * 2)[start : start + 6]
    with pytest.raises(ValueError, match="unknown prompt ids"):
        make_requests(two, tok, 1, seed, "x", prompt_ids="bytes")


def _engine_run(engine_dir, out, *extra):
    return bench_main(
        [
            "engine",
            "--engine",
            str(engine_dir),
            "--device",
            "cpu",
            "--workload",
            "longgenbench",
            "--result-dir",
            str(out),
            "--no-progress",
            "--no-plots",
            "--save-detailed",
            "--prompt-ids",
            "random",
            *extra,
        ]
    )


def test_engine_metrics_with_hierarchy(random_engine_dir, tmp_path, monkeypatch):
    for key, value in {
        "SPIN_SPARSE__ALGORITHM": "quest",
        "SPIN_SPARSE__BUDGET_TOKENS": "32",
        "SPIN_SPARSE__WINDOW_TOKENS": "16",
        "SPIN_SPARSE__DENSE_LAYERS": "1",
        "SPIN_CACHE__HIERARCHY": "true",
        "SPIN_CACHE__BUFFER_RATIO": "1",
        "SPIN_CACHE__HOST_POOL_TOKENS": "4096",
    }.items():
        monkeypatch.setenv(key, value)
    rc = _engine_run(
        random_engine_dir,
        tmp_path,
        "--input-len",
        "300",
        "--output-len",
        "12",
        "--num-prompts",
        "5",
        "--max-concurrency",
        "3",
        "--kv-cache-tokens",
        "2048",
        "--label",
        "hier",
    )
    assert rc == 0
    res = json.loads((tmp_path / "hier-infqps-concurrency3.json").read_text())
    assert (res["completed"], res["failed"]) == (5, 0)
    assert res["output_lens"] == [12] * 5 and res["input_lens"] == [300] * 5
    assert res["random_weights"]["preset"] == "tiny-llama" and res["prompt_ids"] == "random"
    assert res["engine_settings"]["cache"]["hierarchy"] is True
    assert res["engine_settings"]["sparse"]["algorithm"] == "quest"
    assert res["input_len"]["fixed"] and res["output_len"]["fixed"]
    # every decode token is one decode row; the first token of each request comes from prefill
    decode_rows = res["mean_decode_batch"] * res["num_decode_steps"]
    assert decode_rows == pytest.approx(res["total_output_tokens"] - 5)
    assert 1 <= res["mean_running_requests"] <= res["peak_running_requests"] <= 3
    assert res["num_decode_steps"] <= res["num_engine_steps"]
    assert res["num_preemptions"] == 0
    # 300-token prompts: 19 pages per (layer, head) row, more than the 1x-buffered working set,
    # so decode looked pages up (hits + misses) and fetched the misses over "PCIe"
    assert res["page_lookups"] > 0 and 0 < res["hit_rate"] <= 1
    assert res["page_hits"] == round(res["hit_rate"] * res["page_lookups"])
    misses = res["page_lookups"] - res["page_hits"]
    slot_bytes = 2 * 16 * 64 * 4  # K and V of one 16-token page, head_dim 64, float32
    assert res["pcie_bytes_fetched"] == misses * slot_bytes
    assert res["pcie_bytes_fetched_per_decode_step"] == pytest.approx(
        res["pcie_bytes_fetched"] / res["num_decode_steps"]
    )


def test_dense_preemptions_are_counted(random_engine_dir, tmp_path):
    # room for 2 prompts of 200 tokens; their 64-token decodes outgrow the pool: preemption
    rc = _engine_run(
        random_engine_dir,
        tmp_path,
        "--input-len",
        "200",
        "--output-len",
        "64",
        "--num-prompts",
        "3",
        "--num-warmups",
        "0",
        "--kv-cache-tokens",
        "448",
        "--label",
        "dense",
    )
    assert rc == 0
    res = json.loads((tmp_path / "dense-infqps.json").read_text())
    assert (res["completed"], res["failed"]) == (3, 0)
    assert res["num_preemptions"] >= 1 and res["hit_rate"] is None
    assert "page_lookups" not in res and res["peak_running_requests"] == 2


def _fake(label: str, thr: float, ttft: float, tpot: float, failed: int = 0) -> dict:
    return {
        "label": label,
        "completed": 8,
        "failed": failed,
        "duration": 10.0,
        "output_throughput": thr,
        "request_throughput": thr / 100,
        "mean_ttft_ms": ttft,
        "median_ttft_ms": ttft / 2,
        "p99_ttft_ms": ttft * 2,
        "mean_tpot_ms": tpot,
        "median_tpot_ms": tpot,
        "p99_tpot_ms": tpot,
        "mean_running_requests": 4.0,
        "device": "NVIDIA H100 80GB HBM3",
        "git_sha": "abc1234",
    }


def test_headline_table(tmp_path, capsys):
    recs = [
        _fake("a-x-dense", 100.0, 8000.0, 20.0),
        _fake("a-x-spin", 250.0, 1000.0, 25.0),
        _fake("b-y-dense", 40.0, 9000.0, 12.0),
        _fake("b-y-spin", 60.0, 3000.0, 30.0),
    ]
    paths = []
    for rec in recs:
        paths.append(tmp_path / f"{rec['label']}.json")
        paths[-1].write_text(json.dumps(rec))
    prefix = tmp_path / "hl"
    assert bench_main(["headline", *map(str, paths), "--out-prefix", str(prefix)]) == 0
    out = json.loads((tmp_path / "hl.json").read_text())
    rows = {r["part"]: r for r in out["metrics"]["rows"]}
    assert rows["a-x"]["output_throughput_ratio"] == 2.5
    assert rows["a-x"]["mean_ttft_ms_ratio"] == 0.125
    assert rows["b-y"]["mean_tpot_ms_ratio"] == 2.5
    assert rows["b-y"]["spin"]["mean_running_requests"] == 4.0
    assert out["device"] == "NVIDIA H100 80GB HBM3" and out["bench"] == "headline"
    table = (tmp_path / "hl.md").read_text()
    assert "| a-x | 2.50x | 8.00x, 8.00x | 1.25x |" in table
    assert "| b-y | 1.50x | 3.00x, 3.00x | 2.50x |" in table
    assert table.strip() in capsys.readouterr().out
    assert (tmp_path / "hl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a failed request fails the table's exit status; a part without its pair is an error
    paths[1].write_text(json.dumps(_fake("a-x-spin", 250.0, 1000.0, 25.0, failed=1)))
    assert bench_main(["headline", *map(str, paths), "--out-prefix", str(prefix)]) == 1
    assert bench_main(["headline", *map(str, paths[:3]), "--out-prefix", str(prefix)]) == 2
    assert "part 'b-y' has no spin run" in capsys.readouterr().err


@pytest.mark.slow
def test_headline_script_cpu_smoke(tmp_path):
    """perf/gpu_headline.sh part b end to end on the CPU: the tiny random preset, 2K context,
    a pool that holds 2 dense requests; spin (quest + hierarchy) must run more at once."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = os.environ | {
        "OUT": str(tmp_path / "out"),
        "HEADLINE_WORK": str(tmp_path / "work"),
        "HEADLINE_DEVICE": "cpu",
        "HEADLINE_SETUP": "0",
        "HEADLINE_PYTHON": sys.executable,
        "HEADLINE_B_PRESET": "tiny-llama",
        "HEADLINE_B_CTX": "2048",
        "HEADLINE_B_OUT": "8",
        "HEADLINE_B_N": "4",
        "HEADLINE_B_HBM": "4096",
        "HEADLINE_B_BUDGET": "64",
        "HEADLINE_B_PROMPT_IDS": "random",
        "SPIN_ENGINE__CPU_THREADS": "1",
        "SPIN_SPARSE__WINDOW_TOKENS": "32",
        "SPIN_SPARSE__DENSE_LAYERS": "0",
        "SPIN_CACHE__BUFFER_RATIO": "1",
    }
    proc = subprocess.run(
        ["bash", "perf/gpu_headline.sh", "b"], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    dense = json.loads((out / "b-llama8b-32k-dense-infqps.json").read_text())
    spin = json.loads((out / "b-llama8b-32k-spin-infqps.json").read_text())
    for res in (dense, spin):
        assert (res["completed"], res["failed"]) == (4, 0)
        assert res["output_lens"] == [8] * 4 and res["input_lens"] == [2040] * 4
    assert dense["peak_running_requests"] == 2 and dense["hit_rate"] is None
    assert spin["peak_running_requests"] > 2 and 0 < spin["hit_rate"] <= 1
    assert spin["engine_settings"]["cache"]["host_pool_tokens"] == 4 * 2048
    head = json.loads((out / "headline-b-llama8b-32k.json").read_text())
    (row,) = head["metrics"]["rows"]
    assert row["output_throughput_ratio"] == pytest.approx(
        spin["output_throughput"] / dense["output_throughput"]
    )
    assert "| b-llama8b-32k | " in (out / "headline-b-llama8b-32k.md").read_text()
    assert "headline b:" in proc.stdout
