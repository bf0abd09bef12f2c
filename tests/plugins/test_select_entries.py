"""select_indptr + select_page_ids / select_page_slots (the step-planned select of the static
decode path): the Triton kernel (interpreter on CPU, compiled with `-m gpu`) and the torch
fallback against plugins/reference.py's select_pages_ref and against select_pages (positions),
with poisoned outputs; the CSR's padding is written by the kernel itself."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins import ops
from spinserve.plugins import reference as ref
from spinserve.plugins._validate import UnsupportedInputError
from spinserve.plugins.triton_select import (
    SelectOut,
    select_entries_torch,
    select_entries_triton,
    select_pages_torch,
    select_quota,
)

I32 = torch.int32
POISON = -7


def _rows(lens: list[int], device: str = "cpu", gen: torch.Generator | None = None):
    """(page_indptr [R + 1] int32, scores [nnz] float32 with ties and signed zeros)."""
    indptr = torch.zeros(len(lens) + 1, dtype=I32)
    indptr[1:] = torch.tensor(lens).cumsum(0)
    nnz = int(indptr[-1])
    scores = torch.randn(nnz, generator=gen)
    scores[::7] = 0.25  # ties: the lower page wins
    scores[3::11] = -0.0  # -0.0 ties +0.0
    scores[5::13] = 0.0
    return indptr.to(device), scores.to(device)


def _expected(scores, indptr, quota: tuple[int, int, int], table: torch.Tensor):
    """Per row (positions, page indices, slots) from the reference."""
    want = ref.select_pages_ref(scores.cpu(), indptr.cpu(), *quota)
    ip = indptr.cpu().tolist()
    pages = [[p - ip[r] for p in row] for r, row in enumerate(want)]
    slots = [[int(table[r, j]) for j in row] for r, row in enumerate(pages)]
    return want, pages, slots


def _check(lens, quota, M, impl: str, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indptr, scores = _rows(lens, device, g)
    R = len(lens)
    table = torch.randint(1, 1 << 30, (R, M + 3), generator=g, dtype=I32).to(device)
    C = select_quota(*quota, M)
    sel_indptr = ops.select_indptr(indptr, *quota, M)
    counts = [min(n, C) for n in lens]
    assert sel_indptr.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    positions, pages, slots = _expected(scores, indptr, quota, table.cpu())
    for out, want in (
        (SelectOut.POSITION, positions),
        (SelectOut.PAGE, pages),
        (SelectOut.SLOT, slots),
    ):
        tab = table if out == SelectOut.SLOT else None
        args = (scores, indptr, sel_indptr, *quota, M, out, tab)
        if impl == "triton":
            got = torch.full((R * C,), POISON, dtype=I32, device=device)
            select_entries_triton(*args, entries=got)
        else:
            got = select_entries_torch(*args)
        assert got.shape == (R * C,)
        ip = sel_indptr.tolist()
        assert [got[ip[r] : ip[r + 1]].tolist() for r in range(R)] == want, out.name
        assert not got[ip[-1] :].any()  # padding: 0 (the dummy slot), poison overwritten
    return indptr, scores, table, sel_indptr


CASES = [
    # rows of 20, 3, 9, 40 pages; a row of 0; short rows whose padding spans programs
    ([20, 3, 9, 40], (2, 3, 4), 40),
    ([0, 1, 2, 1, 3, 2, 1, 17], (1, 2, 6), 17),
    ([33, 33, 5, 64, 1], (1, 4, 0), 64),  # no dynamic pages (streaming)
    ([100, 12, 7], (0, 1, 200), 100),  # budget covers every row: all pages
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("lens", "quota", "M"), CASES)
def test_select_entries_kernel_matches_reference(lens, quota, M):
    for seed in range(2):
        _check(lens, quota, M, "triton", seed=seed)


@pytest.mark.parametrize(("lens", "quota", "M"), CASES)
def test_select_entries_torch_matches_reference(lens, quota, M):
    _check(lens, quota, M, "torch", seed=3)


@pytest.mark.parametrize("interpreted", [True, False])
def test_public_ops_equal_select_pages(interpreted, monkeypatch):
    """select_page_ids / select_page_slots (the op: Triton when interpreted, else torch) ==
    select_pages' positions mapped to page indices and table entries."""
    if interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    lens, quota, M = [50, 7, 31, 2, 50, 18], (1, 3, 9), 50
    indptr, scores = _rows(lens)
    table = torch.randint(1, 10**6, (len(lens), M), dtype=I32)
    sel_indptr = ops.select_indptr(indptr, *quota, M)
    ip, pos = ops.select_pages(scores, indptr, *quota, M)
    assert torch.equal(ip, sel_indptr)
    row = torch.searchsorted(ip[1:].long(), torch.arange(pos.numel()), right=True)
    row = row.clamp(max=len(lens) - 1)
    real = torch.arange(pos.numel()) < ip[-1]
    page = torch.where(real, pos.long() - indptr[:-1].long()[row], 0)
    ids = ops.select_page_ids(scores, indptr, sel_indptr, *quota, M)
    slots = ops.select_page_slots(scores, indptr, sel_indptr, table, *quota, M)
    assert torch.equal(ids[real], page[real].to(I32)) and not ids[~real].any()
    assert torch.equal(slots[real], table[row, page][real]) and not slots[~real].any()
    assert torch.equal(select_pages_torch(scores, indptr, *quota, M)[1], pos)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda i, s, t: ops.select_page_ids(s, i, i.long(), 1, 1, 2, 8), "sel_indptr must"),
        (lambda i, s, t: ops.select_page_ids(s, i, i[:-1], 1, 1, 2, 8), "sel_indptr must"),
        (lambda i, s, t: ops.select_page_ids(s, i, i, 1, 0, 2, 8), "num_window_pages"),
        (lambda i, s, t: ops.select_page_ids(s.double(), i, i, 1, 1, 2, 8), "float32"),
        (lambda i, s, t: ops.select_page_slots(s, i, i, t[:1], 1, 1, 2, 8), "page_table must"),
        (lambda i, s, t: ops.select_page_slots(s, i, i, t.long(), 1, 1, 2, 8), "int32"),
        (lambda i, s, t: ops.select_page_slots(s, i, i, t.t(), 1, 1, 2, 8), "contiguous"),
    ],
)
def test_select_entries_rejects_bad_inputs(call, match):
    indptr, scores = _rows([8, 5])
    table = torch.zeros(2, 2, dtype=I32)
    with pytest.raises(UnsupportedInputError, match=match):
        call(indptr, scores, table)


# ---- GPU (the lead runs these on the H100) ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "M", "quota"),
    [
        (32 * 8, 2048, (1, 9, 128)),  # the 8B decode step: batch 32 x 32K, budget 2048, P=16
        (256 * 8, 256, (1, 9, 16)),  # batch 256 x 4K, budget 256
        (64, 8192, (1, 4, 128)),  # 128K rows, the largest block
    ],
)
def test_select_entries_gpu_real_shapes(rows, M, quota):
    """Compiled kernel == torch fallback == reference at real shapes (full rows plus short and
    single-page rows), every output form, poisoned outputs."""
    g = torch.Generator().manual_seed(rows + M)
    lens = torch.full((rows,), M)
    lens[:5] = torch.tensor([1, 2, 10, 139, M - 1])
    lens[5 : rows // 4] = torch.randint(1, M + 1, (rows // 4 - 5,), generator=g)
    indptr, scores = _rows(lens.tolist(), "cuda", g)
    table = torch.randint(1, 1 << 30, (rows, M), generator=g, dtype=I32).cuda()
    sel_indptr = ops.select_indptr(indptr, *quota, M)
    C = select_quota(*quota, M)
    for out in SelectOut:
        tab = table if out == SelectOut.SLOT else None
        args = (scores, indptr, sel_indptr, *quota, M, out, tab)
        got = torch.full((rows * C,), POISON, dtype=I32, device="cuda")
        select_entries_triton(*args, entries=got)
        assert torch.equal(got, select_entries_torch(*args)), out.name
    ip, first = sel_indptr.cpu().tolist(), indptr[:9].cpu()  # the python reference: 8 rows
    positions, _, _ = _expected(scores[: int(first[-1])].cpu(), first, quota, table.cpu())
    pages = ops.select_page_ids(scores, indptr, sel_indptr, *quota, M).cpu()
    for r in range(8):
        assert (pages[ip[r] : ip[r + 1]] + first[r]).tolist() == positions[r]


@pytest.mark.gpu
def test_select_page_slots_in_cuda_graph_replays_new_scores():
    """score -> select_page_slots captured once, replayed with new scores and a new page
    table: equals the torch fallback each time (the 8B shape)."""
    rows, M, quota = 256, 2048, (1, 9, 128)
    indptr = (torch.arange(rows + 1) * M).to(I32).cuda()
    scores = torch.randn(rows * M, device="cuda")
    table = torch.randint(1, 1 << 20, (rows, M), dtype=I32, device="cuda")
    sel_indptr = ops.select_indptr(indptr, *quota, M)
    ops.select_page_slots(scores, indptr, sel_indptr, table, *quota, M)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slots = ops.select_page_slots(scores, indptr, sel_indptr, table, *quota, M)
    for _ in range(3):
        scores.copy_(torch.randn_like(scores))
        table.copy_(torch.randint_like(table, 1, 1 << 20))
        graph.replay()
        want = select_entries_torch(scores, indptr, sel_indptr, *quota, M, SelectOut.SLOT, table)
        assert torch.equal(slots, want)
