"""Engines of real model shapes with random weights, for performance runs (never for quality).

    spinserve build --random llama-3.1-8b --output ENGINE_DIR [--seed 0]

writes an engine folder with manifest.json (the preset's ModelConfig and `random_weights`: preset,
seed, init std) and a synthetic word-level tokenizer, but NO weight file: at load,
`random_weights` creates every tensor on the target device, in the target dtype, deterministically
in (seed, tensor name) for a given device type (the CPU and CUDA generators differ). Matrices and
embeddings are N(0, std^2) with std 0.02 (a 4096-wide layer then maps unit-RMS inputs to ~1.3 RMS
outputs, so activations stay finite through 32 bf16 layers), norm weights are 1, biases 0.

The tokenizer covers the whole vocabulary: ids 0/1/2 are <unk>/<s>/</s> and id i >= 3 is the word
"t{i}" (whitespace-split), so prompts can be text ("t17 t4093 ...") or ids and outputs decode.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from spinserve.configs.model import Architecture, ModelConfig, RopeScaling

from .build import staged_output
from .errors import EngineError
from .manifest import MANIFEST, Manifest, RandomWeights

INIT_STD = 0.02
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2

_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    # Llama-3.1-8B: 32 layers, GQA 32/8 heads of 128, llama3 rope scaling to 128K
    "llama-3.1-8b": ModelConfig(
        Architecture.LLAMA, 128256, 4096, 14336, 32, 32, 8, 128, 131072, 1e-5, 500000.0,
        _LLAMA3_ROPE, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,),
    ),
    # Qwen3-14B: 40 layers, GQA 40/8 heads of 128, per-head q/k RMSNorm
    "qwen3-14b": ModelConfig(
        Architecture.QWEN3, 151936, 5120, 17408, 40, 40, 8, 128, 40960, 1e-6, 1000000.0,
        qk_norm=True, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,),
    ),
    # for tests and CPU smoke runs: 4 layers (2 dense + 2 sparse by default), head_dim 64
    "tiny-llama": ModelConfig(
        Architecture.LLAMA, 512, 128, 256, 4, 4, 2, 64, 4096, 1e-5, 500000.0,
        RopeScaling("llama3", 8.0, 1.0, 4.0, 256), bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,),
    ),
}  # fmt: skip


def preset_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise EngineError(
            f"unknown random-engine preset {name!r}: choose one of {', '.join(sorted(PRESETS))}"
        ) from None


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Engine tensor name -> (shape, init) with init "normal", "ones" or "zeros"; the names are
    exactly build.expected_weight_names(cfg)."""
    h, D, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    out = {"embed_tokens.weight": ((cfg.vocab_size, h), "normal"), "norm.weight": ((h,), "ones")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, h), "normal")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "input_norm.weight"] = ((h,), "ones")
        out[p + "post_attention_norm.weight"] = ((h,), "ones")
        out[p + "qkv_proj.weight"] = ((qkv, h), "normal")
        out[p + "o_proj.weight"] = ((h, cfg.q_size), "normal")
        out[p + "gate_up_proj.weight"] = ((2 * inter, h), "normal")
        out[p + "down_proj.weight"] = ((h, inter), "normal")
        if cfg.qkv_bias:
            out[p + "qkv_proj.bias"] = ((qkv,), "zeros")
        if cfg.qk_norm:
            out[p + "q_norm.weight"] = ((D,), "ones")
            out[p + "k_norm.weight"] = ((D,), "ones")
    return out


def tensor_seed(seed: int, name: str) -> int:
    """Generator seed of one tensor, independent of the order tensors are made in; 32 bits
    because the CPU generator (mt19937) keeps only the low 32 bits of a seed."""
    return zlib.crc32(f"{seed}/{name}".encode())


@torch.no_grad()  # plain tensors (not inference tensors): usable in and out of inference mode
def random_weights(
    cfg: ModelConfig, spec: RandomWeights, device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every engine tensor, made directly on `device` in `dtype` (nothing touches the disk)."""
    device = torch.device(device)
    weights: dict[str, torch.Tensor] = {}
    for name, (shape, init) in weight_shapes(cfg).items():
        if init == "ones":
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        elif init == "zeros":
            weights[name] = torch.zeros(shape, device=device, dtype=dtype)
        else:
            g = torch.Generator(device).manual_seed(tensor_seed(spec.seed, name))
            t = torch.randn(shape, generator=g, device=device, dtype=dtype)
            weights[name] = t.mul_(spec.std)
    return weights


def make_tokenizer(vocab_size: int):
    """Word-level PreTrainedTokenizerFast over the whole vocabulary (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos
    )


def build_random_engine(
    preset: str, output: Path, *, seed: int = 0, page_size: int = 16, std: float = INIT_STD
) -> Path:
    """Write a random-weight engine folder (manifest + tokenizer, no weights); returns output."""
    cfg = preset_config(preset)
    if seed < 0 or seed >= 1 << 31:
        raise EngineError(f"seed {seed} is out of range: use 0 <= seed < 2**31")
    manifest = Manifest(
        model=cfg,
        dtype="bfloat16",  # no stored weights: the dtype they are made in follows the engine's
        page_size=page_size,
        max_context=cfg.max_position_embeddings,
        source={"format": "random", "preset": preset},
        random_weights=RandomWeights(preset, seed, std),
    )
    with staged_output(Path(output)) as staging:
        make_tokenizer(cfg.vocab_size).save_pretrained(str(staging))
        (staging / MANIFEST).write_text(manifest.to_json())
    return Path(output)
