"""GPU tests (`-m gpu`): Triton kernels at real shapes against float32 references, CUDA-graph
capture / replay with changed inputs, torch.compile, UVA gather from pinned host memory."""

from __future__ import annotations

import math

import pytest
import torch
from spin_plugin_cases import make_paged, rel_err

from spinserve.plugins import ops
from spinserve.plugins import reference as ref

pytestmark = pytest.mark.gpu
I32 = torch.int32
DEV = "cuda"


@pytest.mark.parametrize(
    "dtype,D,P,group,lens",
    [
        (torch.bfloat16, 128, 16, 4, [4096, 33, 1, 1777]),  # Llama-3.1-8B shape
        (torch.float16, 128, 32, 8, [2047, 129]),
        (torch.bfloat16, 64, 8, 3, [1000, 5000]),  # SmolLM2 group
        (torch.bfloat16, 128, 16, 1, [131072]),  # 128K: many splits
    ],
)
def test_decode_real_shapes(dtype, D, P, group, lens):
    kv_heads = 8 if lens[0] < 100000 else 2
    case = make_paged(lens, kv_heads, D, P, dtype, device=DEV)
    q = torch.randn(len(lens), kv_heads * group, D, device=DEV).to(dtype)
    args = (q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, D**-0.5)
    want = ref.paged_decode_attention_ref(q.float(), case.kv_pool.float(), *args[2:])
    assert rel_err(ops.paged_decode_attention(*args), want) < 1e-2


@pytest.mark.parametrize(
    "dtype,D,P,group,kv_lens,q_lens",
    [
        (torch.bfloat16, 128, 16, 4, [3000, 517], [1000, 517]),
        (torch.float16, 64, 32, 8, [777], [777]),
        (torch.bfloat16, 64, 8, 3, [2000, 1], [300, 1]),
    ],
)
def test_prefill_real_shapes(dtype, D, P, group, kv_lens, q_lens):
    kv_heads = 4
    case = make_paged(kv_lens, kv_heads, D, P, dtype, device=DEV)
    q = torch.randn(sum(q_lens), kv_heads * group, D, device=DEV).to(dtype)
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=I32, device=DEV)
    args = (q, case.kv_pool, qo, case.kv_indptr, case.kv_slots, case.kv_last_page_len, D**-0.5)
    want = ref.paged_prefill_attention_ref(q.float(), case.kv_pool.float(), *args[2:])
    assert rel_err(ops.paged_prefill_attention(*args), want) < 1e-2


def test_append_summaries_score_select_gpu():
    D, P, kv_heads, T = 128, 16, 8, 300
    pool = torch.randn(T * kv_heads // P + 40, 2, P, D, device=DEV).to(torch.bfloat16)
    slots = (
        torch.arange(T, device=DEV)[:, None] // P * kv_heads
        + torch.arange(kv_heads, device=DEV)
        + 1
    ).to(I32)
    offs = (torch.arange(T, device=DEV) % P).to(I32)
    k, v = (torch.randn(T, kv_heads, D, device=DEV).to(torch.bfloat16) for _ in range(2))
    tables = [torch.zeros(pool.shape[0], D, device=DEV) for _ in range(3)]
    want_pool, want_tables = pool.clone(), [t.clone() for t in tables]
    ops.append_kv(pool, k, v, slots, offs, None, *tables)
    ref.append_kv_ref(want_pool, k, v, slots, offs)
    ref.page_summaries_ref(want_pool, slots, offs, slots, *want_tables)
    assert torch.equal(pool, want_pool)
    for got, exp in zip(tables, want_tables):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4)
    # score every page of the one request per kv head, then select
    npg = -(-T // P)
    indptr = (torch.arange(kv_heads + 1, device=DEV) * npg).to(I32)
    rows = slots[::P].T.contiguous().reshape(-1)  # [KV * npg] in token order per head
    last = torch.full((kv_heads,), T - (npg - 1) * P, dtype=I32, device=DEV)
    q = torch.randn(1, kv_heads * 4, D, device=DEV).to(torch.bfloat16)
    for mode in ops.ScoreMode:
        got = ops.score_pages(q, indptr, rows, last, *tables, P, mode)
        exp = ref.score_pages_ref(q, indptr, rows, last, *tables, P, int(mode))
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-3)
    ip, pos = ops.select_pages(got, indptr, 1, 2, 5, max_pages_per_row=npg)
    exp = ref.select_pages_ref(got, indptr, 1, 2, 5)
    assert [pos[ip[r] : ip[r + 1]].tolist() for r in range(kv_heads)] == exp


def _decode_inputs(lens, capacity_pages, kv_heads, D, P, pool):
    """Random page lists (distinct slots) for lens, padded into fixed-capacity buffers."""
    indptr, slots, last = [0], [], []
    perm = (torch.randperm(pool.shape[0] - 1) + 1).tolist()
    for n in lens:
        npg = -(-n // P)
        for _ in range(kv_heads):
            slots += perm[:npg]
            perm = perm[npg:]
            indptr.append(len(slots))
            last.append(n - (npg - 1) * P)
    slots += [0] * (capacity_pages - len(slots))
    return [torch.tensor(x, dtype=I32, device=DEV) for x in (indptr, slots, last)]


def test_decode_cuda_graph_replay_with_new_page_lists():
    B, kv_heads, group, D, P, cap = 4, 8, 4, 128, 16, 4 * 8 * 300
    pool = torch.randn(cap + 10, 2, P, D, device=DEV).to(torch.bfloat16)
    q = torch.randn(B, kv_heads * group, D, device=DEV).to(torch.bfloat16)
    ip, sl, ln = _decode_inputs([100, 2000, 7, 4800], cap, kv_heads, D, P, pool)
    static = [q, pool, ip, sl, ln]
    ops.paged_decode_attention(*static, D**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_decode_attention(*static, D**-0.5)
    for lens in ([4799, 1, 16, 17], [3000, 3001, 2, 64]):
        for dst, src in zip((ip, sl, ln), _decode_inputs(lens, cap, kv_heads, D, P, pool)):
            dst.copy_(src)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        want = ref.paged_decode_attention_ref(q.float(), pool.float(), ip, sl, ln, D**-0.5)
        assert rel_err(out, want) < 1e-2


def test_gather_from_pinned_host_pool_inside_graph():
    P, D, cap = 16, 128, 64
    host = torch.randn(500, 2, P, D).to(torch.bfloat16).pin_memory()
    hbm = torch.zeros(100, 2, P, D, device=DEV, dtype=torch.bfloat16)
    src = torch.zeros(cap, dtype=I32, device=DEV)
    dst = torch.zeros(cap, dtype=I32, device=DEV)
    n = torch.zeros(1, dtype=I32, device=DEV)
    ops.gather_pages(host, hbm, src, dst, n)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gather_pages(host, hbm, src, dst, n)
    for count in (64, 13):
        src.copy_(torch.randperm(500)[:cap].to(I32))
        dst.copy_((torch.randperm(99)[:cap] + 1).to(I32))
        n.fill_(count)
        hbm.fill_(float("nan"))
        host[:5] = torch.randn(5, 2, P, D).to(torch.bfloat16)  # host-side update, seen by replay
        graph.replay()
        torch.cuda.synchronize()
        want = torch.full_like(hbm, float("nan"))
        ref.copy_pages_ref(host, want, src.cpu(), dst.cpu(), n.cpu())
        assert torch.equal(hbm.isnan(), want.isnan())
        assert torch.equal(hbm.nan_to_num(), want.nan_to_num())
    back = torch.zeros_like(host).pin_memory()
    ops.scatter_pages(hbm, back, dst, src, n)
    torch.cuda.synchronize()
    moved = src[:13].long().cpu()
    assert torch.equal(back[moved], host[moved])


def test_torch_compile_decode_step():
    kv_heads, group, D, P = 8, 4, 128, 16
    case = make_paged([500, 1234], kv_heads, D, P, torch.bfloat16, device=DEV)
    k = torch.randn(2, kv_heads, D, device=DEV).to(torch.bfloat16)
    slots = torch.stack(
        [case.kv_slots[case.kv_indptr[1:].long().reshape(2, kv_heads) - 1][b] for b in range(2)]
    ).to(I32)
    offs = (case.kv_last_page_len.reshape(2, kv_heads)[:, 0] - 1).to(I32)

    def step(q, pool):
        ops.append_kv(pool, k, k, slots, offs)  # rewrite the last token of each request
        return ops.paged_decode_attention(
            q * 2, pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, D**-0.5
        )

    q = torch.randn(2, kv_heads * group, D, device=DEV).to(torch.bfloat16)
    pool_c = case.kv_pool.clone()
    got = torch.compile(step, fullgraph=True)(q, pool_c)
    want = step(q, case.kv_pool)
    assert torch.equal(pool_c, case.kv_pool)
    assert rel_err(got, want.float()) < 1e-2


def test_sparse_all_selected_equals_dense_gpu():
    kv_heads, group, D, P = 8, 4, 128, 16
    case = make_paged([5000, 77], kv_heads, D, P, torch.bfloat16, device=DEV)
    q = torch.randn(2, kv_heads * group, D, device=DEV).to(torch.bfloat16)
    dense = ops.paged_decode_attention(
        q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, 1 / math.sqrt(D)
    )
    scores = torch.randn(case.kv_slots.numel(), device=DEV)
    ip, pos = ops.select_pages(scores, case.kv_indptr, 1, 4, 10**6, max_pages_per_row=400)
    sparse = ops.sparse_decode_attention(
        q, case.kv_pool, ip, case.kv_slots[pos.long()], case.kv_last_page_len, 1 / math.sqrt(D)
    )
    assert rel_err(sparse, dense.float()) < 5e-3  # split counts differ: rounding only


def test_select_kernel_matches_torch_topk_at_128k():
    """Triton select (bisection top-k) == torch topk selection on 128K-token rows."""
    from spinserve.plugins.triton_select import select_pages_torch

    rows, npg = 64, 8192
    lens = torch.randint(1, npg + 1, (rows,))
    lens[:4] = torch.tensor([1, 5, 133, npg])
    indptr = torch.zeros(rows + 1, dtype=I32)
    indptr[1:] = lens.cumsum(0)
    indptr = indptr.to(DEV)
    scores = torch.randn(int(lens.sum()), device=DEV)
    got = ops.select_pages(scores, indptr, 1, 4, 128, npg)
    want = select_pages_torch(scores, indptr, 1, 4, 128, npg)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
