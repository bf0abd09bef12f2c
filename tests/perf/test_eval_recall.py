"""perf/eval_recall.py: attention_recall against a direct per-token computation, the needle's
layout under a permutation, and RecallPlanner on a tiny engine (same selection as the plain
planner; a budget covering the context keeps everything; streaming misses a far needle)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_checkpoint

from spinserve.engines.build import build_engine
from spinserve.perf.eval_recall import RecallPlanner, attention_recall, summarize_records
from spinserve.perf.eval_session import EvalSession
from spinserve.runtime.sparse import SparseParams, create_algorithm

PARAMS = SparseParams(0, sink_tokens=16, window_tokens=16, dense_layers=0)


def direct_recall(pool, table, q, seq_lens, chosen, needle, scale):
    """Token-by-token loops: (recall, oracle, needle kept share, needle mass, pages) per b."""
    B, KV, N = table.shape
    P, G = pool.shape[2], q.shape[1] // KV
    out = []
    for b in range(B):
        rec, orc, kept, mass = [], [], 0.0, []
        for h in range(KV):
            T = int(seq_lens[b])
            keys = torch.stack([pool[table[b, h, t // P], 0, t % P] for t in range(T)])
            page_mass = torch.zeros(G, N)
            for g in range(G):
                p = (keys @ q[b, h * G + g] * scale).softmax(0)
                for t in range(T):
                    page_mass[g, t // P] += p[t]
                rec.append(float(sum(page_mass[g, j] for j in range(N) if chosen[b, h, j])))
                mass.append(float(sum(p[t] for t in range(T) if needle[b, h, t])))
                kept += float(
                    sum(p[t] for t in range(T) if needle[b, h, t] and chosen[b, h, t // P])
                )
            count = int(chosen[b, h].sum())
            best = page_mass.sum(0).argsort(descending=True)[:count]
            orc += [float(page_mass[g, best].sum()) for g in range(G)]
        pages = float(chosen[b].sum(-1).float().mean())
        out.append(
            [
                sum(rec) / len(rec),
                sum(orc) / len(orc),
                kept / sum(mass),
                sum(mass) / len(mass),
                pages,
            ]
        )
    return torch.tensor(out)


def test_attention_recall_equals_direct_computation():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    B, KV, G, N, P, D = 2, 2, 3, 5, 4, 8
    pool = torch.randn(B * KV * N + 1, 2, P, D, generator=g)
    table = (torch.randperm(B * KV * N, generator=g) + 1).view(B, KV, N)
    q = torch.randn(B, KV * G, D, generator=g) * 2
    seq_lens = torch.tensor([N * P - 3, N * P])
    chosen = torch.rand(B, KV, N, generator=g) < 0.5
    chosen[..., -1] = True  # the tail, as every selection has
    needle = torch.zeros(B, KV, N * P, dtype=torch.bool)
    needle[:, :, 5:11] = True
    got = attention_recall(pool, table, q, seq_lens, chosen, needle, D**-0.5)
    want = direct_recall(pool, table, q, seq_lens, chosen, needle, D**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[:, 0] <= got[:, 1] + 1e-6).all()  # no selection of that size beats the oracle
    every = attention_recall(pool, table, q, seq_lens, torch.ones_like(chosen), needle, D**-0.5)
    torch.testing.assert_close(every[:, :3], torch.ones(B, 3))


def test_needle_mask_follows_the_layout_permutation():
    algo = create_algorithm("quest", 16, 2, 64, PARAMS)
    planner = RecallPlanner(algo, 1, 2, "cpu", torch.zeros(1, 2, 16, 64), [(3, 5), (40, 42)])
    perm = torch.stack([torch.arange(48).flip(0), torch.arange(48)])  # head 0 reversed
    planner.perms[(0, 1)] = perm
    mask = planner.needle_mask(0, 2, 64)
    assert mask[0, 0].nonzero().flatten().tolist() == [3, 4]  # request 0: identity
    assert mask[1, 0].nonzero().flatten().tolist() == [47 - 41, 47 - 40]
    assert mask[1, 1].nonzero().flatten().tolist() == [40, 41]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("eval-recall")
    ckpt = make_checkpoint("llama", d / "ckpt", seed=random.randrange(1 << 16))
    engine = build_engine(ckpt, d / "engine", page_size=16, progress=False)
    return EvalSession(engine, 16, 2, 256, "cpu")


@pytest.mark.parametrize("algorithm", ["quest", "retroinfer", "streaming"])
def test_recall_planner_selects_as_the_plain_planner(session, algorithm):
    rng = random.Random()
    prompts = [[rng.randrange(250) for _ in range(n)] for n in (rng.randint(150, 200), 160)]
    forced = [[rng.randrange(250) for _ in range(6)] for _ in prompts]
    needles = [(40, 52), (70, 75)]  # far from the sinks and the window
    session.prefill(prompts)

    def factory(a, layers, reqs, dev):
        return RecallPlanner(a, layers, reqs, dev, session.pool, needles)

    rows = {}
    for budget in (32, 1024):
        planner = session.index(algorithm, PARAMS, factory)
        gens, nlls = session.run(budget, forced, 4)
        session.index(algorithm, PARAMS)  # the plain SparsePlanner
        assert session.run(budget, forced, 4) == (gens, nlls)
        assert len(planner.records) == (6 + 4 - 1) * 2  # (forced + generated - 1) x 2 layers
        rows[budget] = summarize_records(planner.records, 0)
    full = rows[1024]
    assert full["recall"] == full["oracle"] == full["needle_kept"] == 1.0
    assert rows[32]["recall"] <= rows[32]["oracle"] + 1e-6 and rows[32]["pages"] < full["pages"]
    if algorithm == "streaming":  # 1 sink page + window + 2 budget pages: never the needle
        assert rows[32]["needle_kept"] == 0.0
