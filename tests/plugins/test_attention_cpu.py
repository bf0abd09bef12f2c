"""Triton attention kernels under TRITON_INTERPRET=1 against the pure-torch references."""

from __future__ import annotations

import math

import pytest
import torch
from spin_plugin_cases import make_paged, rel_err

from spinserve.plugins import ops
from spinserve.plugins import reference as ref
from spinserve.plugins.triton_decode import paged_decode_attention_triton
from spinserve.plugins.triton_prefill import PrefillConfig, paged_prefill_attention_triton

pytestmark = pytest.mark.usefixtures("interpret")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize(
    "group,head_dim,page,dtype,lens,splits",
    [
        (1, 64, 16, torch.float32, [37, 5, 16], None),
        (4, 128, 8, torch.float16, [100, 1], 3),
        (8, 64, 32, torch.bfloat16, [1, 65, 130], 4),
        (3, 64, 16, torch.float16, [33, 17], 2),
        (4, 64, 8, torch.float32, [300], 7),  # more splits than blocks: empty splits
    ],
)
def test_decode_matches_reference(group, head_dim, page, dtype, lens, splits):
    kv_heads = 2
    case = make_paged(lens, kv_heads, head_dim, page, dtype)
    q = torch.randn(len(lens), kv_heads * group, head_dim).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    args = (q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, scale)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention_triton(*args, num_splits=splits, out=out)
    want = ref.paged_decode_attention_ref(*args)
    assert rel_err(out, want) < TOL[dtype]
    assert rel_err(ops.paged_decode_attention(*args), want) < TOL[dtype]


@pytest.mark.parametrize(
    "group,head_dim,page,dtype,kv_lens,q_lens,cfg",
    [
        (1, 64, 16, torch.float32, [37, 5], [37, 2], None),
        (4, 128, 8, torch.float16, [70, 9], [23, 9], None),
        (8, 64, 32, torch.bfloat16, [45], [45], PrefillConfig(64, 32, 4, 1)),
        (3, 64, 16, torch.float16, [1, 40, 90], [1, 0, 77], PrefillConfig(32, 16, 4, 1)),
    ],
)
def test_prefill_matches_reference(group, head_dim, page, dtype, kv_lens, q_lens, cfg):
    kv_heads = 2
    case = make_paged(kv_lens, kv_heads, head_dim, page, dtype)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim).to(dtype)
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    args = (q, case.kv_pool, qo, case.kv_indptr, case.kv_slots, case.kv_last_page_len, scale)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention_triton(*args, config=cfg, out=out)
    want = ref.paged_prefill_attention_ref(*args)
    assert rel_err(out, want) < TOL[dtype]
    if cfg is None:
        assert rel_err(ops.paged_prefill_attention(*args), want) < TOL[dtype]


def test_prefill_chunked_equals_whole_prompt():
    """A prompt prefilled in two chunks gives the same outputs as in one."""
    kv_heads, group, D, P = 1, 4, 64, 16
    case = make_paged([50], kv_heads, D, P, torch.float32)
    q = torch.randn(50, group, D)
    whole = ops.paged_prefill_attention(
        q,
        case.kv_pool,
        torch.tensor([0, 50], dtype=torch.int32),
        case.kv_indptr,
        case.kv_slots,
        case.kv_last_page_len,
        0.1,
    )
    # chunk 1: the first 20 tokens see 2 pages (last holds 4 tokens)
    ip1 = torch.tensor([0, 2], dtype=torch.int32)
    first = ops.paged_prefill_attention(
        q[:20],
        case.kv_pool,
        torch.tensor([0, 20], dtype=torch.int32),
        ip1,
        case.kv_slots[:2].contiguous(),
        torch.tensor([4], dtype=torch.int32),
        0.1,
    )
    second = ops.paged_prefill_attention(
        q[20:],
        case.kv_pool,
        torch.tensor([0, 30], dtype=torch.int32),
        case.kv_indptr,
        case.kv_slots,
        case.kv_last_page_len,
        0.1,
    )
    assert rel_err(torch.cat([first, second]), whole) < 1e-5


def test_decode_is_last_prefill_row():
    """Decode of one token equals the prefill of a 1-token chunk at the same position."""
    case = make_paged([41, 7], 2, 64, 8, torch.float32)
    q = torch.randn(2, 8, 64)
    dec = ops.paged_decode_attention(
        q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, 0.125
    )
    pre = ops.paged_prefill_attention(
        q,
        case.kv_pool,
        torch.tensor([0, 1, 2], dtype=torch.int32),
        case.kv_indptr,
        case.kv_slots,
        case.kv_last_page_len,
        0.125,
    )
    assert rel_err(dec, pre) < 1e-5


def test_ops_trace_under_compile():
    """The custom ops trace through torch.compile (fake impls) and give the eager results."""
    case = make_paged([19, 33], 2, 64, 16, torch.float32)
    q = torch.randn(2, 8, 64)
    args = (q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, 0.125)
    compiled = torch.compile(ops.paged_decode_attention, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(*args), ref.paged_decode_attention_ref(*args)) < 1e-5


def test_opcheck_decode_and_prefill():
    case = make_paged([9, 20], 2, 64, 8, torch.float32)
    q = torch.randn(2, 4, 64)
    torch.library.opcheck(
        torch.ops.spin.paged_decode_attention.default,
        (q, case.kv_pool, case.kv_indptr, case.kv_slots, case.kv_last_page_len, 0.3),
        test_utils=("test_schema", "test_faketensor"),
    )
    qp = torch.randn(5, 4, 64)
    torch.library.opcheck(
        torch.ops.spin.paged_prefill_attention.default,
        (
            qp,
            case.kv_pool,
            torch.tensor([0, 2, 5], dtype=torch.int32),
            case.kv_indptr,
            case.kv_slots,
            case.kv_last_page_len,
            0.3,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
