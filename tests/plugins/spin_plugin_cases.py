"""Random paged-KV cases shared by the plugin tests (fresh random inputs every call)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    kv_pool: torch.Tensor  # [S, 2, P, D] random, slot 0 = dummy
    kv_indptr: torch.Tensor  # [B * KV + 1] int32
    kv_slots: torch.Tensor  # [nnz] int32 (distinct random slots >= 1)
    kv_last_page_len: torch.Tensor  # [B * KV] int32
    kv_lens: list[int]  # per request


def make_paged(
    kv_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    spare_slots: int = 5,
    gen: torch.Generator | None = None,
) -> PagedCase:
    """Each (request, kv head) row gets its own random, shuffled pool slots."""
    pages = [-(-n // page_size) for n in kv_lens]
    total = sum(pages) * num_kv_heads
    num_slots = total + 1 + spare_slots
    pool = torch.randn(num_slots, 2, page_size, head_dim, generator=gen).to(dtype)
    perm = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
    indptr, slots, last = [0], [], []
    for n, npg in zip(kv_lens, pages):
        for _ in range(num_kv_heads):
            slots += perm[:npg]
            perm = perm[npg:]
            indptr.append(len(slots))
            last.append(n - (npg - 1) * page_size)

    def i32(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    return PagedCase(pool.to(device), i32(indptr), i32(slots), i32(last), list(kv_lens))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN"
    assert torch.isfinite(out).all(), "output has inf"
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
