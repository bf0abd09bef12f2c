"""Accuracy harness (`spinserve eval`): every sparse algorithm against dense on a real model.

Tasks, on SmolLM2-135M-Instruct (the embedded engine) with public-domain haystack text (the King
James Bible through Debian's `bible` reader, package bible-kjv, or any --text-file):
  * passkey: a 5-digit key hidden at depth d of a context of C tokens; the context is prefilled
    densely, the question is fed through sparse decode steps, the answer is generated greedily
    and counts when it contains the key. Grid: contexts x depths x budgets x algorithms.
  * greedy agreement: on the passkey prompts of the `agreement_depths`, `agreement_tokens`
    greedy tokens against dense's: match rate (position-wise) and first divergence.
  * perplexity: held-out text (other books), prefill C - T tokens densely, then T tokens
    teacher-forced through sparse decode.
Output: perf/results/eval_accuracy_<time>.json (+ .png). The runtime page size is 16, except
for algorithms that need another (shadowkv: 8), which get the same context re-paged.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spinserve.runtime.sparse import SparseParams, get_algorithm

from .eval_report import merge_results, summarize, write_results
from .eval_session import DENSE, EvalSession

HAYSTACK_BOOKS = "Ge1:1-De34:12"  # Genesis..Deuteronomy
HELD_OUT_BOOKS = "Lu1:1-Ac28:31"  # Luke, Acts
INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class EvalConfig:
    contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    algorithms: list[str] = field(
        default_factory=lambda: ["streaming", "quest", "shadowkv", "retroinfer"]
    )
    answer_tokens: int = 8
    agreement_depths: list[float] = field(default_factory=lambda: [0.5])
    agreement_tokens: int = 64
    ppl_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    ppl_tokens: int = 128
    sink_tokens: int = 16
    window_tokens: int = 128
    dense_layers: int = 2
    chat: bool = False  # passkey prompt in the chat template
    seed: int = 0
    device: str = "cpu"


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
):
    """-> (prefill ids, question ids); prefill + question = context - reserve tokens. chat: wrap
    in the model's chat template (the answer prefix then opens the assistant turn)."""
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
    hay = hay_ids[:n_hay]
    cut = int(round(depth * n_hay))
    return intro + hay[:cut] + needle + hay[cut:], question


def run_configs(sessions, cfg: EvalConfig):
    """Yield (algorithm, budget, session) for dense and every algorithm x budget."""
    yield DENSE, 0, sessions[16]
    for algo in cfg.algorithms:
        for budget in cfg.budgets:
            yield algo, budget, sessions[page_size_for(algo)]


def prepare(sessions, prefill_ids: list[int]) -> None:
    sessions[16].prefill(prefill_ids)
    for p, s in sessions.items():
        if p != 16:
            s.copy_context_from(sessions[16])


def eval_passkey(sessions, tok, hay_ids, cfg: EvalConfig, params: SparseParams, log, save):
    rows, agreement = [], []
    rng = random.Random(cfg.seed)
    for context in cfg.contexts:
        for depth in cfg.depths:
            t0 = time.time()
            key = rng.randrange(10000, 100000)
            cell, agree = passkey_cell(sessions, tok, hay_ids, cfg, params, context, depth, key)
            rows += cell
            agreement += agree
            ok = " ".join(f"{r['algorithm']}@{r['budget']}={int(r['correct'])}" for r in cell)
            log(f"passkey ctx={context} depth={depth:.1f} ({time.time() - t0:.0f}s): {ok}")
            save(dict(passkey=rows, agreement=agreement, perplexity=[]))
    return rows, agreement


def passkey_cell(sessions, tok, hay_ids, cfg, params, context, depth, key):
    """One prefill, then every (algorithm, budget) on it."""
    agree = depth in cfg.agreement_depths
    n_gen = max(cfg.answer_tokens, cfg.agreement_tokens if agree else 0)
    prefill, question = passkey_prompt(tok, hay_ids, context, depth, key, n_gen, cfg.chat)
    prepare(sessions, prefill)
    rows, agreement, dense_out = [], [], None
    for algo, budget, sess in run_configs(sessions, cfg):
        out, _ = sess.run(algo, budget, params, question, n_gen)
        answer = tok.decode(out[: cfg.answer_tokens])
        rows.append(
            dict(
                context=context,
                depth=depth,
                algorithm=algo,
                budget=budget,
                key=key,
                answer=answer,
                correct=str(key) in answer,
            )
        )
        if algo == DENSE:
            dense_out = out
        elif agree:
            agreement.append(agreement_row(context, depth, algo, budget, out, dense_out))
    return rows, agreement


def agreement_row(context, depth, algo, budget, out, ref):
    n = min(len(out), len(ref))
    same = [a == b for a, b in zip(out[:n], ref[:n])]
    first = same.index(False) if False in same else n
    return dict(
        context=context,
        depth=depth,
        algorithm=algo,
        budget=budget,
        tokens=n,
        match_rate=sum(same) / n,
        first_divergence=first,
    )


def eval_perplexity(sessions, held_ids, cfg: EvalConfig, params: SparseParams, log):
    rows = []
    for context in cfg.ppl_contexts:
        ids = held_ids[:context]
        prepare(sessions, ids[: context - cfg.ppl_tokens - 1])
        forced = ids[context - cfg.ppl_tokens - 1 :]
        for algo, budget, sess in run_configs(sessions, cfg):
            _, nlls = sess.run(algo, budget, params, forced, 0)
            ppl = math.exp(sum(nlls) / len(nlls))
            rows.append(dict(context=context, algorithm=algo, budget=budget, ppl=ppl))
        log(
            f"ppl ctx={context}: "
            + ", ".join(
                f"{r['algorithm']}@{r['budget']}={r['ppl']:.2f}"
                for r in rows
                if r["context"] == context
            )
        )
    return rows


def evaluate(
    cfg: EvalConfig, engine_dir: Path, text_files=(None, None), log=print, save=lambda m: None
) -> dict:
    """text_files: (haystack, held-out) plain-text files, None = the KJV books through `bible`."""
    params = SparseParams(
        0, cfg.sink_tokens, cfg.window_tokens, cfg.dense_layers
    )  # budget: per run
    page_sizes = {16} | {page_size_for(a) for a in cfg.algorithms}
    max_tokens = max(cfg.contexts + cfg.ppl_contexts) + 8
    sessions = {p: EvalSession(engine_dir, p, max_tokens, cfg.device) for p in page_sizes}
    tok = sessions[16].engine.tokenizer
    t0 = time.time()
    need = 2 * max(cfg.contexts + cfg.ppl_contexts)  # tokens: ~4 characters each
    hay_ids = tok.encode(load_text(HAYSTACK_BOOKS, text_files[0])[: 8 * need])
    held_ids = tok.encode(load_text(HELD_OUT_BOOKS, text_files[1])[: 8 * need])
    passkey, agreement = eval_passkey(sessions, tok, hay_ids, cfg, params, log, save)
    ppl = eval_perplexity(sessions, held_ids, cfg, params, log) if cfg.ppl_tokens else []
    return dict(
        passkey=passkey, agreement=agreement, perplexity=ppl, wall_s=round(time.time() - t0, 1)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = EvalConfig()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(prog="spinserve eval", description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, default=None, help="engine folder (default: embedded)")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--contexts", type=ints, default=d.contexts)
    ap.add_argument("--depths", type=floats, default=d.depths)
    ap.add_argument("--budgets", type=ints, default=d.budgets)
    ap.add_argument("--algorithms", type=lambda s: s.split(","), default=d.algorithms)
    ap.add_argument("--agreement-depths", type=floats, default=d.agreement_depths)
    ap.add_argument("--agreement-tokens", type=int, default=d.agreement_tokens)
    ap.add_argument("--ppl-contexts", type=ints, default=d.ppl_contexts)
    ap.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens)
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
    cfg = EvalConfig(
        contexts=a.contexts,
        depths=a.depths,
        budgets=a.budgets,
        algorithms=a.algorithms,
        agreement_depths=a.agreement_depths,
        agreement_tokens=a.agreement_tokens,
        ppl_contexts=a.ppl_contexts,
        ppl_tokens=a.ppl_tokens,
        sink_tokens=a.sink_tokens,
        window_tokens=a.window_tokens,
        seed=a.seed,
        device=a.device,
    )
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
