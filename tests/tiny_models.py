"""Tiny random Llama-family checkpoints made with transformers, and a tokenizer for them."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256


def make_tokenizer():
    """A byte-level BPE tokenizer (no merges) with a chat template, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet)[: VOCAB - len(specials)])}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def make_checkpoint(kind: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `kind` plus the tokenizer into `out` (HF folder)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=VOCAB - 3,
        eos_token_id=VOCAB - 2,
        pad_token_id=VOCAB - 1,
    )
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, head_dim=64)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = tf.LlamaConfig(**common, head_dim=64, rope_parameters=rope)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, head_dim=64))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=64))
    elif kind == "tied":
        cfg = tf.LlamaConfig(
            **{**common, "num_key_value_heads": 1}, head_dim=64, tie_word_embeddings=True
        )
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random init is small; make logits spread so argmax is decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out
