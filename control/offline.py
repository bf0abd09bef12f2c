"""Offline use of an LLMEngine: text -> token ids, and prompts run to completion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spinserve.runtime.sampling import SamplingParams

    from .engine import LLMEngine, RequestOutput


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]


def encode(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; chat=True wraps it as one user turn of the chat template."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer.encode(prompt)


def generate(
    engine: LLMEngine, prompts: list[str] | list[list[int]], params: SamplingParams
) -> list[GenerationOutput]:
    """Add every prompt, step the engine until all have finished, outputs in prompt order."""
    base = next(engine._arrival)
    ids = [p if isinstance(p, list) else engine.encode(p) for p in prompts]
    rids = [f"generate-{base}-{i}" for i in range(len(ids))]
    for rid, p in zip(rids, ids):
        engine.add_request(rid, p, params)
    results: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while any(rid not in results for rid in rids):
        for out in engine.step():
            if out.request_id in tokens:
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    results[out.request_id] = out
    return [
        GenerationOutput(results[r].output_text or "", tokens[r], results[r].finish_reason or "", p)
        for r, p in zip(rids, ids)
    ]
