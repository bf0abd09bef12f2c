"""Sparse algorithms inside the engine: with a budget covering the context every algorithm
reproduces dense greedy decoding; small budgets run, per request, and free everything."""

from __future__ import annotations

import pytest
from tiny_models import make_checkpoint

from spinserve.control.engine import LLMEngine, RequestError
from spinserve.engines.build import build_engine
from spinserve.runtime.sampling import SamplingParams

PAGE_SIZE = {"dense": 16, "streaming": 16, "quest": 16, "shadowkv": 8, "retroinfer": 16}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse")
    ckpt = make_checkpoint("llama", d / "ckpt")
    return {p: build_engine(ckpt, d / f"e{p}", page_size=p, progress=False) for p in (8, 16)}


def _prompts():
    import random

    rng = random.Random(5)
    return [[rng.randrange(250) for _ in range(n)] for n in (70, 23, 101)]


@pytest.mark.parametrize("algorithm", ["streaming", "quest", "shadowkv", "retroinfer"])
def test_full_budget_reproduces_dense(engines, algorithm):
    engine_dir = engines[PAGE_SIZE[algorithm]]
    dense = LLMEngine.from_engine_dir(engine_dir, device="cpu")
    expected = dense.generate(_prompts(), SamplingParams(max_tokens=24, ignore_eos=True))
    sparse = LLMEngine.from_engine_dir(
        engine_dir, device="cpu", **{"sparse.algorithm": algorithm, "sparse.budget_tokens": 512}
    )
    outs = sparse.generate(_prompts(), SamplingParams(max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    sparse.check_integrity()
    assert not sparse.index_rows.of and len(sparse.index_rows.free) == 64


def test_per_request_algorithm_and_small_budget(engines):
    eng = LLMEngine.from_engine_dir(engines[16], device="cpu")
    params = [
        SamplingParams(max_tokens=16, ignore_eos=True),
        SamplingParams(max_tokens=16, ignore_eos=True, sparse_algorithm="quest",
                       sparse_budget_tokens=16),
        SamplingParams(max_tokens=16, ignore_eos=True, sparse_algorithm="streaming",
                       sparse_budget_tokens=16),
    ]
    for i, (p, sp) in enumerate(zip(_prompts(), params)):
        eng.add_request(f"r{i}", p, sp)
    tokens = {f"r{i}": [] for i in range(3)}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
    assert all(len(t) == 16 for t in tokens.values())
    dense_r0 = eng.generate([_prompts()[0]], params[0])[0].token_ids
    assert tokens["r0"] == dense_r0  # a dense request is unaffected by sparse neighbours
    eng.check_integrity()
    assert not eng.index_rows.of


def test_unknown_algorithm_and_wrong_page_size_are_refused(engines):
    eng = LLMEngine.from_engine_dir(engines[16], device="cpu")
    with pytest.raises(RequestError, match="unknown sparse algorithm|quest"):
        eng.add_request("x", [1, 2], SamplingParams(sparse_algorithm="nope"))
    with pytest.raises(RequestError, match="needs page size 8"):
        eng.add_request("y", [1, 2], SamplingParams(sparse_algorithm="shadowkv"))
    assert not eng.has_unfinished()
    with pytest.raises(RequestError, match="needs page size 16"):
        LLMEngine.from_engine_dir(engines[8], device="cpu", **{"sparse.algorithm": "quest"})


def test_index_buffers_regrown_during_decode_are_released(engines):
    """Contexts past the index buffers' first capacity (16 pages) regrow them inside the model's
    inference mode; finishing and re-admitting requests must still release them cleanly."""
    eng = LLMEngine.from_engine_dir(
        engines[16], device="cpu", **{"sparse.algorithm": "quest", "sparse.budget_tokens": 64}
    )
    prompts = [[(7 * i + n) % 250 for i in range(n)] for n in (200, 180, 220, 190)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    first = eng.generate(prompts, params)
    again = eng.generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert all(len(o.token_ids) == 40 for o in again)
    eng.check_integrity()
