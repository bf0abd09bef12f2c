"""SmolLM2 decode throughput: spinserve (eager) vs transformers generate, same prompts, same run.

For each batch size: B prompts of real text (~PROMPT_TOKENS each), greedy, NEW_TOKENS tokens,
EOS ignored. Decode tokens/s = B * (NEW_TOKENS - 1) / (time after the first token), median over
repeats, for both (transformers' first token is stamped by a stopping criterion).
Usage: python -m spinserve.perf.bench_decode [--out DIR] [--batches 1 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .common import record, write_record

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the "
    "face of the waters. And God said, Let there be light: and there was light. "
)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prompts(tokenizer, batch: int, prompt_tokens: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * 8)
    return [ids[i % 7 : i % 7 + prompt_tokens] for i in range(batch)]


def time_spinserve(engine, prompts, new_tokens: int, device: str) -> tuple[float, float]:
    """(seconds to the first token of every request, seconds of the decode after it)."""
    from spinserve.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    _sync(device)
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished():
        engine.step()
        if (
            first is None
            and not any(r.in_prefill for r in engine.scheduler.running)
            and not engine.scheduler.waiting
        ):
            _sync(device)
            first = time.perf_counter()
    _sync(device)
    end = time.perf_counter()
    return first - t0, end - first


def time_hf(model, prompts, new_tokens: int, device: str, pad_id: int) -> tuple[float, float]:
    """(seconds to the first token, seconds of the decode after it) of transformers' generate;
    a stopping criterion (called after every generated token) stamps the first token's time."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _FirstToken(StoppingCriteria):
        first: float | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.first is None:
                _sync(device)
                self.first = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    starts = torch.tensor([width - len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None, :] >= starts[:, None]).long()
    stamp = _FirstToken()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([stamp]),
        )
    _sync(device)
    return stamp.first - t0, time.perf_counter() - stamp.first


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("perf/results"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import transformers as tf

    from spinserve.control.engine import LLMEngine
    from spinserve.engines.embedded import embedded_engine_dir, find_embedded_gguf

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    common = {"cache.kv_cache_tokens": 65536, "engine.max_batched_tokens": 8192}
    engine = LLMEngine.from_engine_dir(
        embedded_engine_dir(),
        device=args.device,
        dtype=dtype,
        **common,
        **{"engine.cuda_graphs": False},
    )
    graphed = None
    if args.device == "cuda":
        graphed = LLMEngine.from_engine_dir(
            embedded_engine_dir(), device="cuda", dtype=dtype, **common
        )
    gguf = find_embedded_gguf()
    hf_model = (
        tf.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        .to(args.device)
        .eval()
    )
    pad = engine.tokenizer.pad_token_id or 0
    rows = []
    for batch in args.batches:
        prompts = _prompts(engine.tokenizer, batch, args.prompt_tokens)
        time_spinserve(engine, prompts, 4, args.device)  # warm-up
        time_hf(hf_model, prompts, 2, args.device, pad)
        ours = [
            time_spinserve(engine, prompts, args.new_tokens, args.device)
            for _ in range(args.repeats)
        ]
        graph_tok_s = None
        if graphed is not None:
            time_spinserve(graphed, prompts, 4, args.device)
            runs = [
                time_spinserve(graphed, prompts, args.new_tokens, args.device)
                for _ in range(args.repeats)
            ]
            graph_tok_s = batch * (args.new_tokens - 1) / statistics.median(d for _, d in runs)
        hf = [
            time_hf(hf_model, prompts, args.new_tokens, args.device, pad)
            for _ in range(args.repeats)
        ]
        decode_tokens = batch * (args.new_tokens - 1)
        ours_tok_s = decode_tokens / statistics.median(d for _, d in ours)
        hf_tok_s = decode_tokens / statistics.median(d for _, d in hf)
        rows.append(
            {
                "batch": batch,
                "spinserve_decode_tok_s": ours_tok_s,
                "spinserve_ttft_s": statistics.median(f for f, _ in ours),
                "transformers_decode_tok_s": hf_tok_s,
                "transformers_ttft_s": statistics.median(f for f, _ in hf),
                "ratio_decode_tok_s": ours_tok_s / hf_tok_s,
                "spinserve_graphs_decode_tok_s": graph_tok_s,
                "ratio_graphs_vs_eager": graph_tok_s / ours_tok_s if graph_tok_s else None,
                "ratio_graphs_vs_transformers": graph_tok_s / hf_tok_s if graph_tok_s else None,
            }
        )
        engine.check_integrity()
    rec = record(
        "decode_smollm2",
        config={
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised)",
            "dtype": dtype,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "mode": "eager (spinserve_*) and decode CUDA graphs (spinserve_graphs_*)",
            "attention": "spin ops (Triton on CUDA, torch reference on CPU)",
            "peer": "transformers generate (same weights, same prompts, left-padded batch)",
        },
        metrics={"rows": rows},
    )
    path = write_record(rec, args.out, f"decode_smollm2_{args.device}")
    print(f"{'batch':>5} {'eager tok/s':>11} {'graph tok/s':>11} {'hf tok/s':>10} {'eager/hf':>8}")
    for r in rows:
        g = r["spinserve_graphs_decode_tok_s"] or float("nan")
        print(
            f"{r['batch']:>5} {r['spinserve_decode_tok_s']:>11.1f} {g:>11.1f} "
            f"{r['transformers_decode_tok_s']:>10.1f} {r['ratio_decode_tok_s']:>8.2f}"
        )
    print(f"written {path}")
    return rec


if __name__ == "__main__":
    main()
