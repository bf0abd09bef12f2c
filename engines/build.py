"""`spinserve build`: checkpoint (HF safetensors folder or GGUF file) -> engine folder.

Data flow: reader -> (HF config dict, HF-named tensors) -> ModelConfig + fused tensors
(qkv_proj = cat(q, k, v), gate_up_proj = cat(gate, up)) -> weights.safetensors, manifest.json,
tokenizer files. The folder is written to a temporary sibling and renamed at the end, so an
interrupted build never leaves a half-written engine. Random-weight engines of real shapes
(`--random PRESET`, no checkpoint) are written by random_engine.py.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from spinserve.configs.model import ModelConfig

from . import hf
from .errors import EngineError
from .manifest import MANIFEST, WEIGHTS, Manifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF name inside a layer -> (our name, part index of the fused tensor)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_norm.weight", None),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", None),
    "self_attn.q_proj.weight": ("qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("qkv_proj.bias", 2),
    "self_attn.o_proj.weight": ("o_proj.weight", None),
    "self_attn.q_norm.weight": ("q_norm.weight", None),
    "self_attn.k_norm.weight": ("k_norm.weight", None),
    "mlp.gate_proj.weight": ("gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("down_proj.weight", None),
}
_TOP_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def expected_weight_names(cfg: ModelConfig) -> set[str]:
    names = {"embed_tokens.weight", "norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = [
        "input_norm.weight",
        "post_attention_norm.weight",
        "qkv_proj.weight",
        "o_proj.weight",
        "gate_up_proj.weight",
        "down_proj.weight",
    ]
    if cfg.qkv_bias:
        per_layer.append("qkv_proj.bias")
    if cfg.qk_norm:
        per_layer += ["q_norm.weight", "k_norm.weight"]
    for i in range(cfg.num_layers):
        names.update(f"layers.{i}.{n}" for n in per_layer)
    return names


def fuse_weights(
    cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Rename HF tensors to engine names, concatenating q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors:
        t = t.to(dtype).contiguous()
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
            continue
        m = _LAYER.match(name)
        if _IGNORED.search(name):
            continue
        if m is None or m.group(2) not in _LAYER_MAP:
            raise EngineError(
                f"unexpected tensor {name!r} in checkpoint ({cfg.architecture.value})"
            )
        ours, part = _LAYER_MAP[m.group(2)]
        key = f"layers.{m.group(1)}.{ours}"
        if part is None:
            out[key] = t
        else:
            parts.setdefault(key, {})[part] = t
    for key, p in parts.items():
        need = 2 if "gate_up" in key else 3
        if len(p) != need:
            raise EngineError(f"checkpoint is missing parts of {key} (found {sorted(p)})")
        out[key] = torch.cat([p[i] for i in range(need)], dim=0)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    missing = expected_weight_names(cfg) - out.keys()
    if missing:
        raise EngineError(f"checkpoint is missing tensors: {sorted(missing)[:8]}")
    return out


def _storage_dtype(dtype: str, hf_cfg: dict) -> str:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise EngineError(
                f"dtype {dtype!r} is not supported: use auto or one of {list(DTYPES)}"
            )
        return dtype
    src = str(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32").replace("torch.", "")
    return src if src in DTYPES else "float32"


def _read_checkpoint(checkpoint: Path, staging: Path):
    """-> (hf config dict, generation config, tensor count, tensors); tokenizer files -> staging."""
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        from .gguf_reader import export_gguf_tokenizer, read_gguf

        hf_cfg, tensors = read_gguf(checkpoint)
        export_gguf_tokenizer(checkpoint, staging)
        generation = hf.read_generation_config(staging)
        return hf_cfg, generation, None, tensors
    if not checkpoint.is_dir():
        raise EngineError(
            f"checkpoint {checkpoint} not found: give an HF model folder or a .gguf file"
        )
    hf_cfg = hf.read_hf_config(checkpoint)
    hf.model_config_from_hf(hf_cfg)  # fail on unsupported architectures before reading weights
    if not (checkpoint / "tokenizer.json").is_file():
        raise EngineError(
            f"{checkpoint} has no tokenizer.json: save the tokenizer with the model "
            "(tokenizer.save_pretrained) — a fast tokenizer is required"
        )
    for name in hf.TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, staging / name)
    count, tensors = hf.iter_hf_tensors(checkpoint)
    return hf_cfg, hf.read_generation_config(checkpoint), count, tensors


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `output` to write the engine into; on success it is renamed
    to `output` (which must not exist or be empty), on any error it is removed."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise EngineError(f"output {output} exists and is not empty: choose a new folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_engine(
    checkpoint: Path,
    output: Path,
    *,
    dtype: str = "auto",
    page_size: int = 16,
    progress: bool = True,
) -> Path:
    """Build an engine folder from a checkpoint; returns the output path."""
    checkpoint, output = Path(checkpoint), Path(output)
    with staged_output(output) as staging:
        hf_cfg, generation, count, tensors = _read_checkpoint(checkpoint, staging)
        cfg = hf.model_config_from_hf(hf_cfg, generation)
        storage = _storage_dtype(dtype, hf_cfg)
        bar = tqdm(
            tensors, total=count, desc="building engine", unit="tensor", disable=not progress
        )
        weights = fuse_weights(cfg, bar, DTYPES[storage])
        manifest = Manifest(
            model=cfg,
            dtype=storage,
            page_size=page_size,
            max_context=cfg.max_position_embeddings,
            source={
                "path": str(checkpoint.resolve()),
                "format": "gguf" if checkpoint.suffix == ".gguf" else "hf-safetensors",
            },
        )
        save_file(weights, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / MANIFEST).write_text(manifest.to_json())
    return output
