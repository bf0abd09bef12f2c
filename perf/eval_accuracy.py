"""Accuracy harness (`spinserve eval`): every sparse algorithm against dense on a real model.

Tasks, on SmolLM2-135M-Instruct (the embedded engine) with public-domain haystack text (the King
James Bible through Debian's `bible` reader, package bible-kjv, or any --text-file):
  * passkey: a 5-digit key hidden at depth d of a context of C tokens, `trials` keys per
    (C, d); the context is prefilled densely, the question is fed through sparse decode steps,
    the answer is generated greedily and counts when it contains the key. The question ends
    with "The pass key is " whose trailing space is its own token, as in the needle
    ("is", " ", digits): the model's first answer token is then a digit, not a coin flip between
    " a" and the bare space (SmolLM2 puts ~0.2 on the space, so ending at "is" measured that
    flip rather than retrieval). Grid: contexts x depths x trials x budgets x algorithms.
  * greedy agreement: on every passkey prompt, `agreement_tokens` greedy tokens against dense's:
    match rate (position-wise) and first divergence.
  * perplexity: `ppl_windows` held-out windows (other books) of C tokens: prefill C - T - 1
    tokens densely, then T + 1 tokens teacher-forced through sparse decode (NLL of T tokens).
Batching: per context, every prompt of the grid (passkey and perplexity windows) is prefilled
once into one EvalSession; each (algorithm, budget) then decodes the whole batch together
(eval_session.py). Output: perf/results/eval_accuracy_<time>.json (+ .png). The runtime page
size is 16, except for algorithms that need another (shadowkv: 8), which get the same context
re-paged.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spinserve.runtime.sparse import SparseParams, get_algorithm

from .eval_report import format_table, merge_results, summarize, write_results
from .eval_session import DENSE, EvalSession

HAYSTACK_BOOKS = "Ge1:1-De34:12"  # Genesis..Deuteronomy
HELD_OUT_BOOKS = "Lu1:1-Ac28:31"  # Luke, Acts
INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is "


@dataclass
class EvalConfig:
    contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    trials: int = 3  # keys per (context, depth)
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    algorithms: list[str] = field(
        default_factory=lambda: ["streaming", "quest", "shadowkv", "retroinfer"]
    )
    answer_tokens: int = 8
    agreement_tokens: int = 64  # greedy tokens generated per passkey prompt (>= answer_tokens)
    ppl_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    ppl_tokens: int = 64
    ppl_windows: int = 3  # held-out windows per context
    sink_tokens: int = 16
    window_tokens: int = 128
    dense_layers: int = 2
    chat: bool = False  # passkey prompt in the chat template
    seed: int = 0
    device: str = "cpu"

    @property
    def generate_tokens(self) -> int:
        return max(self.answer_tokens, self.agreement_tokens)


@dataclass
class Prompt:
    """One request of a context's batch: a passkey prompt or a perplexity window."""

    context: int
    prefill: list[int]
    forced: list[int]  # teacher-forced decode tokens (question; held-out continuation)
    depth: float | None = None  # passkey only
    trial: int = 0
    key: int | None = None
    needle: tuple[int, int] = (0, 0)  # [first, end) token positions of the needle
    generate: int = 0  # greedy tokens after the forced ones


def load_text(books: str, text_file: Path | None) -> str:
    """Plain prose: the KJV books through `bible` (verse numbers and headings stripped)."""
    if text_file is not None:
        return Path(text_file).read_text()
    try:
        raw = subprocess.run(["bible", books], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"cannot read the KJV haystack ({e}): `apt-get install bible-kjv` or pass --text-file"
        ) from None
    lines = [ln for ln in raw.splitlines() if not re.fullmatch(r"\S+ \d+", ln.strip())]
    text = " ".join(re.sub(r"^\s*\d+ ", "", ln).strip() for ln in lines)
    return re.sub(r"\s+", " ", text)


def page_size_for(algorithm: str) -> int:
    return get_algorithm(algorithm).required_page_size or 16


def passkey_prompt(
    tok, hay_ids: list[int], context: int, depth: float, key: int, reserve: int, chat: bool
) -> tuple[list[int], list[int], tuple[int, int]]:
    """-> (prefill ids, question ids, needle [first, end) positions); prefill + question =
    context - reserve tokens. chat: wrap in the model's chat template (the answer prefix then
    opens the assistant turn)."""
    head, tail = "", ""
    if chat:
        marker = "\x00MARK\x00"
        text = tok.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
        head, tail = text.split(marker)
    intro = tok.encode(head + INTRO)
    needle = tok.encode(NEEDLE.format(key=key))
    question = QUESTION.replace(" The pass key is", tail + "The pass key is") if chat else QUESTION
    question = tok.encode(question)
    n_hay = context - reserve - len(intro) - len(needle) - len(question)
    if n_hay < 0 or len(hay_ids) < n_hay:
        raise ValueError(f"context {context}: {len(hay_ids)} haystack tokens, {n_hay} needed")
    hay = hay_ids[:n_hay]
    cut = int(round(depth * n_hay))
    first = len(intro) + cut
    return intro + hay[:cut] + needle + hay[cut:], question, (first, first + len(needle))


def passkey_prompts(tok, hay_ids: list[int], context: int, cfg: EvalConfig) -> list[Prompt]:
    """Every (depth, trial) of one context; keys drawn from Random((seed, context))."""
    rng = random.Random(cfg.seed * 1_000_003 + context)
    out = []
    for depth in cfg.depths:
        for trial in range(cfg.trials):
            key = rng.randrange(10000, 100000)
            prefill, question, needle = passkey_prompt(
                tok, hay_ids, context, depth, key, cfg.generate_tokens, cfg.chat
            )
            p = Prompt(context, prefill, question, depth, trial, key, needle, cfg.generate_tokens)
            out.append(p)
    return out


def ppl_prompts(held_ids: list[int], context: int, cfg: EvalConfig) -> list[Prompt]:
    """ppl_windows consecutive windows of `context` held-out tokens."""
    T, out = cfg.ppl_tokens, []
    for w in range(cfg.ppl_windows):
        ids = held_ids[w * context : (w + 1) * context]
        if len(ids) < context:
            raise ValueError(f"held-out text too short for {cfg.ppl_windows} x {context} tokens")
        out.append(Prompt(context, ids[: context - T - 1], ids[context - T - 1 :]))
    return out


def run_configs(cfg: EvalConfig):
    """(algorithm, budget) pairs: dense first (budget 0), then every algorithm x budget."""
    yield DENSE, 0
    for algo in cfg.algorithms:
        for budget in cfg.budgets:
            yield algo, budget


def _clock(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def decode_all(sessions, prompts: list[Prompt], cfg: EvalConfig, params: SparseParams, timing):
    """Prefill the batch once, then per (algorithm, budget) one batched decode pass.
    Yields (algorithm, budget, generated ids per prompt, NLLs per prompt); appends the time of
    every phase to `timing`."""
    t0 = _clock(cfg.device)
    sessions[16].prefill([p.prefill for p in prompts])
    for size, s in sessions.items():
        if size != 16:
            s.copy_context_from(sessions[16])
    context, batch = prompts[0].context, len(prompts)
    timing.append(dict(context=context, phase="prefill", batch=batch, s=_clock(cfg.device) - t0))
    forced, generate = [p.forced for p in prompts], [p.generate for p in prompts]
    steps = max(len(f) + g - 1 for f, g in zip(forced, generate))
    indexed = None
    for algo, budget in run_configs(cfg):
        sess = sessions[16 if algo == DENSE else page_size_for(algo)]
        t0 = _clock(cfg.device)
        if indexed != algo:
            sess.index(algo, params)
            indexed = algo
            t1 = _clock(cfg.device)
            timing.append(dict(context=context, phase="index", algorithm=algo, s=t1 - t0))
            t0 = t1
        gens, nlls = sess.run(budget, forced, generate)
        cell = dict(context=context, phase="decode", algorithm=algo, budget=budget, batch=batch)
        timing.append(cell | dict(steps=steps, s=_clock(cfg.device) - t0))
        yield algo, budget, gens, nlls


def context_rows(sessions, tok, prompts: list[Prompt], cfg: EvalConfig, params) -> dict:
    """Passkey, agreement and perplexity rows of one context's batch."""
    rows = dict(passkey=[], agreement=[], perplexity=[], timing=[])
    dense_out = {}
    for algo, budget, gens, nlls in decode_all(sessions, prompts, cfg, params, rows["timing"]):
        ppl_nll = []
        for i, (p, out, nll) in enumerate(zip(prompts, gens, nlls)):
            if p.key is None:
                ppl_nll += nll
                continue
            answer = tok.decode(out[: cfg.answer_tokens])
            cell = dict(context=p.context, depth=p.depth, trial=p.trial, key=p.key)
            cell |= dict(algorithm=algo, budget=budget, answer=answer)
            rows["passkey"].append(cell | dict(correct=str(p.key) in answer))
            if algo == DENSE:
                dense_out[i] = out
            elif cfg.agreement_tokens:
                rows["agreement"].append(
                    agreement_row(cell, out[: cfg.agreement_tokens], dense_out[i])
                )
        if ppl_nll:
            ppl = math.exp(sum(ppl_nll) / len(ppl_nll))
            rows["perplexity"].append(
                dict(context=prompts[0].context, algorithm=algo, budget=budget, ppl=ppl)
            )
    return rows


def agreement_row(cell: dict, out: list[int], ref: list[int]) -> dict:
    n = min(len(out), len(ref))
    same = [a == b for a, b in zip(out[:n], ref[:n])]
    first = same.index(False) if False in same else n
    keep = ("context", "depth", "trial", "algorithm", "budget")
    return {k: cell[k] for k in keep} | dict(
        tokens=n, match_rate=sum(same) / max(n, 1), first_divergence=first
    )


def make_sessions(engine_dir, cfg: EvalConfig, max_requests: int) -> dict[int, EvalSession]:
    """One session per page size, sized for the largest context's batch."""
    page_sizes = {16} | {page_size_for(a) for a in cfg.algorithms}
    steps = max(cfg.ppl_tokens, cfg.generate_tokens + 64)  # 64: > the question's tokens
    max_tokens = max(cfg.contexts + cfg.ppl_contexts) + steps + 16
    return {p: EvalSession(engine_dir, p, max_requests, max_tokens, cfg.device) for p in page_sizes}


def evaluate(
    cfg: EvalConfig, engine_dir: Path, text_files=(None, None), log=print, save=lambda m: None
) -> dict:
    """text_files: (haystack, held-out) plain-text files, None = the KJV books through `bible`."""
    params = SparseParams(0, cfg.sink_tokens, cfg.window_tokens, cfg.dense_layers)
    ppl_only = [c for c in (cfg.ppl_contexts if cfg.ppl_tokens else []) if c not in cfg.contexts]
    contexts = list(dict.fromkeys(cfg.contexts + ppl_only))  # in the given order
    per_context = len(cfg.depths) * cfg.trials + cfg.ppl_windows
    sessions = make_sessions(engine_dir, cfg, per_context)
    tok = sessions[16].engine.tokenizer
    t0 = time.time()
    chars = 8 * max(contexts) * max(2, cfg.ppl_windows)  # ~4 characters per token, doubled
    hay_ids = tok.encode(load_text(HAYSTACK_BOOKS, text_files[0])[:chars])
    held_ids = tok.encode(load_text(HELD_OUT_BOOKS, text_files[1])[:chars])
    metrics = dict(passkey=[], agreement=[], perplexity=[], timing=[], context_s={})
    for context in contexts:
        t1 = time.time()
        prompts = passkey_prompts(tok, hay_ids, context, cfg) if context in cfg.contexts else []
        if cfg.ppl_tokens and context in cfg.ppl_contexts:
            prompts += ppl_prompts(held_ids, context, cfg)
        log(f"context {context}: {len(prompts)} prompts")
        for k, v in context_rows(sessions, tok, prompts, cfg, params).items():
            metrics[k] += v
        metrics["context_s"][context] = round(time.time() - t1, 1)
        log(f"context {context} done in {time.time() - t1:.0f}s: {brief(metrics, context)}")
        save(metrics)
    metrics["wall_s"] = round(time.time() - t0, 1)
    return metrics


def brief(metrics: dict, context: int) -> str:
    """'algo@budget=accuracy' of one context's passkey rows."""
    acc: dict = {}
    for r in metrics["passkey"]:
        if r["context"] == context:
            acc.setdefault(f"{r['algorithm']}@{r['budget']}", []).append(r["correct"])
    return " ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in acc.items())


def target_line(summary: dict, context: int = 8192, budget: int = 1024) -> str:
    """The issue's target: quest and shadowkv keep >= 90% of dense's accuracy at 8K / 1024."""
    ret = summary["passkey_retention_vs_dense"]
    parts = []
    for a in ("quest", "shadowkv"):
        v = (ret.get(a, {}).get(context) or {}).get(budget)
        parts.append(f"{a} {v:.2f}" if v is not None else f"{a} -")
    return f"retention vs dense at {context}/{budget} (target >= 0.90): " + ", ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = EvalConfig()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(prog="spinserve eval", description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, default=None, help="engine folder (default: embedded)")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--contexts", type=ints, default=d.contexts)
    ap.add_argument("--depths", type=floats, default=d.depths)
    ap.add_argument("--trials", type=int, default=d.trials, help="keys per (context, depth)")
    ap.add_argument("--budgets", type=ints, default=d.budgets)
    ap.add_argument("--algorithms", type=lambda s: s.split(","), default=d.algorithms)
    ap.add_argument("--answer-tokens", type=int, default=d.answer_tokens)
    ap.add_argument("--agreement-tokens", type=int, default=d.agreement_tokens)
    ap.add_argument("--ppl-contexts", type=ints, default=d.ppl_contexts)
    ap.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens)
    ap.add_argument("--ppl-windows", type=int, default=d.ppl_windows)
    ap.add_argument("--sink-tokens", type=int, default=d.sink_tokens)
    ap.add_argument("--window-tokens", type=int, default=d.window_tokens)
    ap.add_argument("--dense-layers", type=int, default=d.dense_layers)
    ap.add_argument("--chat", action="store_true", help="passkey prompt in the chat template")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--text-file", type=Path, default=None, help="haystack instead of the KJV")
    ap.add_argument("--held-out-file", type=Path, default=None, help="perplexity text file")
    ap.add_argument("--dump-text", type=Path, default=None, help="write the KJV texts and exit")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine result files of partial grids into one record (+ plot)",
    )
    ap.add_argument("--measured-on", default=None, help="--merge: device of partial records")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.dump_text is not None:  # for machines without the `bible` reader
        a.dump_text.mkdir(parents=True, exist_ok=True)
        (a.dump_text / "haystack.txt").write_text(load_text(HAYSTACK_BOOKS, None))
        (a.dump_text / "held_out.txt").write_text(load_text(HELD_OUT_BOOKS, None))
        return 0
    if a.merge:
        print(f"wrote {merge_results(a.merge, a.out, a.measured_on)}")
        return 0
    for name in a.algorithms:
        get_algorithm(name)  # unknown name: ValueError listing the known ones
    cfg = EvalConfig(**{f.name: getattr(a, f.name) for f in fields(EvalConfig)})
    engine_dir = a.engine
    if engine_dir is None:
        from spinserve.engines.embedded import embedded_engine_dir

        engine_dir = embedded_engine_dir()
    texts = (a.text_file, a.held_out_file)
    partial = a.out / "eval_accuracy_partial.json"
    a.out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(
        cfg,
        engine_dir,
        texts,
        log=lambda m: print(m, flush=True),
        save=lambda m: partial.write_text(json.dumps(dict(config=asdict(cfg), metrics=m))),
    )
    metrics["summary"] = summarize(metrics, cfg.algorithms)
    json_path = write_results(a.out, asdict(cfg), metrics, engine_dir)
    print(f"wrote {json_path}")
    print(format_table(metrics["summary"], cfg.algorithms, cfg.budgets))
    print(target_line(metrics["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
