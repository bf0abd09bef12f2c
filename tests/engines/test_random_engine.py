"""Random-weight engines (`spinserve build --random PRESET`): no weight file, weights made at load,
deterministic in the seed, the same model as transformers' Llama with those weights."""

from __future__ import annotations

import json
import random

import pytest
import torch

from spinserve.configs.model import Architecture
from spinserve.control.cli import main as cli_main
from spinserve.engines.build import expected_weight_names
from spinserve.engines.errors import EngineError
from spinserve.engines.loader import load_tokenizer, load_weights
from spinserve.engines.manifest import WEIGHTS, read_manifest
from spinserve.engines.random_engine import (
    INIT_STD,
    PRESETS,
    build_random_engine,
    weight_shapes,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf_state_dict(cfg, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine tensors -> transformers LlamaForCausalLM names (q/k/v and gate/up split)."""
    q, kv = cfg.q_size, cfg.kv_size
    sd = {
        "model.embed_tokens.weight": w["embed_tokens.weight"],
        "model.norm.weight": w["norm.weight"],
        "lm_head.weight": w["lm_head.weight"],
    }
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = w[p + "qkv_proj.weight"].split([q, kv, kv])
        gate, up = w[p + "gate_up_proj.weight"].chunk(2)
        sd |= {
            h + "input_layernorm.weight": w[p + "input_norm.weight"],
            h + "post_attention_layernorm.weight": w[p + "post_attention_norm.weight"],
            h + "self_attn.q_proj.weight": wq,
            h + "self_attn.k_proj.weight": wk,
            h + "self_attn.v_proj.weight": wv,
            h + "self_attn.o_proj.weight": w[p + "o_proj.weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": w[p + "down_proj.weight"],
        }
    return sd


def _hf_model(cfg, weights):
    import transformers as tf

    rs = cfg.rope_scaling
    hf_cfg = tf.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={
            "rope_type": rs.rope_type,
            "rope_theta": cfg.rope_theta,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        },
    )
    model = tf.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(_hf_state_dict(cfg, weights), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return model


def test_tiny_random_engine_matches_transformers(tmp_path):
    from spinserve.control.engine import LLMEngine
    from spinserve.control.kv_manager import BatchItem
    from spinserve.runtime.batch import ForwardMode
    from spinserve.runtime.sampling import SamplingParams

    seed = random.randrange(1 << 20)
    out = build_random_engine("tiny-llama", tmp_path / "eng", seed=seed)
    engine = LLMEngine.from_engine_dir(
        out, device="cpu", dtype="float32", **{"engine.prefill_chunk_tokens": 16}
    )
    cfg = engine.model_config
    assert cfg.rope_scaling.rope_type == "llama3"  # the scaled rope is part of what is compared
    model = _hf_model(cfg, engine.runner.model.w)

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (300,), generator=gen).tolist()  # > original 256
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    engine.kv.ensure("logits", len(ids))
    batch = engine.kv.build_batch(
        ForwardMode.PREFILL, [BatchItem("logits", 0, ids, all_logits=True)], "cpu"
    )
    ours = engine.runner.forward(batch)
    engine.kv.free("logits")
    assert ours.shape == ref.shape == (300, cfg.vocab_size)
    assert torch.isfinite(ours).all()
    assert ref.std().item() > 0.1  # logits that tell tokens apart, not a flat line
    assert (ours - ref).abs().max().item() <= 1e-4

    # greedy decoding through the engine (paged decode) = transformers' greedy continuation
    prompt = ids[:40]
    with torch.no_grad():
        model.generation_config.eos_token_id = None
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    got = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert got.token_ids == hf[0, 40:].tolist()
    assert got.text == " ".join(f"t{t}" for t in got.token_ids if t > 2)


def test_load_is_deterministic_and_never_stored(tmp_path):
    seed = random.randrange(1 << 20)
    a = build_random_engine("tiny-llama", tmp_path / "a", seed=seed)
    b = build_random_engine("tiny-llama", tmp_path / "b", seed=seed + 1)
    assert sorted(p.name for p in a.iterdir()) == [
        "manifest.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not (a / WEIGHTS).exists()
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma.random_weights.to_dict() == {"preset": "tiny-llama", "seed": seed, "std": INIT_STD}
    assert json.loads((a / "manifest.json").read_text())["random_weights"]["seed"] == seed
    assert ma.model == PRESETS["tiny-llama"]

    w1 = load_weights(a, ma, "cpu", torch.float32)
    w2 = load_weights(a, ma, "cpu", torch.float32)
    w3 = load_weights(b, mb, "cpu", torch.float32)
    assert set(w1) == expected_weight_names(ma.model)
    for name, t in w1.items():
        assert torch.equal(t, w2[name]), name
        assert t.shape == weight_shapes(ma.model)[name][0]
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)) and torch.equal(w3[name], t)
        else:
            assert not torch.equal(t, w3[name]), name  # another seed, other weights
            assert t.std().item() == pytest.approx(INIT_STD, rel=0.1)
    assert not torch.equal(w1["layers.0.qkv_proj.weight"], w1["layers.1.qkv_proj.weight"])
    wb = load_weights(a, ma, "cpu", torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in wb.values())


def test_synthetic_tokenizer_covers_the_vocabulary(tmp_path):
    eng = build_random_engine("tiny-llama", tmp_path / "eng")
    tok = load_tokenizer(eng)
    assert len(tok) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = [random.randrange(3, 512) for _ in range(20)]
    text = " ".join(f"t{i}" for i in ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == text
    assert tok.encode("t5 hello t511", add_special_tokens=False) == [5, 0, 511]


def test_llama_8b_preset_has_the_real_shape():
    cfg = PRESETS["llama-3.1-8b"]
    assert cfg.architecture is Architecture.LLAMA
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (128256, 4096, 14336)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (500000.0, 131072)
    rs = cfg.rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor) == (
        "llama3",
        8.0,
        1.0,
        4.0,
    )
    assert rs.original_max_position_embeddings == 8192
    shapes = weight_shapes(cfg)
    assert sum(torch.Size(s).numel() for s, _ in shapes.values()) == 8_030_261_248
    assert set(shapes) == expected_weight_names(cfg)
    q3 = PRESETS["qwen3-14b"]
    assert set(weight_shapes(q3)) == expected_weight_names(q3)  # with q/k norms


def test_bad_preset_and_flags_give_one_clear_error(tmp_path, capsys):
    with pytest.raises(
        EngineError, match=r"unknown random-engine preset 'llama-8b'.*llama-3\.1-8b"
    ):
        build_random_engine("llama-8b", tmp_path / "x")
    assert not list(tmp_path.iterdir())  # nothing half-written

    out = str(tmp_path / "y")
    assert cli_main(["build", "--random", "gpt-9", "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown random-engine preset 'gpt-9'")
    assert cli_main(["build", "--random", "tiny-llama", "--dtype", "float16", "--output", out]) == 2
    assert "--dtype does not apply" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()

    assert cli_main(["build", "--random", "tiny-llama", "--seed", "7", "--output", out]) == 0
    assert read_manifest(tmp_path / "y").random_weights.seed == 7
    assert cli_main(["build", "--random", "tiny-llama", "--output", out]) == 2  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
