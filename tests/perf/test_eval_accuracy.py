"""perf/eval_accuracy.py: the passkey prompt's layout (exact length, needle span, the question
ending in the bare-space token that precedes the needle's digits) and a tiny end-to-end grid on
a tiny engine (CPU, seconds): row counts, and every algorithm at a budget covering the context
reproducing dense (answers, agreement 1.0, perplexity)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_checkpoint, make_tokenizer

from spinserve.engines.build import build_engine
from spinserve.perf.eval_accuracy import (
    INTRO,
    NEEDLE,
    QUESTION,
    EvalConfig,
    evaluate,
    main,
    passkey_prompt,
)
from spinserve.perf.eval_report import summarize

ALGORITHMS = ["quest", "shadowkv"]  # page sizes 16 and 8; all four: test_eval_session.py


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(10**5)}" for _ in range(n))


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_layout(depth):
    tok, rng = make_tokenizer(), random.Random()
    hay = tok.encode(words(rng, 400))
    key, context, reserve = rng.randrange(10000, 100000), rng.randint(300, 500), 12
    prefill, question, (first, end) = passkey_prompt(tok, hay, context, depth, key, reserve, False)
    assert len(prefill) + len(question) == context - reserve
    assert tok.decode(prefill[first:end]) == NEEDLE.format(key=key)
    assert tok.decode(question) == QUESTION and QUESTION.endswith("is ")
    # the question's last token is the needle's token between "is" and the digits
    needle_ids = tok.encode(NEEDLE.format(key=key))
    after_is = needle_ids[needle_ids.index(tok.encode(str(key))[0]) - 1]
    assert question[-1] == after_is == tok.encode(" ")[0]
    intro = len(tok.encode(INTRO))
    n_hay = context - reserve - len(question) - (end - first) - intro
    assert first == intro + int(round(depth * n_hay))
    with pytest.raises(ValueError, match="haystack"):
        passkey_prompt(tok, hay[:10], context, depth, key, reserve, False)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-accuracy")
    ckpt = make_checkpoint("llama", d / "ckpt", seed=random.randrange(1 << 16))
    return build_engine(ckpt, d / "engine", page_size=16, progress=False)


def test_tiny_grid_full_budget_reproduces_dense(engine_dir, tmp_path):
    torch.set_num_threads(1)
    rng = random.Random()
    texts = (tmp_path / "hay.txt", tmp_path / "held.txt")
    for t in texts:
        t.write_text(words(rng, 600))
    cfg = EvalConfig(
        contexts=[320],
        depths=[0.0, 0.5],
        trials=2,
        budgets=[32, 1024],
        algorithms=ALGORITHMS,
        answer_tokens=8,
        agreement_tokens=10,
        ppl_contexts=[320],
        ppl_tokens=12,
        ppl_windows=2,
        window_tokens=16,
        dense_layers=0,
        seed=rng.randrange(100),
    )
    saved = []
    m = evaluate(cfg, engine_dir, texts, log=lambda s: None, save=saved.append)
    configs = 1 + len(ALGORITHMS) * len(cfg.budgets)
    assert len(m["passkey"]) == 2 * 2 * configs and len(saved) == 1
    assert len(m["agreement"]) == 2 * 2 * (configs - 1)
    assert len(m["perplexity"]) == configs and set(m["context_s"]) == {320}
    dense = {(r["context"], r["depth"], r["trial"]): r for r in m["passkey"] if r["budget"] == 0}
    assert len({r["key"] for r in dense.values()}) == 4  # a key per (context, depth, trial)
    for r in m["passkey"]:
        assert r["correct"] == (str(r["key"]) in r["answer"])
        if r["budget"] == 1024:  # covers every context: exactly dense
            assert r["answer"] == dense[(r["context"], r["depth"], r["trial"])]["answer"]
    full = [r for r in m["agreement"] if r["budget"] == 1024]
    assert full and all(r["match_rate"] == 1.0 and r["first_divergence"] == 10 for r in full)
    ppl = {(r["algorithm"], r["budget"]): r["ppl"] for r in m["perplexity"]}
    for a in ALGORITHMS:
        assert ppl[(a, 1024)] == pytest.approx(ppl[("dense", 0)], rel=1e-4)
    s = summarize(m, ALGORITHMS)
    assert s["passkey_prompts"]["quest"][320][32] == 4
    decode = [t for t in m["timing"] if t["phase"] == "decode"]
    assert len(decode) == configs and all(t["batch"] == 6 and t["s"] > 0 for t in decode)
    steps = max(len(make_tokenizer().encode(QUESTION)) + 10 - 1, 12)  # passkey / ppl windows
    assert {t["steps"] for t in decode} == {steps}


def test_cli_writes_record_and_table(engine_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    rng = random.Random()
    texts = (tmp_path / "hay.txt", tmp_path / "held.txt")
    for t in texts:
        t.write_text(words(rng, 400))
    argv = ["--engine", str(engine_dir), "--contexts", "320", "--depths", "0.5", "--trials", "1"]
    argv += ["--budgets", "32", "--algorithms", "quest", "--ppl-contexts", "320"]
    argv += ["--ppl-tokens", "8", "--ppl-windows", "1", "--agreement-tokens", "8"]
    argv += ["--window-tokens", "16", "--dense-layers", "0", "--out", str(tmp_path / "out")]
    argv += ["--text-file", str(texts[0]), "--held-out-file", str(texts[1])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads(next((tmp_path / "out").glob("eval_accuracy_2*.json")).read_text())
    assert record["config"]["trials"] == 1 and len(record["metrics"]["passkey"]) == 2
    assert "passkey ctx   320" in out and "ppl ctx   320" in out and "target" in out
