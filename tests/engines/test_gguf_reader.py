"""GGUF reader: tiny GGUF files written here (gguf.GGUFWriter, llama.cpp's Q/K permutation) from
random transformers models, read back exactly (F32) or as gguf's own Q8_0 round trip; the config
rebuilds a transformers model whose logits equal the original's; errors; and the real embedded
SmolLM2 GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as QT
from spinserve.engines.embedded import find_embedded_gguf
from spinserve.engines.gguf_reader import export_gguf_tokenizer, read_gguf

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
# HF module path inside a layer -> llama.cpp tensor stem (written independently of the reader)
LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LLAMA3 = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def tiny_model(kind: str, seed: int) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, head_dim=16, rope_theta=12345.0))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, head_dim=16, rope_parameters=rope))
    elif kind == "tied":
        cfg = tf.LlamaConfig(**{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**TINY, head_dim=16, sliding_window=None))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=False))
    elif kind == "qwen3":  # head_dim 32 != hidden / heads: must come from attention.key_length
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # spread every parameter (norms too) so a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_freqs(theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for Llama 3.x (LlamaModel.generate_extra_tensors)."""
    f, lo, hi, old = (
        LLAMA3[k]
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
    )
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(f)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / f + smooth))
    return np.array(out, dtype=np.float32)


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_TO_GGUF:
        return TOP_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{LAYER_TO_GGUF[module]}.{suffix}"


def write_gguf(path, kind: str, model, qtype: QT, name: str = "tiny") -> None:
    c = model.config
    arch = "llama" if kind in ("llama", "llama3", "tied", "mistral") else kind
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
    if kind == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            x = llamacpp_permute(x, heads, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            x = llamacpp_permute(x, heads, kv)
        if qtype != QT.F32 and x.ndim == 2:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(hf_name), x)
    if kind == "llama3":
        w.add_tensor(
            "rope_freqs.weight", llama3_rope_freqs(c.rope_parameters["rope_theta"], c.head_dim)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def roundtrip(t: torch.Tensor, qtype: QT) -> torch.Tensor:
    if qtype == QT.F32 or t.dim() == 1:
        return t
    q = gguf.quants.quantize(t.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype).astype(np.float32))


KINDS = ["llama", "llama3", "tied", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=["F32", "Q8_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gguf_tensors_round_trip(tmp_path, kind, qtype):
    model = tiny_model(kind, seed=KINDS.index(kind) + 10 * int(qtype))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, kind, model, qtype)
    cfg, tensors = read_gguf(path)
    want = model.state_dict()
    if model.config.tie_word_embeddings:
        want = {k: v for k, v in want.items() if k != "lm_head.weight"}
    assert len(tensors) == len(want)
    got = dict(tensors)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == t.shape, name
        assert torch.equal(got[name], roundtrip(t, qtype)), name
        if qtype == QT.Q8_0 and t.dim() == 2:  # a real quantisation happened, within its bound
            err = (got[name] - t).abs()
            assert 0 < err.max() <= t.abs().max() / 127, name


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gguf_config_rebuilds_the_model(tmp_path, kind):
    model = tiny_model(kind, seed=100 + KINDS.index(kind))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, kind, model, QT.F32, name="Mistral-Tiny" if kind == "mistral" else "tiny")
    cfg, tensors = read_gguf(path)
    c = model.config
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["model_type"] == c.model_type
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert cfg[key] == getattr(c, key), key
    assert cfg["head_dim"] == getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    want_scaling = {"rope_type": "llama3", **LLAMA3} if kind == "llama3" else None
    assert cfg["rope_scaling"] == want_scaling
    # a transformers model built from our config + tensors computes the same logits
    rebuilt = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**cfg)).eval()
    missing, unexpected = rebuilt.load_state_dict(dict(tensors), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if cfg["tie_word_embeddings"]:
        rebuilt.tie_weights()
    ids = torch.randint(0, c.vocab_size, (2, 37))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def _minimal_writer(path, arch: str) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_tensor("token_embd.weight", np.random.rand(16, 32).astype(np.float32))
    return w


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _finish(_minimal_writer(path, "gpt2"))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama, qwen2, qwen3"):
        read_gguf(path)


def test_unknown_tensor_is_named(tmp_path):
    path = tmp_path / "moe.gguf"
    w = _minimal_writer(path, "llama")
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.random.rand(4, 8, 32).astype(np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight.*llama"):
        read_gguf(path)


def test_mismatched_rope_freqs_is_refused(tmp_path):
    path = tmp_path / "rope.gguf"
    w = _minimal_writer(path, "llama")
    w.add_tensor("rope_freqs.weight", np.random.uniform(1, 3, 8).astype(np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="rope_freqs.weight does not match llama3"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", tiny_model("llama", seed=7), QT.F32)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.bytes(4096))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf(path)
    with pytest.raises(ValueError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


# ---- the real embedded SmolLM2 GGUF against transformers' GGUF loader ------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    return find_embedded_gguf()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    return tf.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )


def test_smollm2_matches_transformers(smollm2_gguf, hf_smollm2):
    cfg, tensors = read_gguf(smollm2_gguf)
    want = hf_smollm2.state_dict()
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" in want
    got = dict(tensors)
    assert got.keys() == want.keys() - {"lm_head.weight"}
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    hc = hf_smollm2.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ):
        assert cfg[key] == getattr(hc, key), key
    assert (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
        cfg["max_position_embeddings"],
    ) == (30, 9, 3, 64, 8192)
    assert cfg["rope_theta"] == hc.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5 and np.float32(hc.rms_norm_eps) == np.float32(1e-5)
    assert cfg["rope_scaling"] is None and cfg["architectures"] == ["LlamaForCausalLM"]


def test_smollm2_tokenizer_export(tmp_path, smollm2_gguf):
    out = tmp_path / "tok"
    export_gguf_tokenizer(smollm2_gguf, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    ref = tf.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = tf.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = [
        "Hello world!",
        "  naïve café — 3.14159\n\tdef f(x): return x**2",
        "<|im_start|>user\nhi<|im_end|>",
        "🤖 日本語 text",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text)), text
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for msgs in (chat, chat[1:2]):
        kw = dict(add_generation_prompt=True, tokenize=False)
        text = ours.apply_chat_template(msgs, **kw)
        assert text == ref.apply_chat_template(msgs, **kw)
        assert text.endswith("<|im_start|>assistant\n")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.chat_template == ref.chat_template
