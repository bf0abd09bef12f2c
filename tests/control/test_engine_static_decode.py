"""Sparse decode through the capturable static path (runtime/sparse/static_select.py), the path
the engine's sparse CUDA graphs replay: padded to graph buckets, selection with static shapes,
optionally through the HBM/host hierarchy. On the CPU it runs eagerly (runner.static_decode);
on the GPU the graphs are captured and replayed. Greedy outputs equal the eager path's."""

from __future__ import annotations

import pytest
import torch
from test_engine_hierarchy import GREEDY, SPARSE, _all_free, _prompts, _run
from tiny_models import make_checkpoint

from spinserve.control.engine import LLMEngine
from spinserve.engines.build import build_engine
from spinserve.runtime.hierarchy import FETCHED, SHORT

MAX_BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    return build_engine(
        make_checkpoint("llama", d / "ckpt"), d / "e16", page_size=16, progress=False
    )


def _settings(algorithm: str, dense_layers: int, hierarchy: bool) -> dict:
    kw = {**SPARSE, "sparse.algorithm": algorithm, "sparse.dense_layers": dense_layers}
    kw["engine.max_running_requests"] = MAX_BATCH
    if hierarchy:  # buffer 0: the HBM holds the mandatory pages only, most steps fetch
        kw |= {"cache.hierarchy": True, "cache.buffer_ratio": 0}
    return kw


@pytest.mark.parametrize(
    ("algorithm", "dense_layers", "hierarchy"),
    [
        ("quest", 0, False),
        ("quest", 1, False),
        ("streaming", 0, False),
        ("quest", 0, True),
        ("quest", 1, True),
    ],
)
def test_static_path_equals_eager_on_cpu(engine_dir, algorithm, dense_layers, hierarchy):
    kw = _settings(algorithm, dense_layers, hierarchy)
    expected, _, _ = _run(LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw), _prompts())
    eng = LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw)
    spec = eng.sparse_graph_spec()
    assert spec.algorithm == algorithm and (spec.hierarchy is not None) == hierarchy
    eng.runner.static_decode(MAX_BATCH, eng.max_context, spec)
    got, steps, fetching = _run(eng, _prompts())
    assert got == expected
    static = eng.runner.graph_runners[-1]
    assert static.runs >= GREEDY.max_tokens - 1  # every decode step went the static way
    if hierarchy:
        stats = eng.kv.stats.tolist()
        assert fetching > steps // 2 and stats[FETCHED] > 50 and stats[SHORT] == 0
        _all_free(eng)


def test_other_budgets_and_algorithms_decode_eagerly(engine_dir):
    """The static path serves one algorithm at one budget: a request with its own budget or
    algorithm runs eagerly (and still decodes correctly)."""
    from spinserve.runtime.sampling import SamplingParams

    kw = _settings("quest", 0, False)
    eng = LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw)
    eng.runner.static_decode(MAX_BATCH, eng.max_context, eng.sparse_graph_spec())
    params = SamplingParams(max_tokens=5, ignore_eos=True, sparse_budget_tokens=64)
    ref = LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw)
    prompt = _prompts((150,))
    assert eng.generate(prompt, params)[0].token_ids == ref.generate(prompt, params)[0].token_ids
    assert eng.runner.graph_runners[-1].runs == 0


@pytest.mark.gpu
@pytest.mark.parametrize(("hierarchy", "fused"), [(False, False), (True, False), (True, True)])
def test_sparse_cuda_graphs_equal_static_eager(engine_dir, hierarchy, fused):
    """Captured sparse decode graphs (selection, hierarchy lookups, misses fetched, attention)
    replay to exactly the tokens of the same static path run eagerly; capture itself proves
    the step has no host sync (capture fails on one). fused: the Triton resolve kernel."""
    kw = _settings("quest", 1, hierarchy) | {"cache.kv_cache_tokens": 8192}
    kw["cache.fused_resolve"] = fused
    eager = LLMEngine.from_engine_dir(engine_dir, device="cuda", **kw, **{"engine.cuda_graphs": 0})
    eager.runner.static_decode(MAX_BATCH, eager.max_context, eager.sparse_graph_spec())
    expected, _, _ = _run(eager, _prompts())
    graphed = LLMEngine.from_engine_dir(engine_dir, device="cuda", **kw)
    sparse_graphs = graphed.runner.graph_runners[-1]
    assert sparse_graphs.static.sparse is not None and sparse_graphs.graphs
    got, _, _ = _run(graphed, _prompts())
    assert got == expected and sparse_graphs.runs >= GREEDY.max_tokens - 1
    graph, _ = sparse_graphs.graphs[MAX_BATCH]
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph.replay()  # padding rows only: a valid step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if hierarchy:
        _all_free(graphed)
