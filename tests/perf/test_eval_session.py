"""perf/eval_session.py on a tiny engine (CPU, seconds): the device-built decode batch equals the
KV manager's, a batched run equals one request at a time, re-paging to page size 8 keeps dense
results, a budget covering the context reproduces dense, and runs restart from the snapshot."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_checkpoint

from spinserve.control.kv_manager import BatchItem
from spinserve.engines.build import build_engine
from spinserve.perf.eval_session import DENSE, EvalSession, decode_batch
from spinserve.runtime.batch import ForwardMode
from spinserve.runtime.sparse import SparseParams

PARAMS = SparseParams(0, sink_tokens=16, window_tokens=16, dense_layers=0)
MAX_TOKENS = 200
ALGORITHMS = ("streaming", "quest", "retroinfer")  # page size 16; shadowkv below (8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-session")
    ckpt = make_checkpoint("llama", d / "ckpt", seed=random.randrange(1 << 16))
    return build_engine(ckpt, d / "engine", page_size=16, progress=False)


@pytest.fixture(scope="module")
def sessions(engine_dir):
    return {p: EvalSession(engine_dir, p, 3, MAX_TOKENS, "cpu") for p in (16, 8)}


def batch(rng, lens):
    prompts = [[rng.randrange(250) for _ in range(n)] for n in lens]
    forced = [[rng.randrange(250) for _ in range(n)] for n in (5, 3, 7)[: len(lens)]]
    return prompts, forced


def test_decode_batch_equals_kv_manager(sessions):
    s, rng = sessions[16], random.Random()
    s.prefill(batch(rng, [37, 70, 16])[0])
    pos = torch.tensor([37 + rng.randrange(30), 70, 16 + rng.randrange(40)])
    toks = torch.tensor([rng.randrange(250) for _ in range(3)])
    mine = decode_batch(s._table, pos, toks, 16)
    items = [BatchItem(r, int(p), [int(t)]) for r, p, t in zip(s.rids, pos, toks)]
    ref = s.kv.build_batch(ForwardMode.DECODE, items, "cpu")
    for name in ("input_ids", "positions", "append_slots", "append_offsets", "qo_indptr"):
        assert torch.equal(getattr(mine, name), getattr(ref, name)), name
    for name in ("kv_indptr", "kv_slots", "kv_last_page_len", "logits_indices"):
        assert torch.equal(getattr(mine, name).long(), getattr(ref, name).long()), name


def run(s, algorithm, budget, forced, n_gen):
    s.index(algorithm, PARAMS)
    return s.run(budget, forced, n_gen)


def test_batched_equals_one_by_one(sessions):
    s, rng = sessions[16], random.Random()
    prompts, forced = batch(rng, [rng.randint(60, 120), rng.randint(60, 120), 33])
    for algorithm, budget in ((DENSE, 0), ("quest", 32), ("retroinfer", 32)):
        s.prefill(prompts)
        gens, nlls = run(s, algorithm, budget, forced, 6)
        assert [len(g) for g in gens] == [6, 6, 6]
        assert [len(n) for n in nlls] == [len(f) - 1 for f in forced]
        g2, n2 = s.run(budget, forced, [0, 2, 6])  # per-request counts
        assert g2 == [[], gens[1][:2], gens[2]] and n2 == nlls
        for b in range(3):
            s.prefill([prompts[b]])
            g1, n1 = run(s, algorithm, budget, [forced[b]], 6)
            assert g1[0] == gens[b], (algorithm, b)
            torch.testing.assert_close(torch.tensor(n1[0]), torch.tensor(nlls[b]))


def test_full_budget_and_page_size_8_reproduce_dense(sessions):
    rng = random.Random()
    prompts, forced = batch(rng, [rng.randint(90, 140), 64, 17])
    sessions[16].prefill(prompts)
    sessions[8].copy_context_from(sessions[16])
    ref_g, ref_n = run(sessions[16], DENSE, 0, forced, 8)
    for size, algorithm in [(8, DENSE), (8, "shadowkv")] + [(16, a) for a in ALGORITHMS]:
        gens, nlls = run(sessions[size], algorithm, 1024, forced, 8)
        assert gens == ref_g, (size, algorithm)
        for a, b in zip(nlls, ref_n):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)


def test_runs_restart_from_the_indexed_snapshot(sessions):
    s, rng = sessions[16], random.Random()
    prompts, forced = batch(rng, [150, 120, 99])
    s.prefill(prompts)
    s.index("retroinfer", PARAMS)  # re-lays pages and has decode-time index state
    first = s.run(32, forced, 12)
    s.pool[1:].normal_()  # poison what the run leaves behind
    assert s.run(32, forced, 12) == first
    with pytest.raises(ValueError, match="overflow"):
        s.run(32, forced, MAX_TOKENS)
