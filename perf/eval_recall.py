"""Attention recall of sparse page selection on a real model: a diagnostic for `spinserve eval`.

For passkey prompts (eval_accuracy's prompt) the context is prefilled densely, then the question,
a space and the key's digits are teacher-forced through sparse decode (every algorithm sees the
same tokens). On every decode step and sparse layer, RecallPlanner compares the algorithm's
selection (made by the real SparsePlanner on the real keys and queries) with dense softmax
attention computed from the same pool pages:
  recall  = share of dense attention mass on the selected pages (mean over query heads);
  oracle  = the same for the best selection of as many pages per row (top pages by the group's
            dense mass): what any algorithm could keep at this page count;
  needle  = share of the attention mass on the needle's tokens that the selection keeps (summed
            over heads, so the heads that read the needle dominate; `_weighted`: layers and
            steps weighed by that mass too);
plus the key's NLL per digit (teacher-forced) and the greedy answer (correct: contains the key).
Output: perf/results/eval_recall_<time>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from spinserve.runtime.sparse import SparseAlgorithm, SparseParams
from spinserve.runtime.sparse.base import PageSelection, topk_page_mask
from spinserve.runtime.sparse.planner import SparsePlanner

from .eval_accuracy import (
    HAYSTACK_BOOKS,
    EvalConfig,
    load_text,
    make_sessions,
    page_size_for,
    passkey_prompts,
    run_configs,
)
from .eval_report import device_name, git_sha
from .eval_session import DENSE

FIELDS = ("recall", "oracle", "needle_kept", "needle_mass", "pages")


def selection_mask(sel: PageSelection, B: int, KV: int, N: int) -> torch.Tensor:
    """CSR selection -> [B, KV, N] bool."""
    mask = torch.zeros(B * KV, N, dtype=torch.bool, device=sel.page_ids.device)
    mask[sel.rows(), sel.page_ids.long()] = True
    return mask.view(B, KV, N)


def attention_recall(
    kv_pool: torch.Tensor,  # [S, 2, P, D]
    page_table: torch.Tensor,  # [B, KV, N] pool slots of every logical page
    query: torch.Tensor,  # [B, Hq, D] post-RoPE
    seq_lens: torch.Tensor,  # [B] int64, including the current token
    chosen: torch.Tensor,  # [B, KV, N] bool, the selection
    needle: torch.Tensor,  # [B, KV, N * P] bool, layout positions holding needle tokens
    sm_scale: float,
) -> torch.Tensor:  # [B, 5] float32: FIELDS
    k = kv_pool[page_table.long(), 0].float()  # [B, KV, N, P, D]
    B, KV, N, P, D = k.shape
    q = query.float().view(B, KV, -1, D)
    logits = torch.einsum("bkgd,bktd->bkgt", q, k.view(B, KV, N * P, D)) * sm_scale
    valid = torch.arange(N * P, device=k.device)[None, :] < seq_lens[:, None]  # [B, NP]
    probs = logits.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1)
    page_mass = probs.view(B, KV, -1, N, P).sum(-1)  # [B, KV, G, N]
    recall = (page_mass * chosen[:, :, None]).sum(-1)  # [B, KV, G]
    best = topk_page_mask(page_mass.sum(2), chosen.sum(-1))  # [B, KV, N]
    oracle = (page_mass * best[:, :, None]).sum(-1)
    kept = chosen.repeat_interleave(P, -1) & needle  # [B, KV, NP]
    needle_mass = (probs * needle[:, :, None]).sum(-1)  # [B, KV, G]
    needle_kept = (probs * kept[:, :, None]).sum(-1)
    return torch.stack(
        [
            recall.mean((1, 2)),
            oracle.mean((1, 2)),
            needle_kept.sum((1, 2)) / needle_mass.sum((1, 2)).clamp(min=1e-30),
            needle_mass.mean((1, 2)),
            chosen.sum(-1).float().mean(-1),
        ],
        -1,
    )


class RecallPlanner(SparsePlanner):
    """A SparsePlanner (same index, same selection) that records, per sparse-layer decode step,
    attention_recall of its selection. needles: [B] (first, end) token positions per request."""

    def __init__(
        self,
        algo: SparseAlgorithm,
        num_layers: int,
        max_requests: int,
        device: torch.device | str,
        kv_pool: torch.Tensor,
        needles: list[tuple[int, int]],
    ) -> None:
        super().__init__(algo, num_layers, max_requests, device)
        self.kv_pool = kv_pool
        self.needles = needles
        self.perms: dict[tuple[int, int], torch.Tensor] = {}  # (layer, req) -> [KV, L] layout
        self.records: list[tuple[int, torch.Tensor]] = []  # (layer, [B, 5])
        inner = algo.index_prefill

        def index_prefill(state, req_slot, keys):  # keeps the layout permutation it returns
            perm = inner(state, req_slot, keys)
            layer = next(i for i, s in enumerate(self.states) if s is state)
            if perm is not None:
                self.perms[(layer, req_slot)] = perm
            return perm

        algo.index_prefill = index_prefill

    def needle_mask(self, layer: int, B: int, width: int) -> torch.Tensor:
        """[B, KV, width] bool: layout positions holding needle tokens in this layer."""
        KV = self.algo.num_kv_heads
        pos = torch.arange(width, device=self.kv_pool.device)
        mask = torch.zeros(B, KV, width, dtype=torch.bool, device=pos.device)
        for b, (first, end) in enumerate(self.needles[:B]):
            perm = self.perms.get((layer, b))
            tok = pos[None, :].expand(KV, width).clone()
            if perm is not None:
                tok[:, : perm.shape[1]] = perm.to(pos.device)
            mask[b] = (tok >= first) & (tok < end)
        return mask

    def plan_decode(self, layer, query, keys, req_slots, seq_lens, page_table, budget_tokens=None):
        sel = self.select_logical(layer, query, keys, req_slots, seq_lens, budget_tokens)
        if not self.is_dense_layer(layer):
            B, KV, N = page_table.shape
            chosen = selection_mask(sel, B, KV, N)
            needle = self.needle_mask(layer, B, N * self.algo.page_size)
            rec = attention_recall(
                self.kv_pool, page_table, query, seq_lens, chosen, needle, self.algo.sm_scale
            )
            self.records.append((layer, rec.cpu()))
        return sel.kv_indptr, sel.to_slots(page_table), sel.kv_last_page_len


def summarize_records(records: list[tuple[int, torch.Tensor]], first_step: int) -> dict:
    """records in step order -> means over requests and steps >= first_step: overall, per layer."""
    layers = sorted({layer for layer, _ in records})
    per_step = torch.stack([r for _, r in records]).view(-1, len(layers), *records[0][1].shape)
    x = per_step[first_step:]  # [steps, layers, B, 5]
    by_layer = x.mean((0, 2))  # [layers, 5]
    out = {f: round(float(by_layer[:, i].mean()), 4) for i, f in enumerate(FIELDS)}
    mass = x[..., 3]  # the needle's attention mass weighs each (step, layer, request)
    kept = (x[..., 2] * mass).sum() / mass.sum().clamp(min=1e-30)
    out["needle_kept_weighted"] = round(float(kept), 4)
    out["layers"] = layers
    for i, f in enumerate(FIELDS[:3]):
        out[f"{f}_per_layer"] = [round(float(v), 3) for v in by_layer[:, i]]
    return out


def recall_row(planner, tok, prompts, sess, budget: int, cfg: EvalConfig) -> dict:
    """Teacher-force question + key digits (recall records, key NLL), then answer greedily."""
    keys = [tok.encode(str(p.key)) for p in prompts]
    if planner is not None:
        planner.records.clear()
    _, nlls = sess.run(budget, [p.forced + k for p, k in zip(prompts, keys)], 0)
    records = list(planner.records) if planner is not None else []
    gens, _ = sess.run(budget, [p.forced for p in prompts], cfg.answer_tokens)
    answers = [tok.decode(g) for g in gens]
    digit_nll = [sum(n[-len(k) :]) / len(k) for n, k in zip(nlls, keys)]
    row = dict(
        accuracy=sum(str(p.key) in a for p, a in zip(prompts, answers)) / len(prompts),
        key_nll=round(sum(digit_nll) / len(digit_nll), 4),
        key_nll_per_prompt=[round(x, 3) for x in digit_nll],
        answers=answers,
    )
    if records:
        answer_step = len(prompts[0].forced) - 1  # the step that feeds the space
        row |= {"all_steps": summarize_records(records, 0)}
        row |= {"answer_steps": summarize_records(records, answer_step)}
    return row


def measure(engine_dir: Path, cfg: EvalConfig, text_file: Path | None, log=print) -> list[dict]:
    """Rows per (context, algorithm, budget): accuracy, key NLL and recall summaries."""
    params = SparseParams(0, cfg.sink_tokens, cfg.window_tokens, cfg.dense_layers)
    sessions = make_sessions(engine_dir, cfg, len(cfg.depths) * cfg.trials)
    tok = sessions[16].engine.tokenizer
    hay_ids = tok.encode(load_text(HAYSTACK_BOOKS, text_file)[: 8 * max(cfg.contexts)])
    rows = []
    for context in cfg.contexts:
        prompts = passkey_prompts(tok, hay_ids, context, cfg)
        sessions[16].prefill([p.prefill for p in prompts])
        for size, s in sessions.items():
            if size != 16:
                s.copy_context_from(sessions[16])
        indexed, planner = None, None
        for algo, budget in run_configs(cfg):
            t0 = time.time()
            sess = sessions[16 if algo == DENSE else page_size_for(algo)]
            if indexed != algo:

                def factory(a, num_layers, max_requests, device, sess=sess, prompts=prompts):
                    needles = [p.needle for p in prompts]
                    return RecallPlanner(a, num_layers, max_requests, device, sess.pool, needles)

                planner, indexed = sess.index(algo, params, factory), algo
            row = dict(context=context, algorithm=algo, budget=budget)
            rows.append(row | recall_row(planner, tok, prompts, sess, budget, cfg))
            log(table_line(rows[-1]) + f"  ({time.time() - t0:.0f}s)")
    return rows


def table_line(row: dict) -> str:
    s = f"ctx {row['context']:>5} {row['algorithm']:>10}@{row['budget']:<5}"
    s += f" acc {row['accuracy']:.2f} key_nll {row['key_nll']:.3f}"
    a = row.get("answer_steps")
    if a:
        s += f" | answer steps: recall {a['recall']:.3f} oracle {a['oracle']:.3f}"
        s += f" needle_kept {a['needle_kept']:.3f} (weighted {a['needle_kept_weighted']:.3f})"
        s += f" pages {a['pages']:.0f}"
    return s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(prog="eval_recall", description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, default=None, help="engine folder (default: embedded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", type=ints, default=[2048, 4096])
    ap.add_argument("--depths", type=floats, default=[0.25, 0.5, 0.75])
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--budgets", type=ints, default=[256, 512, 1024, 2048])
    ap.add_argument("--algorithms", type=lambda s: s.split(","), default=EvalConfig().algorithms)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--window-tokens", type=int, default=128)
    ap.add_argument("--sink-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-file", type=Path, default=None, help="haystack instead of the KJV")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(1)
    names = ("contexts", "depths", "trials", "budgets", "algorithms", "dense_layers", "seed")
    cfg = EvalConfig(**{k: getattr(a, k) for k in names}, device=a.device)
    cfg.sink_tokens, cfg.window_tokens = a.sink_tokens, a.window_tokens
    cfg.agreement_tokens, cfg.ppl_tokens, cfg.ppl_contexts = 0, 0, []
    engine_dir = a.engine
    if engine_dir is None:
        from spinserve.engines.embedded import embedded_engine_dir

        engine_dir = embedded_engine_dir()
    t0 = time.time()
    rows = measure(engine_dir, cfg, a.text_file, log=lambda m: print(m, flush=True))
    now = datetime.now(timezone.utc)
    record = dict(
        bench="eval_recall",
        device=device_name(a.device),
        git_sha=git_sha(),
        date=now.isoformat(timespec="seconds"),
        config=asdict(cfg),
        metrics=dict(rows=rows, wall_s=round(time.time() - t0, 1)),
    )
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"eval_recall_{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
