"""fold_score_pages (Quest's decode index update fused into scoring): the Triton kernel
(interpreter on CPU, compiled with `-m gpu`) against fold_page_minmax_ref + score_pages_ref run
one after the other; the tail page is scored with its folded min / max."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins import ops
from spinserve.plugins import reference as ref
from spinserve.plugins._ops_glue import fold_page_minmax_ref
from spinserve.plugins._validate import UnsupportedInputError
from spinserve.plugins.triton_select import ScoreConfig, score_pages_triton

I32 = torch.int32


def _case(lens: list[int], KV: int, group: int, D: int, dtype, device: str, seed: int):
    """B = len(lens) requests x KV heads; every row lists its pages (distinct table rows, in a
    shuffled table), the new key belongs to the last one; table rows stay >= min <= max."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    counts = torch.tensor(lens).repeat_interleave(KV)  # [R] pages per row
    indptr = torch.zeros(B * KV + 1, dtype=I32)
    indptr[1:] = counts.cumsum(0)
    nnz = int(indptr[-1])
    page_rows = torch.randperm(nnz + 7, generator=g)[:nnz].to(I32)
    kmin = torch.randn(nnz + 7, D, generator=g)
    kmax = kmin + torch.rand(nnz + 7, D, generator=g)
    q = torch.randn(B, KV * group, D, generator=g)
    keys = 2 * torch.randn(B, KV, D, generator=g)
    fresh = torch.rand(B, generator=g) < 0.5
    fresh[0] = True
    last = torch.randint(1, 17, (B * KV,), generator=g, dtype=I32)
    out = [q, indptr, page_rows, last, kmin, kmax, keys, fresh]
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in out]


def _expected(q, indptr, page_rows, last, kmin, kmax, keys, fresh):
    """The two ops in sequence: fold into each row's last page, then score (Quest)."""
    kmin, kmax = kmin.clone(), kmax.clone()
    tail = page_rows[indptr[1:].long() - 1]
    fold_page_minmax_ref(kmin, kmax, tail, fresh, keys)
    scores = ref.score_pages_ref(q, indptr, page_rows, last, kmin, kmax, kmin, 16, 0)
    return scores, kmin, kmax


def _check(lens, KV, group, D, dtype, device, seed, config=None):
    q, indptr, page_rows, last, kmin, kmax, keys, fresh = _case(
        lens, KV, group, D, dtype, device, seed
    )
    want, want_min, want_max = _expected(q, indptr, page_rows, last, kmin, kmax, keys, fresh)
    if config is None:
        got = ops.fold_score_pages(q, indptr, page_rows, last, kmin, kmax, 16, keys, fresh)
    else:
        args = (q, indptr, page_rows, last, kmin, kmax, kmin, 16, 0, config, keys, fresh)
        got = score_pages_triton(*args)
    assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    tail = indptr[1:].long() - 1
    before = ref.score_pages_ref(q, indptr, page_rows, last, *_case(
        lens, KV, group, D, dtype, device, seed)[4:6], kmin, 16, 0)  # fmt: skip
    assert not torch.allclose(before[tail], got[tail])  # the tail was scored after its fold


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(
    ("lens", "block"),
    [
        ([300, 17, 1], None),  # 8 programs per row (interpreter's 132 SMs): tail in prog 4
        ([64, 65, 200], 16),  # small blocks: the tail block's owner varies by row
        ([5, 1], 64),
    ],
)
def test_fold_score_kernel_matches_fold_then_score(lens, block):
    config = None if block is None else ScoreConfig(block, 4, 4)
    for seed in range(2):
        _check(lens, 2, 4, 64, torch.float32, "cpu", seed, config)


def test_fold_score_reference_is_fold_then_score():
    """The CPU fallback (the op without Triton) against the two references in sequence, a row
    with no page folding nothing."""
    q, indptr, page_rows, last, kmin, kmax, keys, fresh = _case([9, 3], 2, 2, 64, torch.float32,
                                                                "cpu", 5)  # fmt: skip
    got = ops.fold_score_pages(q, indptr, page_rows, last, kmin, kmax, 16, keys, fresh)
    want, want_min, want_max = _expected(
        q, indptr, page_rows, last, *_case([9, 3], 2, 2, 64, torch.float32, "cpu", 5)[4:8]
    )
    assert torch.equal(got, want) and torch.equal(kmin, want_min) and torch.equal(kmax, want_max)
    empty = torch.tensor([0, 0, 2], dtype=I32)  # row 0 lists nothing
    before_min = kmin.clone()
    ops.fold_score_pages(q[:1], empty, page_rows[:2], last[:2], kmin, kmax, 16, keys[:1], fresh[:1])
    changed = (kmin != before_min).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {int(page_rows[1])}


def test_fold_score_rejects_bad_inputs():
    q, indptr, page_rows, last, kmin, kmax, keys, fresh = _case([4], 2, 2, 64, torch.float32,
                                                                "cpu", 1)  # fmt: skip
    with pytest.raises(UnsupportedInputError, match="keys must be"):
        ops.fold_score_pages(q, indptr, page_rows, last, kmin, kmax, 16, keys[:, :1], fresh)
    with pytest.raises(UnsupportedInputError, match="fresh must be"):
        ops.fold_score_pages(q, indptr, page_rows, last, kmin, kmax, 16, keys, fresh.int())
    with pytest.raises(UnsupportedInputError, match="share a dtype"):
        ops.fold_score_pages(q, indptr, page_rows, last, kmin, kmax.half(), 16, keys, fresh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("lens", "KV", "group"),
    [
        ([2048] * 31 + [1], 8, 4),  # the 8B decode step: 32 x 32K, one 1-page row
        ([256] * 255 + [3], 8, 4),  # batch 256 x 4K
        ([8192, 77], 8, 4),  # 128K
    ],
)
def test_fold_score_gpu_real_shapes(lens, KV, group, dtype):
    _check(lens, KV, group, 128, dtype, "cuda", len(lens))
