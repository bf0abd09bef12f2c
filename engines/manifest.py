"""The engine folder: manifest.json + weights.safetensors + tokenizer files.

manifest.json = {format_version, builder_version, model (ModelConfig), dtype, page_size,
max_context, sparse (engine defaults), source, random_weights}. Readers refuse a newer
format_version. `random_weights` is null for an engine built from a checkpoint; for a random-weight
engine (engines/random_engine.py) it is {preset, seed, std} and the folder has no weights file:
the loader makes the weights on the target device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from spinserve.configs.model import ModelConfig

from .errors import EngineError

FORMAT_VERSION = 2  # 2: random_weights (version 1 folders still read)
BUILDER_VERSION = "0.1.0"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
SUPPORTED_PAGE_SIZES = (8, 16, 32)


@dataclass(frozen=True)
class RandomWeights:
    """Weights made at load: N(0, std^2) matrices from `seed`, norms 1 (random_engine.py)."""

    preset: str
    seed: int
    std: float

    def to_dict(self) -> dict:
        return {"preset": self.preset, "seed": self.seed, "std": self.std}


@dataclass(frozen=True)
class Manifest:
    model: ModelConfig
    dtype: str  # "float32" | "bfloat16" | "float16": storage dtype of weights.safetensors
    page_size: int
    max_context: int
    sparse: dict = field(default_factory=lambda: {"algorithm": "dense", "budget_tokens": 2048})
    source: dict = field(default_factory=dict)
    random_weights: RandomWeights | None = None  # None: weights.safetensors holds the weights
    format_version: int = FORMAT_VERSION
    builder_version: str = BUILDER_VERSION

    def __post_init__(self) -> None:
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise EngineError(
                f"page size {self.page_size} is not supported: use one of {SUPPORTED_PAGE_SIZES}"
            )

    def to_json(self) -> str:
        d = {
            "format_version": self.format_version,
            "builder_version": self.builder_version,
            "model": self.model.to_dict(),
            "dtype": self.dtype,
            "page_size": self.page_size,
            "max_context": self.max_context,
            "sparse": self.sparse,
            "source": self.source,
            "random_weights": self.random_weights.to_dict() if self.random_weights else None,
        }
        return json.dumps(d, indent=2)


def _random_weights(d: dict | None) -> RandomWeights | None:
    if d is None:
        return None
    return RandomWeights(str(d["preset"]), int(d["seed"]), float(d["std"]))


def read_manifest(engine_dir: Path) -> Manifest:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineError(
            f"{engine_dir} is not an engine folder (no {MANIFEST}): build one with "
            "`spinserve build --checkpoint PATH --output DIR`"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is corrupt ({e}): rebuild the engine") from None
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(
            f"{engine_dir} has engine format version {version!r}; this spinserve reads versions "
            f"<= {FORMAT_VERSION}: upgrade spinserve or rebuild the engine with this version"
        )
    try:
        return Manifest(
            model=ModelConfig.from_dict(d["model"]),
            dtype=d["dtype"],
            page_size=int(d["page_size"]),
            max_context=int(d["max_context"]),
            sparse=d.get("sparse", {}),
            source=d.get("source", {}),
            random_weights=_random_weights(d.get("random_weights")),
            format_version=version,
            builder_version=d.get("builder_version", "?"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(
            f"{path} is missing or has a bad field ({e}): rebuild the engine"
        ) from None
