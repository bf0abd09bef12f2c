"""The hierarchical KV cache inside the engine (cache.hierarchy): with the same selection, greedy
outputs do not depend on how much of a request stays in HBM; dense requests are unaffected;
out of host pool, requests wait or are refused and running ones finish; nothing leaks."""

from __future__ import annotations

import random

import pytest
from tiny_models import make_checkpoint

from spinserve.control.engine import LLMEngine, RequestError
from spinserve.engines.build import build_engine
from spinserve.runtime.hierarchy import FETCHED, HITS, LOOKUPS, SHORT
from spinserve.runtime.sampling import SamplingParams

# small sparse settings so that a few hundred tokens are far more than one step selects
SPARSE = {
    "sparse.budget_tokens": 32,
    "sparse.sink_tokens": 16,
    "sparse.window_tokens": 16,
    "sparse.dense_layers": 0,
    "cache.kv_cache_tokens": 4096,  # pool sizes do not change outputs; keep memory small
}
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("hier")
    ckpt = make_checkpoint("llama", d / "ckpt")
    return {p: build_engine(ckpt, d / f"e{p}", page_size=p, progress=False) for p in (8, 16)}


def _prompts(lengths=(150, 37, 201, 260), seed=5):
    rng = random.Random(seed)
    return [[rng.randrange(250) for _ in range(n)] for n in lengths]


def _run(eng: LLMEngine, prompts, params=GREEDY) -> tuple[list[list[int]], int, int]:
    """Step the engine over the prompts: (tokens per prompt, steps, steps that fetched pages)."""
    tokens = {f"q{i}": [] for i in range(len(prompts))}
    for rid, p in zip(tokens, prompts):
        eng.add_request(rid, p, params)
    steps = fetching = 0
    while eng.has_unfinished():
        before = int(eng.kv.stats[FETCHED]) if eng.hierarchy else 0
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
        fetching += eng.hierarchy and int(eng.kv.stats[FETCHED]) > before
    return list(tokens.values()), steps, fetching


def _all_free(eng: LLMEngine) -> None:
    eng.check_integrity()
    kv = eng.kv
    kv.check_integrity(on_device=True)
    assert kv.hbm_slots.num_used == 0 and kv.host.allocator.num_used == 0
    assert kv.dir.segments.num_used == 0 and not eng.index_rows.of


@pytest.mark.parametrize(
    ("algorithm", "page", "dense_layers", "device"),
    [
        ("quest", 16, 0, "cpu"),
        ("quest", 16, 1, "cpu"),  # layer 0 dense: its pages stay resident
        ("shadowkv", 8, 0, "cpu"),
        ("retroinfer", 16, 0, "cpu"),
        pytest.param("quest", 16, 1, "cuda", marks=pytest.mark.gpu),
        pytest.param("retroinfer", 16, 0, "cuda", marks=pytest.mark.gpu),
    ],
)
def test_tiny_hbm_budget_is_transparent(engines, algorithm, page, dense_layers, device):
    """Buffer 0 (HBM holds the mandatory pages only): nearly every step misses, outputs equal
    those of the same algorithm with every page resident."""
    kw = {**SPARSE, "sparse.algorithm": algorithm, "sparse.dense_layers": dense_layers}
    expected, _, _ = _run(LLMEngine.from_engine_dir(engines[page], device=device, **kw), _prompts())
    tight = LLMEngine.from_engine_dir(
        engines[page], device=device, **kw, **{"cache.hierarchy": True, "cache.buffer_ratio": 0}
    )
    got, steps, fetching = _run(tight, _prompts())
    assert got == expected
    stats = tight.kv.stats.tolist()
    assert fetching > steps // 2 and stats[FETCHED] > 50 and stats[SHORT] == 0
    assert stats[HITS] < stats[LOOKUPS]
    _all_free(tight)


def test_unlimited_buffer_never_misses(engines):
    kw = {**SPARSE, "sparse.algorithm": "quest", "cache.hierarchy": True}
    roomy = LLMEngine.from_engine_dir(
        engines[16], device="cpu", **kw, **{"cache.buffer_ratio": 100}
    )
    flat = LLMEngine.from_engine_dir(
        engines[16], device="cpu", **SPARSE, **{"sparse.algorithm": "quest"}
    )
    prompts = _prompts((120, 90))
    got, _, fetching = _run(roomy, prompts)
    assert got == _run(flat, prompts)[0]
    stats = roomy.kv.stats.tolist()
    assert fetching == 0 and stats[HITS] == stats[LOOKUPS] > 0
    _all_free(roomy)


def test_dense_and_sparse_requests_side_by_side(engines):
    """Per-request algorithms: a dense request keeps every page in HBM and decodes as without
    the hierarchy; the sparse one goes through it."""
    dense = SamplingParams(max_tokens=24, ignore_eos=True)
    quest = SamplingParams(
        max_tokens=24, ignore_eos=True, sparse_algorithm="quest", sparse_budget_tokens=16
    )
    prompts = _prompts((180, 140))
    outs = {}
    for hierarchy in (False, True):
        eng = LLMEngine.from_engine_dir(
            engines[16],
            device="cpu",
            **SPARSE,
            **{"cache.hierarchy": hierarchy, "cache.buffer_ratio": 0},
        )
        eng.add_request("d", prompts[0], dense)
        eng.add_request("s", prompts[1], quest)
        tokens = {"d": [], "s": []}
        while eng.has_unfinished():
            for out in eng.step():
                tokens[out.request_id] += out.new_token_ids
        outs[hierarchy] = tokens
        if hierarchy:
            assert eng.kv.stats[FETCHED] > 0
            _all_free(eng)
    assert outs[True] == outs[False]


def test_out_of_host_pool_waits_refuses_and_finishes(engines):
    """Host pool of 24 pages (HBM of 40): four ~150-token requests cannot all be admitted; they
    wait (or are preempted and recomputed) and all finish with unchanged outputs; a prompt
    larger than the host pool is refused with the remedy."""
    kw = {**SPARSE, "sparse.algorithm": "quest"}
    prompts = _prompts((150, 140, 160, 120), seed=9)
    expected, _, _ = _run(LLMEngine.from_engine_dir(engines[16], device="cpu", **kw), prompts)
    small = {"cache.hierarchy": True, "cache.host_pool_tokens": 24 * 16}
    eng = LLMEngine.from_engine_dir(
        engines[16], device="cpu", **{**kw, **small, "cache.kv_cache_tokens": 40 * 16}
    )
    assert eng.kv.capacity_pages == 24
    with pytest.raises(RequestError, match="host_pool_tokens"):
        eng.add_request("huge", [7] * (24 * 16), GREEDY)
    assert not eng.has_unfinished()
    admitted = []
    orig = eng.scheduler.schedule

    def schedule():
        out = orig()
        admitted.append((len(eng.scheduler.running), len(eng.scheduler.waiting)))
        return out

    eng.scheduler.schedule = schedule
    got, _, _ = _run(eng, prompts)
    assert got == expected
    assert max(r for r, _ in admitted) < 4 and max(w for _, w in admitted) > 0  # some waited
    _all_free(eng)


def test_small_hbm_shrinks_buffers_and_stays_exact(engines):
    """HBM of 30 pages for four requests with 4x buffers, prompts prefilled in 64-token chunks:
    buffers shrink toward the mandatory pages (and requests wait), outputs stay exact; the
    engine's stats report both tiers.
    (*) contexts stay within 16 pages: past that Quest's index buffers are regrown inside the
    model's inference mode and releasing them afterwards raises (pre-existing, reported)."""
    kw = {**SPARSE, "sparse.algorithm": "quest"}
    prompts = _prompts((180, 170, 200, 175), seed=11)  # <= 16 pages (*)
    expected, _, _ = _run(LLMEngine.from_engine_dir(engines[16], device="cpu", **kw), prompts)
    eng = LLMEngine.from_engine_dir(
        engines[16],
        device="cpu",
        **{
            **kw,
            "cache.hierarchy": True,
            "cache.kv_cache_tokens": 30 * 16,
            "engine.prefill_chunk_tokens": 64,
        },
    )
    widths = []
    orig = eng.kv.ensure

    def ensure(rid, n):
        orig(rid, n)
        widths.extend(h.width for h in eng.kv._held.values() if h.hierarchical)

    eng.kv.ensure = ensure
    got, _, _ = _run(eng, prompts)
    assert got == expected
    full = 7 + 4 * 7  # mandatory 7 pages (16 sinks, 16 window, 32 budget) + 4x buffer
    assert widths and min(widths) < full and eng.kv.stats[SHORT] == 0
    lookups, hits, fetched, _, offloaded = eng.kv.stats.tolist()
    stats = eng.stats()
    slot_bytes = 2 * 16 * 64 * 4  # K and V of 16 tokens x head_dim 64, float32
    assert stats["page_lookups"] == lookups > stats["page_hits"] == hits > 0
    assert stats["pcie_bytes_fetched"] == fetched * slot_bytes > 0
    assert stats["pcie_bytes_offloaded"] == offloaded * slot_bytes > 0
    assert stats["hit_rate"] == hits / lookups
    assert stats["hbm_pages_total"] == 30 and stats["host_pages_total"] == 60
    assert stats["hbm_pages_used"] == stats["host_pages_used"] == 0
    _all_free(eng)


@pytest.mark.slow
def test_smollm2_tiny_hbm_budget_is_transparent():
    """The embedded SmolLM2 (30 layers, 2 dense) on ~700 tokens of real text (this repo's own
    source): Quest with only its mandatory pages in HBM decodes the same greedy tokens as with
    every page resident, while thousands of pages come from the host pool."""
    from pathlib import Path

    from spinserve.engines.embedded import embedded_engine_dir

    engine_dir = embedded_engine_dir(progress=False)
    kw = {
        "sparse.algorithm": "quest",
        "sparse.budget_tokens": 64,
        "sparse.sink_tokens": 16,
        "sparse.window_tokens": 32,
        "cache.kv_cache_tokens": 8192,
        "engine.dtype": "float32",
    }
    text = Path(__file__).read_text()
    outs, stats = [], None
    for extra in ({}, {"cache.hierarchy": True, "cache.buffer_ratio": 0}):
        eng = LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw, **extra)
        ids = eng.tokenizer.encode(text)[:700]
        outs.append(_run(eng, [ids, ids[100:500]], SamplingParams(max_tokens=24, ignore_eos=True)))
        if extra:
            stats = eng.kv.stats.tolist()
            _all_free(eng)
    assert outs[0][0] == outs[1][0]
    assert stats[FETCHED] > 1000 and stats[SHORT] == 0


def test_engine_rebalances_buffers_from_hit_rates(engines):
    """Every REBALANCE_STEPS decode steps the engine feeds the per-request hit counters to the
    manager: a request that misses with no buffer gets HBM buffer pages from the free pool."""
    from spinserve.control.engine import REBALANCE_STEPS

    kw = {**SPARSE, "sparse.algorithm": "quest", "cache.hierarchy": True, "cache.buffer_ratio": 0}
    eng = LLMEngine.from_engine_dir(engines[16], device="cpu", **kw)
    eng.add_request("r", _prompts((260,))[0], SamplingParams(max_tokens=200, ignore_eos=True))
    held = None
    for _ in range(3 * REBALANCE_STEPS + 2):
        eng.step()
        held = eng.kv._held.get("r", held)
    assert held.hierarchical and held.width > held.mandatory  # grown from 0 buffer
    rows = eng.kv.hierarchy.row_stats.tolist()
    assert rows[held.row][0] > rows[held.row][1] > 0  # lookups > hits > 0, counted per row
    eng.abort("r")
    assert eng.kv.holds("r")  # its last launch is in flight: freed once read back
    while eng.has_unfinished():
        eng.step()
    _all_free(eng)


def test_more_dense_layers_than_the_model_has(engines):
    """sparse.dense_layers beyond the model's layer count: every layer dense and resident (the
    sparse page tables list the model's layers only), decoding works and nothing leaks."""
    kw = {**SPARSE, "sparse.algorithm": "quest", "sparse.dense_layers": 9, "cache.hierarchy": True}
    eng = LLMEngine.from_engine_dir(engines[16], device="cpu", **kw)
    assert eng.kv.config.dense_layers == eng.model_config.num_layers
    flat = LLMEngine.from_engine_dir(engines[16], device="cpu", **SPARSE)  # dense, resident
    prompts = _prompts((120, 40))
    assert _run(eng, prompts)[0] == _run(flat, prompts)[0]  # all layers dense = dense attention
    _all_free(eng)
