"""Request admission checks: a prompt the engine can never serve is refused up front, with a
message that says what to change, and nothing in the engine changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hier_kv_manager import HierarchicalKVManager
    from .kv_manager import PagedKVManager


class RequestError(ValueError):
    """A request the engine refuses (too long, duplicate id, bad parameters)."""


def check_prompt(
    prompt_ids: list[int],
    max_context: int,
    vocab_size: int,
    kv: PagedKVManager | HierarchicalKVManager,
    hierarchy: bool,
) -> None:
    """RequestError unless the prompt fits the context, the vocabulary and the KV pools."""
    if not prompt_ids:
        raise RequestError("the prompt is empty: give at least one token")
    n = len(prompt_ids)
    if n >= max_context:
        raise RequestError(
            f"prompt of {n} tokens does not fit the engine's max context of {max_context} "
            "tokens (prompt + at least one generated token): shorten it"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:4]} are outside the vocabulary")
    if kv.pages_for(n + 1) <= kv.capacity_pages:
        return
    pool_tokens = kv.capacity_pages * kv.page_size
    if hierarchy:
        raise RequestError(
            f"prompt of {n} tokens does not fit: its prefill is HBM-resident and every page has "
            f"a host copy, and the pools hold {pool_tokens} tokens: raise cache.kv_cache_tokens"
            " / cache.host_pool_tokens or shorten the prompt"
        )
    raise RequestError(
        f"prompt of {n} tokens needs more KV pages than the whole pool holds ({pool_tokens} "
        "tokens): raise cache.kv_cache_tokens or shorten the prompt"
    )
