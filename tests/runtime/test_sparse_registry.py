"""Registry: built-ins are known, an unknown name is an error listing them, and a new algorithm
plugs in from its own module (here: this test) with no other change."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins.reference import paged_decode_attention_ref
from spinserve.runtime.sparse import (
    SparseAlgorithm,
    SparseParams,
    available_algorithms,
    create_algorithm,
    get_algorithm,
    register_algorithm,
)
from spinserve.runtime.sparse.base import valid_page_mask


class EveryOtherPage(SparseAlgorithm):
    """Toy: keeps the static pages plus every even page, ignoring the budget."""

    name = "every_other_page"

    def _dynamic_mask(self, state, query, req_slots, seq_lens, budget_pages, static):
        B, N = static.shape
        even = (torch.arange(N) % 2 == 0) & valid_page_mask(seq_lens, self.page_size, N)
        return even[:, None, :].expand(B, self.num_kv_heads, N)


def test_builtins_registered():
    assert {"dense", "quest", "retroinfer", "shadowkv", "streaming"} <= set(available_algorithms())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown sparse algorithm 'qeust'.*dense.*quest"):
        get_algorithm("qeust")


def test_wrong_page_size_is_an_error_with_remedy():
    with pytest.raises(ValueError, match="needs page size 8.*rebuild the engine with page_size=8"):
        create_algorithm("shadowkv", 16, 2, 32)


def test_toy_algorithm_registers_and_serves_attention():
    register_algorithm("every_other_page", EveryOtherPage)
    register_algorithm("every_other_page", EveryOtherPage)  # idempotent for the same class
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("every_other_page", type("Other", (EveryOtherPage,), {}))
    P, KV, D = 4, 1, 8
    params = SparseParams(budget_tokens=0, sink_tokens=0, window_tokens=1)
    algo = create_algorithm("every_other_page", P, KV, D, params)
    seq_lens = torch.tensor([23])  # 6 pages, tail holds 3 tokens
    sel = algo.select(algo.new_state(1, "cpu"), torch.randn(1, 2, D), torch.tensor([0]), seq_lens)
    assert sel.page_ids.tolist() == [0, 2, 4, 5]
    assert sel.kv_last_page_len.tolist() == [3]
    # pool: slot 0 dummy, request pages at slots 1..6 (logical page j -> slot j + 1)
    pool = torch.randn(7, 2, P, D)
    slots = sel.to_slots(torch.arange(1, 7)[None, :])
    assert slots.tolist() == [1, 3, 5, 6]
    q = torch.randn(1, 2, D)
    out = paged_decode_attention_ref(q, pool, sel.kv_indptr, slots, sel.kv_last_page_len, 0.5)
    k = torch.cat([pool[1, 0], pool[3, 0], pool[5, 0], pool[6, 0, :3]])
    v = torch.cat([pool[1, 1], pool[3, 1], pool[5, 1], pool[6, 1, :3]])
    want = torch.softmax(q[0] @ k.T * 0.5, -1) @ v
    torch.testing.assert_close(out[0], want)
