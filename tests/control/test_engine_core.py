"""LLMEngine behaviour: admission, preemption under a small KV pool, stops, sampling, aborts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from spinserve.control.engine import LLMEngine, RequestError
from spinserve.engines.build import build_engine
from spinserve.runtime.sampling import SamplingParams
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("core")
    return build_engine(
        make_checkpoint("llama", d / "ckpt"), d / "engine", page_size=8, progress=False
    )


def _engine(engine_dir, **kw):
    return LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw)


def _prompts(n=6):
    import random

    rng = random.Random(3)
    return [[rng.randrange(250) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def test_small_pool_preempts_and_recomputes_to_identical_outputs(engine_dir):
    prompts = _prompts()
    roomy = _engine(engine_dir).generate(prompts, GREEDY)
    # 12 pages of 8 tokens: far less than 6 requests x ~50 tokens, so requests wait and get
    # preempted; outputs must not change
    tight = _engine(engine_dir, **{"cache.kv_cache_tokens": 96})
    assert tight.kv.capacity_pages == 12
    outs = tight.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.stats()["num_preemptions"] > 0  # the case really preempted
    tight.check_integrity()
    assert tight.kv.free_pages == tight.kv.capacity_pages


def test_rejections_change_nothing(engine_dir):
    eng = _engine(engine_dir, **{"engine.max_context": 64, "cache.kv_cache_tokens": 48})
    with pytest.raises(RequestError, match="max context of 64 tokens"):
        eng.add_request("long", list(range(64)), GREEDY)
    with pytest.raises(RequestError, match="more KV pages than the whole pool"):
        eng.add_request("big", list(range(60)), GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("vocab", [1, 2, 10**6], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("empty", [], GREEDY)
    assert not eng.has_unfinished()
    eng.add_request("ok", [1, 2, 3], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("ok", [1, 2, 3], GREEDY)
    eng.check_integrity()


def test_generation_stops_at_max_context(engine_dir):
    eng = _engine(engine_dir, **{"engine.max_context": 40})
    out = eng.generate([list(range(30))], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(max_tokens=-5),
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(stop=("",)),
    ],
)
def test_invalid_sampling_parameters(bad):
    with pytest.raises(ValueError, match="invalid sampling parameters"):
        SamplingParams(**bad)


def test_seeded_sampling_is_reproducible_and_batch_independent(engine_dir):
    eng = _engine(engine_dir)
    params = SamplingParams(
        max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True
    )
    alone = eng.generate([_prompts()[0]], params)[0].token_ids
    batched = eng.generate(_prompts()[:3], params)[0].token_ids
    assert alone == batched
    other_seed = eng.generate(
        [_prompts()[0]],
        SamplingParams(
            max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=8, ignore_eos=True
        ),
    )[0]
    assert other_seed.token_ids != alone
    top1 = eng.generate(
        [_prompts()[0]], SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True)
    )[0]
    assert (
        top1.token_ids
        == eng.generate([_prompts()[0]], SamplingParams(max_tokens=16, ignore_eos=True))[
            0
        ].token_ids
    )


def test_stop_strings_and_stop_tokens(engine_dir):
    eng = _engine(engine_dir)
    prompt = _prompts()[1]
    free = eng.generate([prompt], GREEDY)[0]
    # stop at a token id that appears mid-way
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = eng.generate(
        [prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop_tok,))
    )[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    # stop string = a piece of the free-running text: output text ends right before it
    stop = free.text[8:11]
    out = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]


def test_abort_frees_pages(engine_dir):
    eng = _engine(engine_dir)
    for i, p in enumerate(_prompts(4)):
        eng.add_request(f"r{i}", p, GREEDY)
    eng.step()
    eng.step()
    assert eng.kv.free_pages < eng.kv.capacity_pages
    assert eng.abort("r1") and eng.abort("r3") and not eng.abort("r3")
    eng.check_integrity()
    while eng.has_unfinished():
        eng.step()
    eng.check_integrity()
    assert eng.kv.free_pages == eng.kv.capacity_pages


def test_cli_generate_streams_the_greedy_completion(engine_dir):
    eng = _engine(engine_dir)
    expected = eng.generate(["hello there"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    cmd = [
        sys.executable,
        "-m",
        "spinserve.control.cli",
        "generate",
        "hello there",
        "--engine",
        str(engine_dir),
        "--max-tokens",
        "12",
        "--device",
        "cpu",
        "--ignore-eos",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.text + "\n"
    bad = subprocess.run(cmd[:-1] + ["--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr
