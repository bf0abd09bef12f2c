"""HBM hit rate and PCIe bytes per decode step of the hierarchical KV cache, by buffer size.

The embedded SmolLM2 (or any engine folder) decodes greedily over prompts of real text (the King
James Bible through Debian's `bible`, cut at seeded character offsets) with a sparse algorithm
(Quest by default) and `cache.hierarchy`, once per buffer ratio (buffer = ratio x mandatory
pages). The engine's counters (runtime/hierarchy.py: LOOKUPS, HITS, FETCHED, OFFLOADED) are read
around every step; only decode steps look pages up, so the figures cover decode alone (the
prefill's offload is reported apart). Hit rates do not depend on the device: a CPU run gives the
same counts as a GPU run of the same selection.

    python -m spinserve.perf.bench_hit_rate --contexts 4096 8128 --buffer-ratios 0 1 2 4 8

The buffer stays at its initial ratio for the whole run (the engine never calls rebalance) and
the HBM pool is sized so that nothing shrinks it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from spinserve.control.engine import LLMEngine
from spinserve.control.hier_kv_manager import mandatory_pages
from spinserve.runtime.hierarchy import LOOKUPS
from spinserve.runtime.sampling import SamplingParams

from .common import record, write_record

BENCH = "hit_rate"


def text_prompts(tokenizer, text: str, num_tokens: int, num: int, seed: int) -> tuple[list, list]:
    """`num` prompts of exactly num_tokens tokens of `text`, each starting at a word boundary at a
    seeded character offset: (token id lists, character offsets)."""
    rng = np.random.default_rng(seed)
    span = 8 * num_tokens + 1000  # characters: > num_tokens tokens of English prose
    if len(text) < span + 1:
        raise ValueError(f"text of {len(text)} characters is too short for {num_tokens} tokens")
    prompts, offsets = [], []
    for start in sorted(rng.integers(0, len(text) - span, size=num).tolist()):
        start = text.find(" ", start) + 1
        ids = tokenizer.encode(text[start : start + span], add_special_tokens=False)
        if len(ids) < num_tokens:
            raise ValueError(f"{span} characters at {start} gave only {len(ids)} tokens")
        prompts.append(ids[:num_tokens])
        offsets.append(start)
    return prompts, offsets


def _counts(eng: LLMEngine) -> np.ndarray:
    """[5] int64 cumulative counters: LOOKUPS, HITS, FETCHED, SHORT, OFFLOADED."""
    return np.asarray(eng.kv.stats.tolist(), dtype=np.int64)


def measure(
    engine_dir: Path, prompts: list[list[int]], buffer_ratio: float, max_tokens: int, settings: dict
) -> dict:
    """One engine, all prompts decoded together; counters around every step. settings: the
    "section.field" overrides (sparse algorithm, budget, ...); the hierarchy, the buffer ratio
    and pool sizes are set here."""
    longest = max(len(p) for p in prompts) + max_tokens
    pool_tokens = len(prompts) * (longest + 64)  # every request's prefill resident at once
    eng = LLMEngine.from_engine_dir(
        engine_dir,
        **{
            **settings,
            "cache.hierarchy": True,
            "cache.buffer_ratio": buffer_ratio,
            "cache.kv_cache_tokens": pool_tokens,
            "cache.host_pool_tokens": pool_tokens,
        },
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    for rid, p in zip(tokens, prompts):
        eng.add_request(rid, p, params)
    per_step = []  # per decode step: [decode rows, LOOKUPS..OFFLOADED deltas]
    t0 = time.perf_counter()
    while eng.has_unfinished():
        before = _counts(eng)
        decoding = sum(len(t) > 0 for t in tokens.values())  # a first token comes from prefill
        outs = eng.step()
        delta = _counts(eng) - before
        for out in outs:
            tokens[out.request_id] += out.new_token_ids
        if delta[LOOKUPS] > 0:  # the prefill's offload (offload_pages) is not counted
            per_step.append([decoding, *delta.tolist()])
    seconds = time.perf_counter() - t0
    slot_bytes = eng.kv.hbm_pool[0].numel() * eng.kv.hbm_pool.element_size()
    eng.check_integrity()
    return _summary(np.array(per_step, np.int64).reshape(-1, 6), slot_bytes) | {
        "buffer_ratio": buffer_ratio,
        "mandatory_pages": mandatory_pages(
            eng.runner.sparse_params, eng.settings.sparse.budget_tokens, eng.page_size
        ),
        "seconds": round(seconds, 2),
        "token_ids": list(tokens.values()),
    }


def _summary(steps: np.ndarray, slot_bytes: int) -> dict:
    """steps: [decode steps, 6] int64 (decode rows, LOOKUPS, HITS, FETCHED, SHORT, OFFLOADED)."""
    rows, lookups, hits, fetched, short, offloaded = (steps[:, i] for i in range(6))
    n = max(len(steps), 1)
    total = int(lookups.sum())
    return {
        "decode_steps": len(steps),
        "request_steps": int(rows.sum()),  # decoded tokens (a step decodes every running request)
        "page_lookups": total,
        "page_hits": int(hits.sum()),
        "hit_rate": int(hits.sum()) / total if total else 1.0,
        "pages_fetched": int(fetched.sum()),
        "pages_short": int(short.sum()),  # misses without a victim slot: must be 0
        "page_bytes": slot_bytes,  # K and V of one page of one (layer, kv_head)
        "pcie_bytes_fetched": int(fetched.sum()) * slot_bytes,
        "lookups_per_step": float(lookups.sum() / n),
        "pages_fetched_per_step": float(fetched.sum() / n),
        "pages_fetched_per_step_max": int(fetched.max(initial=0)),
        "pcie_bytes_fetched_per_step": float(fetched.sum() * slot_bytes / n),
        "pcie_bytes_fetched_per_request_step": float(
            fetched.sum() * slot_bytes / max(int(rows.sum()), 1)
        ),
        # pages completed while decoding, written to the host pool
        "pcie_bytes_offloaded_per_step": float(offloaded.sum() * slot_bytes / n),
        "pages_fetched_by_step": fetched.tolist(),
        "hit_rate_by_step": [
            round(float(h / lk), 4) if lk else 1.0 for h, lk in zip(hits, lookups)
        ],
    }


def run_context(engine_dir: Path, text: str, context: int, args, on_run) -> dict:
    """Every buffer ratio over the same prompts of `context` tokens; on_run(result so far) after
    each ratio. Greedy tokens are compared across ratios (the selection must not depend on the
    buffer)."""
    tok = LLMEngine.from_engine_dir(engine_dir, **_settings(args)).tokenizer
    prompts, offsets = text_prompts(tok, text, context, args.num_requests, args.seed + context)
    out = {"context": context, "prompt_tokens": [len(p) for p in prompts]}
    out |= {"text_char_offsets": offsets, "same_greedy_tokens_across_ratios": True, "runs": []}
    first = None
    for ratio in args.buffer_ratios:
        r = measure(engine_dir, prompts, ratio, args.max_tokens, _settings(args))
        print(
            f"context {context} buffer {ratio}x: hit rate {r['hit_rate']:.4f}, "
            f"{r['pages_fetched_per_step']:.1f} pages = "
            f"{r['pcie_bytes_fetched_per_step'] / 2**20:.2f} MiB fetched per step over "
            f"{r['decode_steps']} steps ({r['seconds']} s)",
            flush=True,
        )
        first = first or r.pop("token_ids")
        out["same_greedy_tokens_across_ratios"] &= r.pop("token_ids", first) == first
        out["runs"].append(r)
        on_run(out)
    return out


def _settings(args) -> dict:
    return {
        "engine.device": "cpu",
        "engine.dtype": args.dtype,
        "engine.cpu_threads": args.threads,
        "engine.max_running_requests": max(args.num_requests, 1),
        "sparse.algorithm": args.algorithm,
        "sparse.budget_tokens": args.budget,
        "sparse.sink_tokens": args.sinks,
        "sparse.window_tokens": args.window,
        "sparse.dense_layers": args.dense_layers,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, help="default: the embedded SmolLM2")
    p.add_argument("--text-file", type=Path, help="default: the KJV through `bible`")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--buffer-ratios", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--num-requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--algorithm", default="quest")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default="hit_rate_smollm2_cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    from spinserve.engines.embedded import embedded_engine_dir

    from .workloads import load_text

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    engine_dir = args.engine_dir or embedded_engine_dir(progress=False)
    text = load_text(args.text_file)
    config = {
        "engine": str(engine_dir.name),
        "text": str(args.text_file) if args.text_file else "KJV (Debian bible-kjv-text)",
        **{k: v for k, v in vars(args).items() if k not in ("out", "name", "engine_dir")},
        "text_file": str(args.text_file) if args.text_file else None,
        "buffer": "buffer_ratio x mandatory pages per sparse (layer, kv_head) row, fixed",
        "counted": "decode steps only; lookups over sparse layers (>= dense_layers), tails incl.",
    }
    contexts: list[dict] = []

    def save(current: dict) -> None:  # after every run: a cut run keeps what it measured
        done = [(c["context"], r["buffer_ratio"]) for c in contexts + [current] for r in c["runs"]]
        rec = record(BENCH, config | {"runs_done": done}, {"contexts": contexts + [current]})
        print(f"written {write_record(rec, args.out, args.name)}", flush=True)

    for context in args.contexts:
        contexts.append(run_context(engine_dir, text, context, args, save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
