"""perf/bench_hit_rate.py on a tiny engine (CPU, a few seconds): its counters add up, a buffer that
holds every page never misses while a mandatory-only one does, the same selection (lookups,
greedy tokens) whatever the buffer, and prompts of exactly the asked length from real offsets."""

from __future__ import annotations

import random

import pytest
from tiny_models import make_checkpoint

from spinserve.engines.build import build_engine
from spinserve.perf.bench_hit_rate import measure, text_prompts

SETTINGS = {
    "engine.device": "cpu",
    "engine.dtype": "float32",
    "sparse.algorithm": "quest",
    "sparse.budget_tokens": 32,
    "sparse.sink_tokens": 16,
    "sparse.window_tokens": 16,
    "sparse.dense_layers": 0,
}
PAGE_BYTES = 2 * 16 * 64 * 4  # K and V, 16 tokens x head_dim 64, float32
MANDATORY = 1 + 1 + 1 + 32 // 16 + 2  # sinks, window, +1 alignment, budget, +2 (tail, slack)
LAYER_HEADS = 2 * 2  # tiny llama: 2 layers x 2 kv heads, all sparse


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hit-rate")
    ckpt = make_checkpoint("llama", d / "ckpt", seed=random.randrange(1 << 16))
    return build_engine(ckpt, d / "engine", page_size=16, progress=False)


def _check_counts(r: dict, decode_steps: int) -> None:
    by_step = r["pages_fetched_by_step"]
    assert r["decode_steps"] == len(by_step) == len(r["hit_rate_by_step"]) == decode_steps
    assert r["request_steps"] == 2 * decode_steps  # both prompts prefill in the first step
    assert 0 <= r["page_hits"] <= r["page_lookups"]
    assert r["pages_short"] == 0
    assert r["page_hits"] + r["pages_fetched"] == r["page_lookups"]  # every miss is fetched
    assert sum(by_step) == r["pages_fetched"] and max(by_step) == r["pages_fetched_per_step_max"]
    assert r["page_bytes"] == PAGE_BYTES
    assert r["pcie_bytes_fetched"] == r["pages_fetched"] * PAGE_BYTES
    assert r["pcie_bytes_fetched_per_step"] == r["pcie_bytes_fetched"] / decode_steps
    assert r["hit_rate"] == r["page_hits"] / r["page_lookups"]
    assert r["mandatory_pages"] == MANDATORY


def test_buffer_ratios_on_tiny_engine(engine_dir):
    rng = random.Random()
    prompts = [[rng.randrange(250) for _ in range(n)] for n in (rng.randint(280, 330), 300)]
    max_tokens = 12
    small = measure(engine_dir, prompts, 0, max_tokens, SETTINGS)
    large = measure(engine_dir, prompts, 8, max_tokens, SETTINGS)
    for r in (small, large):
        _check_counts(r, max_tokens - 1)  # the first token comes from the prefill
    # 8 x 7 buffer pages + 7 mandatory > the ~20 pages of a prompt: every page stays in HBM
    assert large["buffer_ratio"] == 8 and large["hit_rate"] == 1.0
    assert large["pages_fetched"] == 0 and large["pcie_bytes_fetched"] == 0
    assert small["hit_rate"] < 1.0 and small["pages_fetched"] > 0
    assert large["hit_rate"] >= small["hit_rate"]
    # the selection does not depend on the buffer: same lookups, same greedy tokens
    assert small["page_lookups"] == large["page_lookups"] > 0
    assert small["token_ids"] == large["token_ids"]
    assert [len(t) for t in small["token_ids"]] == [max_tokens, max_tokens]
    # a page completes every 16 decoded tokens: none, or one per row and prompt crossing
    crossings = sum((len(p) + max_tokens - 1) // 16 - len(p) // 16 for p in prompts)
    offloaded = crossings * LAYER_HEADS * PAGE_BYTES
    assert small["pcie_bytes_offloaded_per_step"] * (max_tokens - 1) == offloaded


def test_text_prompts_exact_length_at_word_starts():
    from tiny_models import make_tokenizer

    tok = make_tokenizer()
    words = [f"w{random.randrange(10**6)}" for _ in range(3000)]
    text = " ".join(words)
    prompts, offsets = text_prompts(tok, text, 200, 2, seed=random.randrange(1 << 16))
    assert [len(p) for p in prompts] == [200, 200] and offsets == sorted(offsets)
    for p, off in zip(prompts, offsets):
        assert text[off - 1] == " " and p == tok.encode(text[off:], add_special_tokens=False)[:200]
    with pytest.raises(ValueError, match="too short"):
        text_prompts(tok, text[:500], 200, 1, seed=0)
