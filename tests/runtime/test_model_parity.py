"""Our engine vs transformers on tiny random checkpoints of every supported architecture."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from spinserve.control.engine import LLMEngine
from spinserve.control.kv_manager import BatchItem
from spinserve.engines.build import build_engine
from spinserve.runtime.batch import ForwardMode
from spinserve.runtime.sampling import SamplingParams
from tiny_models import make_checkpoint

KINDS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "tied"]
PROMPT_LENS = (5, 37, 12)  # 37 > the prefill chunk of 16: chunked prefill
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=KINDS)
def reference(request, tmp_path_factory):
    """(checkpoint dir, HF model, prompts, HF greedy continuations) for one architecture."""
    ckpt = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 250, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    model.generation_config.eos_token_id = None  # run the full NEW_TOKENS like ignore_eos
    continuations = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
            continuations.append(out[0, len(p) :].tolist())
            assert len(continuations[-1]) == NEW_TOKENS
    return ckpt, model, prompts, continuations


@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_logits_and_greedy_match_transformers(reference, page_size, tmp_path):
    ckpt, model, prompts, continuations = reference
    engine_dir = build_engine(ckpt, tmp_path / "engine", page_size=page_size, progress=False)
    engine = LLMEngine.from_engine_dir(
        engine_dir, device="cpu", dtype="float32", **{"engine.prefill_chunk_tokens": 16}
    )
    assert engine.page_size == page_size

    # logits of every position of a 40-token prompt, in one prefill forward
    ids = prompts[1] + prompts[0][:3]
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0]
    engine.kv.ensure("logits", len(ids))
    batch = engine.kv.build_batch(
        ForwardMode.PREFILL, [BatchItem("logits", 0, ids, all_logits=True)], "cpu"
    )
    ours = engine.runner.forward(batch)
    engine.kv.free("logits")
    assert ours.shape == ref_logits.shape
    assert (ours - ref_logits).abs().max().item() <= 1e-3

    # greedy continuations of a batch of prompts of different lengths, decoded together
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for out, expected in zip(outs, continuations):
        assert out.token_ids == expected
        assert out.finish_reason == "length"
    engine.check_integrity()
    assert engine.kv.free_pages == engine.kv.capacity_pages
