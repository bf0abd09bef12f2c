"""Open an engine folder: manifest, weights (as tensors on a device), tokenizer.

Weights come from weights.safetensors, or, for a random-weight engine (manifest.random_weights),
are made on the device at load (random_engine.random_weights; never written to disk).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .build import expected_weight_names
from .errors import EngineError
from .manifest import WEIGHTS, Manifest, read_manifest


def load_weights(engine_dir: Path, manifest: Manifest, device: str, dtype: torch.dtype):
    if manifest.random_weights is not None:
        from .random_engine import random_weights

        return random_weights(manifest.model, manifest.random_weights, device, dtype)
    path = Path(engine_dir) / WEIGHTS
    if not path.is_file():
        raise EngineError(f"{engine_dir} has no {WEIGHTS}: rebuild the engine")
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise EngineError(f"{path} is unreadable ({e}): rebuild the engine") from None
    missing = expected_weight_names(manifest.model) - weights.keys()
    if missing:
        raise EngineError(f"{path} lacks {sorted(missing)[:4]}...: rebuild the engine")
    return {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}


def load_tokenizer(engine_dir: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    engine_dir = Path(engine_dir)
    if not (engine_dir / "tokenizer.json").is_file():
        raise EngineError(f"{engine_dir} has no tokenizer.json: rebuild the engine")
    if (engine_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(engine_dir), local_files_only=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(engine_dir / "tokenizer.json"))


def open_engine(engine_dir: Path) -> Manifest:
    return read_manifest(Path(engine_dir))
