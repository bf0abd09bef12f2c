"""control/hier_kv_manager.py: exact working sets, offload at prefill end, tail rotation, and
thousands of random admit/prefill/decode/finish/cancel operations driving the real decode-step
resolve (runtime/hierarchy.py) with the KV contents checked against the truth and every slot,
host slot and segment free at the end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spinserve.control.hier_kv_manager import BatchItem, HierarchicalKVManager, HierarchyConfig
from spinserve.control.host_pool import HostPagePool
from spinserve.control.slot_allocator import OutOfSlotsError
from spinserve.runtime.batch import ForwardMode
from spinserve.runtime.hierarchy import FETCHED, SHORT
from spinserve.runtime.lru import PAD

P, D, L, KV = 8, 64, 2, 2
LH = L * KV


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def value(uid: int, lh: int, pos: int) -> float:
    """The K (V = -K) every test writes for token `pos` of (request uid, layer x kv_head)."""
    return float((uid * 37 + lh * 11 + pos * 3) % 997 + 1)


class Harness:
    """A manager over a NaN-poisoned HBM pool; writes tokens as the model would."""

    def __init__(self, hbm_pages=40, host_pages=60, dense_layers=1, ratio=1.0, max_requests=4):
        cfg = HierarchyConfig(
            L, KV, P, max_requests, 64 * P, host_pages * LH + 1, dense_layers, ratio,
            segment_pages=2, mandatory_hint=2,
        )  # fmt: skip
        # [S_hbm, 2, P, D] float32 HBM pool, NaN = never written
        self.hbm = torch.full((hbm_pages * LH + 1, 2, P, D), float("nan"))
        self.hbm[0] = 0
        self.host = HostPagePool(cfg.num_host_slots, P, D, torch.float32, use_cuda=False)
        self.mandatory: dict[str, int | None] = {}
        self.uid: dict[str, int] = {}
        self.kv = HierarchicalKVManager(cfg, self.hbm, self.host, self.mandatory.__getitem__)

    def add(self, rid: str, uid: int, mandatory: int | None) -> None:
        self.mandatory[rid], self.uid[rid] = mandatory, uid

    def write(self, mode: ForwardMode, items: list[BatchItem]) -> None:
        """build_batch, then store every item token's K/V at its append slot."""
        batch = self.kv.build_batch(mode, items, "cpu")
        pos = batch.positions.tolist()
        t = 0
        for it in items:
            for _ in it.token_ids:
                for lh in range(LH):
                    slot = int(batch.append_slots[lh // KV, t, lh % KV])
                    v = value(self.uid[it.request_id], lh, pos[t])
                    self.hbm[slot, 0, pos[t] % P] = v
                    self.hbm[slot, 1, pos[t] % P] = -v
                t += 1
        self.batch = batch

    def page_ok(self, slot: int, rid: str, lh: int, page: int, valid: int) -> bool:
        want = torch.tensor([value(self.uid[rid], lh, page * P + j) for j in range(valid)])
        got = self.hbm[slot, :, :valid, 0]
        return bool(torch.equal(got[0], want) and torch.equal(got[1], -want))


def test_prefill_offload_then_working_set_and_tail_rotation():
    h = Harness(dense_layers=1, ratio=1.0)  # mandatory 2 -> width 4
    h.add("a", 1, 2)
    kv = h.kv
    kv.ensure("a", 51)  # 7 pages, the last holds 3 tokens
    assert kv.free_pages == min(60 - 7, 40 - 7)
    prefill = kv.hierarchy  # the manager owns the decode step's object
    h.write(ForwardMode.PREFILL, [BatchItem("a", 0, [0] * 51)])
    table = kv.request_table("a")  # [L, KV, 7] resident slots
    kv.finish_prefill("a", 51)
    assert kv.hierarchy is prefill and kv.is_hierarchical("a")
    row = kv.request_slot("a")
    host = kv.dir.host_entries(row, np.arange(6))  # [6, LH] host slots of the full pages
    for page in range(6):
        for lh in range(LH):
            want = h.hbm[table[lh // KV, lh % KV, page]]
            assert torch.equal(h.host.pool_cpu[host[page, lh]], want)
    # sparse rows (layer 1) keep their newest 4 full pages (2..5); the partial page 6 is the tail
    rows = kv.sets.row_slots_cpu[row]
    assert (rows[:2] == PAD).all()  # layer 0 is dense: static, no rows
    for lh in (2, 3):
        assert sorted(rows[lh, :4].tolist()) == sorted(table[1, lh - 2, 2:6].tolist())
        assert (rows[lh, 4:] == PAD).all()
    owned = np.flatnonzero(kv.dir.hbm_owner == row)
    assert owned.size == 2 * 7 + 2 * 1 + 2 * 4  # dense layer + sparse tails + rows
    kv.check_integrity(on_device=True)
    # decode to page 7: the tail (page 6) joins the rows, the oldest row slot goes back
    for pos in range(51, 56):  # token 55 completes page 6
        kv.ensure("a", pos + 1)
        h.write(ForwardMode.DECODE, [BatchItem("a", pos, [0])])
        kv.hierarchy.begin_step(h.batch.append_slots)  # rows age, the tail stays at age 0
        kv.hierarchy.offload_completed(torch.tensor([row]), h.batch.positions, h.batch.append_slots)
    tail6 = h.batch.append_slots[1, 0].tolist()
    free_before = kv.hbm_slots.num_free
    kv.ensure("a", 57)
    assert kv.hbm_slots.num_free == free_before - LH + 2  # new tail 4, one row slot x2 back
    rows = kv.sets.row_slots_cpu[row]
    for lh in (2, 3):
        assert tail6[lh - 2] in rows[lh, :4].tolist()
        assert table[1, lh - 2, 2] not in rows[lh].tolist()  # page 2: oldest, dropped
    host6 = kv.dir.host_entries(row, np.array([6]))[0]
    assert all(h.page_ok(int(host6[lh]), "a", lh, 6, P) for lh in range(LH))  # offloaded
    kv.check_integrity(on_device=True)
    kv.free("a")
    kv.check_integrity(on_device=True)
    assert kv.hbm_slots.num_used == 0 and kv.host.allocator.num_used == 0


def test_out_of_host_pool_changes_nothing():
    h = Harness(hbm_pages=40, host_pages=8)
    h.add("a", 1, 2)
    h.add("b", 2, None)
    h.kv.ensure("a", 40)  # 5 pages
    with pytest.raises(OutOfSlotsError, match="host KV pool"):
        h.kv.ensure("b", 32)  # 4 pages
    assert not h.kv.holds("b") and h.kv.free_pages == 3
    with pytest.raises(OutOfSlotsError, match="host KV pool"):
        h.kv.ensure("a", 80)
    assert h.kv.extra_pages("a", 40) == 0 and h.kv.extra_pages("a", 41) == 1
    h.kv.check_integrity(on_device=True)


def test_hbm_pressure_shrinks_buffers_before_failing():
    h = Harness(hbm_pages=14, host_pages=60, dense_layers=0, ratio=2.0)  # width 6 of mandatory 2
    h.add("a", 1, 2)
    h.kv.ensure("a", 64)  # 8 pages, all resident: 32 of 56 slots
    h.write(ForwardMode.PREFILL, [BatchItem("a", 0, [0] * 64)])
    h.kv.finish_prefill("a", 64)  # keeps 6 pages per row: 24 slots
    assert h.kv.hbm_slots.num_used == 24
    assert h.kv.free_pages == (56 - 24 + 16) // LH  # 4 buffer pages x 4 rows reclaimable
    h.add("b", 2, None)
    h.kv.ensure("b", 88)  # 11 pages = 44 slots: 32 free, a's buffers give 12
    a = h.kv._held["a"]
    assert a.width == 3 and h.kv.sets.row_slots_cpu[a.row, :, :3].min() > 0
    assert h.kv.free_pages == 1  # a's last buffer page above its mandatory 2
    h.kv.ensure("b", 96)
    assert a.width == 2 and h.kv.free_pages == 0
    with pytest.raises(OutOfSlotsError, match="HBM KV pool"):
        h.kv.ensure("b", 104)
    assert h.kv.extra_pages("b", 104) == 1
    h.kv.check_integrity(on_device=True)


def test_rebalance_grows_the_missing_request_from_free_hbm():
    h = Harness(hbm_pages=40, host_pages=60, dense_layers=0, ratio=1.0)  # width 4 of 2
    for rid, uid in (("a", 1), ("b", 2)):
        h.add(rid, uid, 2)
        h.kv.ensure(rid, 96)  # 12 full pages
        h.write(ForwardMode.PREFILL, [BatchItem(rid, 0, [0] * 96)])
        h.kv.finish_prefill(rid, 96)
    a, b = h.kv._held["a"], h.kv._held["b"]
    assert (a.row, b.row, a.width, b.width) == (0, 1, 4, 4)
    b_rows = b.rows.copy()
    lookups, hits = np.full(4, 7, np.int64), np.full(4, 5, np.int64)  # earlier owners' counts
    h.kv.rebalance(lookups, hits)  # first call: starts counting, nothing known yet
    assert (a.width, b.width) == (5, 5) and a.seen == (7, 5)  # both miss (unknown): explore
    for held in (a, b):  # back to the initial widths
        held.width = 4
        h.kv.sets.trim(held, 4, by_age=True)
        held.prev = (-1, float("nan"))
    lookups[:2], hits[:2] = 107, (55, 105)  # a misses half its pages, b never misses
    h.kv.rebalance(lookups, hits)
    assert (a.width, b.width) == (5, 4) and np.array_equal(b.rows, b_rows)
    new = a.rows[:, 4]  # one empty slot per row, oldest age: the next victims
    assert (h.kv.lru.ages(torch.from_numpy(new)) == 255).all()
    assert np.array_equal(h.kv.sets.row_slots_cpu[a.row, :, :5], a.rows)
    h.kv.check_integrity(on_device=True)
    lookups[:2], hits[:2] = 207, (155, 205)  # a's extra page raised its hit rate: grow again
    h.kv.rebalance(lookups, hits)
    assert (a.width, b.width) == (6, 4) and a.rows.shape == (LH, 6)
    lookups[:2], hits[:2] = 307, (255, 305)  # no further gain: a keeps its width
    h.kv.rebalance(lookups, hits)
    assert (a.width, b.width) == (6, 4)
    h.kv.check_integrity(on_device=True)


def _select(rng: random.Random, num_pages: int, mandatory: int) -> list[int]:
    """A random selection: the tail page plus up to mandatory - 1 others, ascending."""
    others = rng.sample(range(num_pages - 1), min(num_pages - 1, rng.randrange(mandatory)))
    return sorted(others) + [num_pages - 1]


def _decode_step(h: Harness, rng: random.Random, reqs: list[str], tokens: dict) -> None:
    kv = h.kv
    items = [BatchItem(r, tokens[r], [0]) for r in reqs]
    for r in reqs:
        kv.ensure(r, tokens[r] + 1)
    h.write(ForwardMode.DECODE, items)
    sparse = [r for r in reqs if kv.is_hierarchical(r)]
    hier = kv.hierarchy
    hier.begin_step(h.batch.append_slots)
    if sparse:
        req_slots = torch.tensor([kv.request_slot(r) for r in sparse])
        for layer in range(h.kv.config.dense_layers, L):
            rows = [
                _select(rng, kv.pages_for(tokens[r] + 1), h.mandatory[r])
                for r in sparse
                for _ in range(KV)
            ]
            indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(x) for x in rows])]))
            ids = torch.tensor([p for x in rows for p in x] + [0, 0], dtype=torch.int32)
            slots = hier.resolve(layer, req_slots, indptr.int(), ids).tolist()
            for i, (r, pages) in enumerate(zip([r for r in sparse for _ in range(KV)], rows)):
                lh = layer * KV + i % KV
                for j, page in enumerate(pages):
                    valid = P if page != pages[-1] else tokens[r] % P + 1
                    slot = slots[int(indptr[i]) + j]
                    assert h.page_ok(slot, r, lh, page, valid), (r, lh, page)
    pos = h.batch.positions
    req_all = torch.tensor([kv.request_slot(r) if kv.is_hierarchical(r) else -1 for r in reqs])
    hier.offload_completed(req_all, pos, h.batch.append_slots)
    for r in reqs:
        tokens[r] += 1


def test_random_operations_keep_contents_and_accounting():
    rng = random.Random(7)
    h = Harness(hbm_pages=30, host_pages=40, dense_layers=1, ratio=1.0, max_requests=4)
    kv = h.kv
    tokens: dict[str, int] = {}  # tokens in the cache per live request
    waiting: list[str] = []
    lookups, hits = np.zeros(4, np.int64), np.zeros(4, np.int64)  # per-row counters
    for op in range(1500):
        rid = f"r{op}"
        if rng.random() < 0.15:
            h.add(rid, op, rng.choice([None, 2, 3]))
            waiting.append(rid)
        if waiting and len(tokens) < 4:
            r, n = waiting[0], rng.randrange(1, 60)
            if kv.extra_pages(r, n) <= kv.free_pages:
                waiting.pop(0)
                kv.ensure(r, n)
                h.write(ForwardMode.PREFILL, [BatchItem(r, 0, [0] * n)])
                kv.finish_prefill(r, n)
                tokens[r] = n
        live = list(tokens)
        old = [r for r in live if tokens[r] + 1 >= 64 * P]
        if live and rng.random() < 0.08:  # finish or cancel
            old.append(rng.choice(live))
        for r in set(old):
            kv.free(r)
            del tokens[r]
            live.remove(r)
        need = sum(kv.extra_pages(r, tokens[r] + 1) for r in live)
        while live and need > kv.free_pages:  # preempt the latest, as the scheduler does
            r = live.pop()
            kv.free(r)
            del tokens[r]
            need = sum(kv.extra_pages(r, tokens[r] + 1) for r in live)
        if live:
            _decode_step(h, rng, live, tokens)
        if op % 25 == 0:  # buffers follow (random) hit rates
            more = np.array([rng.randrange(1, 50) for _ in range(4)])
            lookups += more
            hits += np.array([rng.randrange(0, int(n) + 1) for n in more])
            kv.rebalance(lookups, hits)
        if op % 100 == 0:
            kv.check_integrity(on_device=True)
    stats = kv.stats.tolist()
    assert stats[FETCHED] > 500 and stats[SHORT] == 0
    for r in list(tokens):
        kv.free(r)
    kv.check_integrity(on_device=True)
    assert kv.hbm_slots.num_used == 0 and kv.host.allocator.num_used == 0
    assert kv.dir.segments.num_used == 0 and not kv.dir.active.any()


def test_vectorised_decode_batch_equals_the_generic_builder():
    """build_batch's fast path for hierarchical decode items gives the ForwardBatch the generic
    build_forward_batch gives (append and listed slots = the tail page's, lengths, indices)."""
    from spinserve.control.kv_manager import build_forward_batch

    h = Harness(hbm_pages=40, host_pages=60, dense_layers=1, ratio=1.0)
    for rid, uid, n in (("a", 1, 37), ("b", 2, 64), ("c", 3, 50)):
        h.add(rid, uid, 2)
        h.kv.ensure(rid, n)
        h.write(ForwardMode.PREFILL, [BatchItem(rid, 0, [0] * n)])
        h.kv.finish_prefill(rid, n)
        h.kv.ensure(rid, n + 1)  # the next token's page (b starts a new one)
    items = [BatchItem(r, n, [t]) for r, n, t in (("b", 64, 7), ("a", 37, 8), ("c", 50, 9))]
    fast = h.kv.build_batch(ForwardMode.DECODE, items, "cpu")
    kv = h.kv
    slow = build_forward_batch(
        ForwardMode.DECODE, items, kv.num_layers, kv.num_kv_heads, kv.page_size, "cpu",
        slots_of=lambda rid, pages: kv._resident(kv._held[rid], pages).T,
        range_of=lambda rid, a, b: kv._resident(kv._held[rid], np.arange(a, b)).T,
        first_page_of=lambda rid, n: n - 1,
    )  # fmt: skip
    for name in ("input_ids", "positions", "append_slots", "append_offsets", "qo_indptr",
                 "kv_indptr", "kv_slots", "kv_last_page_len", "logits_indices"):  # fmt: skip
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert fast.append_slots.min() > 0  # real slots, not the dummy
