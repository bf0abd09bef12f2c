"""bf16 on CUDA: our engine vs transformers (fp32 and bf16) on the tiny random checkpoints.

bf16 rounding makes exact token equality a coin toss near ties, so the checks are: logits
relative error vs the fp32 reference no worse than transformers' own bf16 error (x2 + 2e-3),
and greedy decoding that follows transformers' bf16 greedy for at least 90% of teacher-forced
positions.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import make_checkpoint

from spinserve.control.engine import LLMEngine
from spinserve.control.kv_manager import BatchItem
from spinserve.engines.build import build_engine
from spinserve.runtime.batch import ForwardMode
from spinserve.runtime.sampling import SamplingParams

pytestmark = pytest.mark.gpu
KINDS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "tied"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_bf16_parity(kind, page_size, tmp_path):
    ckpt = make_checkpoint(kind, tmp_path / "ckpt")
    engine_dir = build_engine(ckpt, tmp_path / "engine", page_size=page_size, progress=False)
    engine = LLMEngine.from_engine_dir(
        engine_dir,
        device="cuda",
        dtype="bfloat16",
        **{"engine.prefill_chunk_tokens": 16, "cache.kv_cache_tokens": 4096},
    )
    ref32 = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
    ref16 = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 250, (n,), generator=gen).tolist() for n in (5, 37, 12)]
    ids = prompts[1] + prompts[0][:3]
    with torch.no_grad():
        l32 = ref32(torch.tensor([ids], device="cuda")).logits[0]
        l16 = ref16(torch.tensor([ids], device="cuda")).logits[0]
    engine.kv.ensure("x", len(ids))
    batch = engine.kv.build_batch(
        ForwardMode.PREFILL, [BatchItem("x", 0, ids, all_logits=True)], "cuda"
    )
    ours = engine.runner.forward(batch)
    engine.kv.free("x")
    assert torch.isfinite(ours).all()
    assert _rel(ours, l32) <= 2 * _rel(l16, l32) + 2e-3

    outs = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    for p, out in zip(prompts, outs):
        seq = torch.tensor([p + out.token_ids], device="cuda")
        with torch.no_grad():
            forced = ref16(seq).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
        agree = sum(a == b for a, b in zip(forced, out.token_ids)) / len(out.token_ids)
        assert agree >= 0.9, (kind, page_size, agree)
    engine.check_integrity()
