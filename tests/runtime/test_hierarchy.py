"""runtime/hierarchy.py: exact victims, transparency of the HBM budget, offload, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hierarchy_world import (
    D,
    P,
    World,
    assert_same_state,
    csr,
    random_rows,
    reference_attention,
)

from spinserve.plugins import ops
from spinserve.runtime.hierarchy import FETCHED, HITS, LOOKUPS, OFFLOADED, SHORT
from spinserve.runtime.lru import PAD

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=["torch", "fused"])
def fused(request, monkeypatch) -> bool:
    """Both resolve paths: torch ops, and the fused resolve_pages kernel (on CPU through
    Triton's interpreter; compiled on CUDA: the interpreter patches triton.language for the
    whole process, which breaks later compiled kernels)."""
    on_cpu = request.node.callspec.params.get("device", "cpu") == "cpu"
    if request.param == "fused" and on_cpu:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param == "fused"


def _resolve(w: World, layer: int, reqs: list[int], rows: list[list[int]]) -> list[int]:
    indptr, ids = csr(rows, w.K * len(rows) + 2, w.device)
    req_t = torch.tensor(reqs, device=w.device)
    out = w.hier.resolve(layer, req_t, indptr, ids)
    assert out.dtype == torch.int32 and out.shape == ids.shape
    flat = out.tolist()
    n = int(indptr[-1])
    assert flat[n:] == [0] * (ids.numel() - n)  # padding reads the dummy slot
    return flat[:n]


@pytest.mark.parametrize("device", DEVICES)
def test_exact_victims_one_row(device, fused):
    """One row (L = KV = 1) owning slots [1, 2, 3]: exact destinations step by step."""
    w = World(num_layers=1, num_kv_heads=1, row_width=3, max_selected=3, device=device, fused=fused)
    w.admit(0, 6)
    assert w.row_slots[0, 0].tolist() == [1, 2, 3]
    no_tail = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)

    def step(pages: list[int]) -> list[int]:
        w.hier.begin_step(no_tail)
        out = _resolve(w, 0, [0], [pages])
        w.dir.check_integrity(on_device=True)
        return out

    assert step([0, 3]) == [1, 2]  # all empty (age 255): column order
    assert w.resident(0, 0, 0, 6) == [1, PAD, PAD, 2, PAD, PAD]
    # page 3 hits; misses 1, 5 take the victims (empty slot 3 age 255, slot 1 age 1) in column
    # order of the victims: the j-th miss gets the j-th victim
    assert step([1, 3, 5]) == [1, 2, 3]
    assert w.resident(0, 0, 0, 6) == [PAD, 1, PAD, 2, PAD, 3]
    assert step([0]) == [1]  # all three aged 1: column order
    assert w.resident(0, 0, 0, 6) == [1, PAD, PAD, 2, PAD, 3]
    assert step([3, 4]) == [2, 3]  # 3 hits; slot 3 (page 5, age 2) is older than slot 1 (age 1)
    assert w.resident(0, 0, 0, 6) == [1, PAD, PAD, 2, 3, PAD]
    s = w.hier.stats.tolist()
    assert s[LOOKUPS] == 8 and s[HITS] == 2 and s[FETCHED] == 6 and s[SHORT] == 0
    # the pages now in HBM hold exactly their host copies
    for page, slot in ((0, 1), (3, 2), (4, 3)):
        host = w.host_slots(0, 0, 0, [page])[0]
        assert torch.equal(w.hbm[slot].cpu(), w.host.pool_cpu[host])


@pytest.mark.parametrize("device", DEVICES)
def test_short_budget_counts_and_reads_dummy(device, fused):
    w = World(num_layers=1, num_kv_heads=1, row_width=2, max_selected=3, device=device, fused=fused)
    w.admit(0, 6, width=2)
    w.hier.begin_step(torch.zeros(1, 1, 1, dtype=torch.int32, device=device))
    assert _resolve(w, 0, [0], [[0, 2, 4]]) == [1, 2, 0]
    assert w.hier.stats[SHORT] == 1 and w.hier.stats[FETCHED] == 2
    w.dir.check_integrity(on_device=True)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_and_requests_are_independent(device, fused):
    """Two requests x 2 heads and a padding request (-1): each row takes victims only among
    its own slots; the padding row reads the dummy slot and looks nothing up."""
    w = World(num_layers=1, num_kv_heads=2, row_width=2, max_selected=2, device=device, fused=fused)
    w.admit(0, 4)
    w.admit(2, 4)
    w.hier.begin_step(torch.zeros(1, 3, 2, dtype=torch.int32, device=device))
    rows = [[0, 1], [2], [3], [0, 3], [1], [2]]  # rows 4, 5 belong to the padding request
    out = _resolve(w, 0, [0, 2, -1], rows)
    own = w.row_slots.tolist()
    expect = own[0][0] + own[0][1][:1] + own[2][0][:1] + own[2][1] + [0, 0]
    assert out == expect
    assert w.hier.stats[LOOKUPS] == 6 and w.hier.stats[FETCHED] == 6
    w.dir.check_integrity(on_device=True)


def _local_selection(rng, n_pages: int, k: int, hot: np.ndarray) -> list[int]:
    """k distinct ascending pages, mostly from the row's hot set (locality)."""
    pick = set(rng.choice(hot, size=min(k - 1, hot.size), replace=False).tolist())
    pick.add(int(rng.integers(n_pages)))
    return sorted(pick)[:k]


@pytest.mark.parametrize("device", DEVICES)
def test_transparency_small_budget_equals_unlimited(device, fused):
    """Same selections, two HBM budgets: unlimited (every page fits) and mandatory-only (most
    steps miss). Attention outputs equal each other and the host-copy reference exactly."""
    n_pages, k, steps = 8, 4, 12
    worlds = {
        "unlimited": World(row_width=n_pages, max_selected=k, device=device, fused=fused),
        "small": World(row_width=k, max_selected=k, device=device, fused=fused),
    }
    for w in worlds.values():
        w.admit(0, n_pages)
        w.admit(1, n_pages - 2)
    host = worlds["small"].host.pool_cpu
    assert torch.equal(host, worlds["unlimited"].host.pool_cpu)  # same seed, same pages
    rng = np.random.default_rng(1)
    L, KV = 2, 2
    hot = [rng.choice(n_pages - 2, size=5, replace=False) for _ in range(2 * L * KV)]
    no_tail = torch.zeros(L, 2, KV, dtype=torch.int32, device=device)
    steps_with_miss = 0
    for _ in range(steps):
        fetched_before = worlds["small"].hier.stats[FETCHED].item()
        for w in worlds.values():
            w.hier.begin_step(no_tail)
        for layer in range(L):
            rows = [_local_selection(rng, n_pages - 2, k, hot[layer * 4 + r]) for r in range(4)]
            q = torch.randn(2, 4, D)
            last = torch.full((4,), P, dtype=torch.int32)
            ref = reference_attention(worlds["small"], q, [0, 1], layer, rows, last, k * 4)
            for w in worlds.values():
                indptr, ids = csr(rows, k * 4, device)
                slots = w.hier.resolve(layer, torch.tensor([0, 1], device=device), indptr, ids)
                out = ops.paged_decode_attention(
                    q.to(device), w.hbm, indptr, slots, last.to(device), D**-0.5
                )
                assert torch.equal(out.cpu(), ref)
                w.dir.check_integrity(on_device=True)
        steps_with_miss += worlds["small"].hier.stats[FETCHED].item() > fetched_before
    small, big = (worlds[n].hier.stats.tolist() for n in ("small", "unlimited"))
    assert small[SHORT] == big[SHORT] == 0
    assert steps_with_miss >= steps - 1  # "most steps miss"
    # unlimited: each distinct (row, page) is fetched exactly once, then always hits
    assert big[FETCHED] + big[HITS] == big[LOOKUPS] and small[LOOKUPS] == big[LOOKUPS]
    assert small[FETCHED] > big[FETCHED]


@pytest.mark.parametrize("device", DEVICES)
def test_offload_completed_writes_host_copies(device):
    w = World(num_layers=2, num_kv_heads=2, device=device)
    w.admit(0, 2)
    w.admit(1, 3)
    tail = w.dir.own_hbm(np.array([0, 1]), 4).reshape(2, 4)  # [req, lh] fresh tail slots
    w.dir.set_hbm(np.array([0, 1]), np.array([1, 2]), tail)
    w.sync()
    data = torch.randn(8, 2, P, D)
    w.hbm[torch.from_numpy(tail.ravel()).long().to(device)] = data.to(device)
    before = w.host.pool_cpu.clone()
    # [L, B, KV] append slots: (l, b, h) -> tail[b, l * KV + h]; the third row is padding
    append = torch.zeros(2, 3, 2, dtype=torch.int32)
    append[:, :2] = torch.from_numpy(tail).view(2, 2, 2).permute(1, 0, 2)
    positions = torch.tensor([2 * P - 1, 2 * P + 3, P - 1], device=device)  # only req 0 completes
    w.hier.offload_completed(torch.tensor([0, 1, -1], device=device), positions, append.to(device))
    host0 = w.dir.host_entries(0, np.array([1]))[0]
    after = w.host.pool_cpu
    assert torch.equal(after[torch.from_numpy(host0).long()], data[:4])
    changed = (after != before).flatten(1).any(1).nonzero().ravel()
    assert sorted(changed.tolist()) == sorted(host0.tolist())
    assert w.hier.stats[OFFLOADED] == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_random_steps_keep_accounting(seed, fused):
    """Random admit / step / budget shrink / release: integrity after every operation, every
    HBM slot, host slot and segment free at the end."""
    rng = np.random.default_rng(seed)
    w = World(
        max_requests=3, max_pages=8, row_width=5, max_selected=3, num_hbm=400, seed=seed,
        fused=fused,
    )  # fmt: skip
    live: dict[int, int] = {}
    for _ in range(60):
        op = rng.integers(4)
        free = [r for r in range(3) if r not in live]
        if op == 0 and free:
            live[free[0]] = int(rng.integers(1, 9))
            w.admit(free[0], live[free[0]], width=int(rng.integers(3, 6)))
        elif op == 1 and live:
            req = int(rng.choice(list(live)))
            w.release(req)
            del live[req]
        elif op == 2 and live:  # shrink one row's budget by one slot (it may hold a page)
            req = int(rng.choice(list(live)))
            lh = int(rng.integers(w.LH))
            slots = w.row_slots[req, lh]
            n = int((slots >= 0).sum())
            if n > 3:
                w.dir.disown_hbm(req, slots[n - 1 : n].numpy())
                w.row_slots[req, lh, n - 1] = PAD
                w.sync()
        elif live:
            reqs = sorted(live)
            w.hier.begin_step(torch.zeros(w.L, len(reqs), w.KV, dtype=torch.int32))
            for layer in range(w.L):
                rows = [
                    sorted(rng.choice(live[r], size=min(3, live[r]), replace=False).tolist())
                    for r in reqs
                    for _ in range(w.KV)
                ]
                slots = _resolve(w, layer, reqs, rows)
                assert 0 not in slots
        w.dir.check_integrity(on_device=True)
    assert w.hier.stats[SHORT] == 0
    for req in list(live):
        w.release(req)
    w.dir.check_integrity(on_device=True)
    d = w.dir
    assert d.hbm_slots.num_used == d.host_slots.num_used == d.segments.num_used == 0
    assert (d.meta_gpu[d.l2_offset + d.config.segment_entries :] == PAD).all()


@pytest.mark.parametrize("device", DEVICES)
def test_row_stats_exact_per_request(device, fused):
    """Per directory row: lookups and hits of every head and layer of the request in it; a
    padding request adds nothing (not even to row 0); a page past the request's directory is no
    lookup. Hand-counted over two steps, rows of width 4 >= 3 selected pages (no eviction)."""
    w = World(num_layers=2, num_kv_heads=2, row_width=4, max_selected=3, device=device, fused=fused)
    w.admit(0, 6)
    w.admit(2, 4)  # one segment: page 5 lies past its directory
    assert w.hier.row_stats.shape == (3, 2) and w.hier.row_stats.dtype == torch.int64
    reqs = [2, -1, 0]  # rows: (req 2, h0), (req 2, h1), padding x 2, (req 0, h0), (req 0, h1)
    pad = [[0, 1, 2], [1]]

    def step(per_layer: list[list[list[int]]]) -> None:
        w.hier.begin_step(torch.zeros(2, 3, 2, dtype=torch.int32, device=device))
        for layer, rows in enumerate(per_layer):
            _resolve(w, layer, reqs, rows[:2] + pad + rows[2:])
            w.dir.check_integrity(on_device=True)

    step([[[0, 1], [3], [0, 2, 5], [4, 5]], [[0, 1], [], [5], [0, 1, 2]]])  # every page misses
    assert w.hier.row_stats.tolist() == [[5 + 4, 0], [0, 0], [3 + 2, 0]]
    # layer 0 again: req 2 hits 0, 1 | 3 (5 is no lookup); req 0 hits 0, 2, 5 | 4
    step([[[0, 1, 2], [3, 5], [0, 2, 5], [1, 4]], [[], [], [], []]])
    assert w.hier.row_stats.tolist() == [[9 + 5, 0 + 4], [0, 0], [5 + 4, 0 + 3]]
    s = w.hier.stats.tolist()
    assert s[LOOKUPS] == 14 + 9 and s[HITS] == 4 + 3 and s[FETCHED] == s[LOOKUPS] - s[HITS]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_torch_on_random_steps(device, monkeypatch):
    """The fused kernel (interpreted on CPU) and the torch path, same random steps with a padding
    request and tight rows: same slots out, same device tables, epochs and counters."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    kw = dict(num_layers=2, num_kv_heads=2, max_requests=3, row_width=3, max_selected=3)
    worlds = [World(**kw, device=device, fused=f) for f in (False, True)]
    for w in worlds:
        w.admit(0, 7)
        w.admit(1, 5)
    reqs = [1, -1, 0]
    for _ in range(6):
        for w in worlds:
            w.hier.begin_step(torch.zeros(2, 3, 2, dtype=torch.int32, device=device))
        for layer in range(2):
            rows = random_rows(rng, [5, 7, 7], 2, 3)
            outs = [_resolve(w, layer, reqs, rows) for w in worlds]
            assert outs[0] == outs[1]
        assert_same_state(*worlds)
    torch_w = worlds[0]
    assert torch_w.hier.stats[FETCHED] > 0 and torch_w.hier.stats[HITS] > 0
    assert torch_w.hier.row_stats[2].tolist() == [0, 0]  # row 2 holds no request
    assert torch_w.hier.row_stats[:, 0].sum() == torch_w.hier.stats[LOOKUPS]
    assert torch_w.hier.row_stats[:, 1].sum() == torch_w.hier.stats[HITS]
    for w in worlds:
        w.dir.check_integrity(on_device=True)


@pytest.mark.parametrize("device", DEVICES)
def test_offload_pages_copies_and_counts(device):
    """End-of-prefill offload: host_pool[host] = hbm_pool[hbm] for the pairs given, nothing else
    changes, stats[OFFLOADED] counts the pages."""
    w = World(num_layers=1, num_kv_heads=2, device=device)
    w.admit(0, 3)
    hbm = w.dir.own_hbm(0, 4)
    data = torch.randn(4, 2, P, D)
    w.hbm[torch.from_numpy(hbm).long().to(device)] = data.to(device)
    host = w.dir.host_entries(0, np.array([0, 2])).ravel()  # 2 pages x 2 heads
    before = w.host.pool_cpu.clone()
    to = torch.from_numpy
    w.hier.offload_pages(to(hbm).to(device), to(host).to(device))
    w.hier.offload_pages(to(hbm[:0]).to(device), to(host[:0]).to(device))  # nothing: counts 0
    after = w.host.pool_cpu
    assert torch.equal(after[to(host).long()], data)
    changed = (after != before).flatten(1).any(1).nonzero().ravel()
    assert sorted(changed.tolist()) == sorted(host.tolist())
    assert w.hier.stats.tolist() == [0, 0, 0, 0, 4]
    with pytest.raises(ValueError, match="differ in length"):
        w.hier.offload_pages(to(hbm).to(device), to(host[:3]).to(device))
