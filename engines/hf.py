"""Hugging Face checkpoints: config.json -> ModelConfig, *.safetensors (sharded or not) -> tensors.

The HF-style config dict is also what the GGUF reader produces, so both formats share
`model_config_from_hf` and the fusing in build.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from spinserve.configs.model import Architecture, ModelConfig, RopeScaling

from .errors import EngineError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": Architecture.LLAMA,
    "MistralForCausalLM": Architecture.MISTRAL,
    "Qwen2ForCausalLM": Architecture.QWEN2,
    "Qwen3ForCausalLM": Architecture.QWEN3,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise EngineError(f"{folder} has no config.json: expected a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON ({e})") from None


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or params
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), RopeScaling()
    if rope_type != "llama3":
        raise EngineError(
            f"rope scaling type {rope_type!r} is not supported: supported are none and 'llama3'"
        )
    return float(theta), RopeScaling(
        rope_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _eos_ids(hf: dict, generation: dict) -> tuple[int, ...]:
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def model_config_from_hf(hf: dict, generation: dict | None = None) -> ModelConfig:
    """Validate an HF config dict and turn it into our ModelConfig."""
    names = hf.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[n] for n in names if n in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise EngineError(
            f"unsupported architecture {names or hf.get('model_type')!r}: supported are "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    if hf.get("mlp_bias"):
        raise EngineError("mlp_bias=true is not supported (Llama-family MLPs have no bias)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = _rope(hf)
    max_pos = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    if arch is Architecture.MISTRAL and window:
        max_pos = min(max_pos, int(window))  # within the window, sliding == full attention
    if arch is Architecture.QWEN2 and hf.get("use_sliding_window"):
        raise EngineError("Qwen2 with use_sliding_window=true is not supported")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=max_pos,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch is Architecture.QWEN2 or bool(hf.get("attention_bias", False)),
        qk_norm=arch is Architecture.QWEN3,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf, generation or {}),
    )


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EngineError(f"{index} is corrupt ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{folder} has no *.safetensors weights (only safetensors are supported)")
    for f in files:
        if not f.is_file():
            raise EngineError(f"shard {f.name} named in the index is missing from {folder}")
    return files


def iter_hf_tensors(folder: Path) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(number of tensors, iterator of (HF name, tensor)) over every safetensors shard."""
    files = _safetensors_files(folder)
    handles = []
    for f in files:
        try:
            handles.append(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise EngineError(f"{f} is not a readable safetensors file ({e})") from None
    count = sum(len(h.keys()) for h in handles)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f, h in zip(files, handles):
            for name in h.keys():
                try:
                    yield name, h.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise EngineError(f"{f}: tensor {name} is unreadable ({e})") from None

    return count, tensors()


def read_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
