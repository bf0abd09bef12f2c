"""Triton paging / selection kernels under TRITON_INTERPRET=1 against the references, and the
input validation of every op."""

from __future__ import annotations

import math

import pytest
import torch
from spin_plugin_cases import make_paged, rel_err

from spinserve.plugins import ops
from spinserve.plugins import reference as ref
from spinserve.plugins._validate import UnsupportedInputError
from spinserve.plugins.triton_select import select_pages_torch

pytestmark = pytest.mark.usefixtures("interpret")
I32 = torch.int32


def _tokens_to_pages(lens: list[int], kv_heads: int, page: int, first_offsets: list[int]):
    """Slots/offsets for appending lens[b] tokens of request b starting at first_offsets[b]
    within a fresh run of pages; padding row last (dummy slot 0)."""
    slots, offs, nxt = [], [], 1
    for n, off0 in zip(lens, first_offsets):
        base = torch.arange(kv_heads) * 0
        pages_needed = -(-(off0 + n) // page)
        page_slots = torch.arange(nxt, nxt + pages_needed * kv_heads).reshape(
            pages_needed, kv_heads
        )
        nxt += pages_needed * kv_heads
        for i in range(n):
            pos = off0 + i
            slots.append((page_slots[pos // page] + base).tolist())
            offs.append(pos % page)
    slots.append([0] * kv_heads)  # padded token -> dummy slot
    offs.append(0)
    return torch.tensor(slots, dtype=I32), torch.tensor(offs, dtype=I32), nxt


@pytest.mark.parametrize("dtype,page,kv_heads", [(torch.float16, 8, 1), (torch.float32, 16, 3)])
def test_append_kv_and_summaries(dtype, page, kv_heads):
    D = 64
    slots, offs, num_slots = _tokens_to_pages([11, 1, 20], kv_heads, page, [3, 0, 5])
    T = slots.shape[0]
    pool = torch.full((num_slots + 2, 2, page, D), float("nan"), dtype=dtype)
    pool[1:, :, :5] = torch.randn(num_slots + 1, 2, 5, D).to(dtype)  # earlier tokens
    k = torch.randn(T, kv_heads, D).to(dtype)
    v = torch.randn(T, kv_heads, D).to(dtype)
    want = pool.clone()
    ref.append_kv_ref(want, k, v, slots, offs)
    tables = [torch.full((num_slots + 2, D), float("nan")) for _ in range(3)]
    want_tables = [t.clone() for t in tables]
    ops.append_kv(pool, k, v, slots, offs, None, *tables)
    ref.page_summaries_ref(want, slots, offs, slots, *want_tables)
    real = slice(1, None)  # slot 0 is the dummy: its content is unspecified
    assert torch.equal(pool[real].isnan(), want[real].isnan())  # untouched cells keep the poison
    assert torch.equal(pool[real].nan_to_num(), want[real].nan_to_num())
    for got, exp in zip(tables, want_tables):
        assert torch.equal(got[real].isnan(), exp[real].isnan())
        torch.testing.assert_close(got[real].nan_to_num(), exp[real].nan_to_num())


def test_gather_and_scatter_pages():
    host = torch.randn(40, 2, 16, 64).to(torch.bfloat16)
    hbm = torch.full((12, 2, 16, 64), float("nan"), dtype=torch.bfloat16)
    host_slots = torch.randperm(40)[:10].to(I32)
    hbm_slots = (torch.randperm(11)[:10] + 1).to(I32)
    n = torch.tensor([7], dtype=I32)  # capacity 10, 7 pages this step
    want = hbm.clone()
    ref.copy_pages_ref(host, want, host_slots, hbm_slots, n)
    ops.gather_pages(host, hbm, host_slots, hbm_slots, n)
    assert torch.equal(hbm.isnan(), want.isnan()) and torch.equal(
        hbm.nan_to_num(), want.nan_to_num()
    )
    back = torch.zeros_like(host)
    ops.scatter_pages(hbm, back, hbm_slots, host_slots, n)
    moved = host_slots[:7].long()
    assert torch.equal(back[moved], host[moved])
    rest = torch.ones(40, dtype=torch.bool)
    rest[moved] = False
    assert not back[rest].any()


@pytest.mark.parametrize("mode", list(ops.ScoreMode))
def test_score_pages(mode):
    B, kv_heads, group, D, P = 2, 2, 4, 64, 16
    case = make_paged([100, 37], kv_heads, D, P, torch.float32)
    n = case.kv_slots.numel()
    page_rows = torch.randperm(n + 3)[:n].to(I32)
    tables = [torch.randn(n + 3, D) for _ in range(3)]
    q = torch.randn(B, kv_heads * group, D).to(torch.float16)
    args = (q, case.kv_indptr, page_rows, case.kv_last_page_len, *tables, P, int(mode))
    got = ops.score_pages(*args[:-1], mode=mode)
    torch.testing.assert_close(got, ref.score_pages_ref(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["op", "torch"])
def test_select_pages_matches_reference(impl):
    indptr = torch.tensor([0, 20, 23, 32, 32 + 40], dtype=I32)  # rows of 20, 3, 9, 40 pages
    scores = torch.randn(72)
    scores[40:50] = -scores[40:50].abs()  # negative scores order correctly too
    scores[60:64] = 0.5  # ties: lower page index wins
    select = ops.select_pages if impl == "op" else select_pages_torch
    sel_indptr, sel_pos = select(scores, indptr, 2, 3, 4, 40)
    want = ref.select_pages_ref(scores, indptr, 2, 3, 4)
    got = [sel_pos[sel_indptr[r] : sel_indptr[r + 1]].tolist() for r in range(4)]
    assert got == want
    assert sel_indptr.tolist() == [0, 9, 12, 21, 30]
    assert not sel_pos[30:].any()  # padding


def test_sparse_all_selected_equals_dense_and_subset_equals_reference():
    kv_heads, group, D, P = 2, 4, 64, 8
    case = make_paged([90, 41], kv_heads, D, P, torch.float32)
    q = torch.randn(2, kv_heads * group, D)
    scale = 1 / math.sqrt(D)
    dense = ops.paged_decode_attention(
        q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, scale
    )
    scores = torch.randn(case.kv_slots.numel())
    ip, pos = ops.select_pages(scores, case.kv_indptr, 1, 1, 100, max_pages_per_row=12)
    sparse = ops.sparse_decode_attention(
        q, case.kv_pool, ip, case.kv_slots[pos.long()], case.kv_last_page_len, scale
    )
    assert rel_err(sparse, dense) < 1e-6
    ip, pos = ops.select_pages(scores, case.kv_indptr, 1, 2, 3, max_pages_per_row=12)
    sel = case.kv_slots[pos.long()].contiguous()
    sparse = ops.sparse_decode_attention(q, case.kv_pool, ip, sel, case.kv_last_page_len, scale)
    want = ref.paged_decode_attention_ref(q, case.kv_pool, ip, sel, case.kv_last_page_len, scale)
    assert rel_err(sparse, want) < 1e-5
    assert rel_err(sparse, dense) > 1e-3  # it did drop pages


def _decode_args(D=64, P=16, dtype=torch.float16, group=2):
    case = make_paged([20], 2, D, P, dtype)
    q = torch.randn(1, 2 * group, D).to(dtype)
    return [q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, 0.1]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, torch.zeros(5, 2, 16, 96, dtype=torch.float16)), "head_dim 96"),
        (lambda a: a.__setitem__(1, torch.zeros(5, 2, 4, 64, dtype=torch.float16)), "page size 4"),
        (lambda a: a.__setitem__(1, a[1].to(torch.float64)), "dtype"),
        (lambda a: a.__setitem__(0, a[0].to(torch.bfloat16)), "must match kv_pool dtype"),
        (lambda a: a.__setitem__(0, a[0].repeat(1, 2, 1)[:, ::2]), "contiguous"),
        (lambda a: a.__setitem__(2, a[2].long()), "int32"),
        (lambda a: a.__setitem__(0, a[0].to("meta")), "meta"),
        (lambda a: a.__setitem__(0, torch.zeros(1, 3, 64, dtype=torch.float16)), "multiple"),
    ],
)
def test_decode_rejects_unsupported_inputs(mutate, match):
    args = _decode_args()
    mutate(args)
    with pytest.raises(UnsupportedInputError, match=match):
        ops.paged_decode_attention(*args)


def test_other_ops_reject_unsupported_inputs():
    pool = torch.zeros(4, 2, 16, 64, dtype=torch.float16)
    k = torch.zeros(3, 2, 80, dtype=torch.float16)
    with pytest.raises(UnsupportedInputError, match="head_dim"):
        ops.append_kv(pool, k, k, torch.zeros(3, 2, dtype=I32), torch.zeros(3, dtype=I32))
    with pytest.raises(UnsupportedInputError, match="int32"):
        ops.gather_pages(
            pool,
            pool.clone(),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=I32),
            torch.ones(1, dtype=I32),
        )
    with pytest.raises(UnsupportedInputError, match="page size"):
        ops.paged_prefill_attention(
            torch.zeros(2, 2, 64),
            torch.zeros(3, 2, 12, 64),
            torch.tensor([0, 2], dtype=I32),
            torch.tensor([0, 1], dtype=I32),
            torch.zeros(1, dtype=I32),
            torch.ones(1, dtype=I32),
            0.1,
        )
