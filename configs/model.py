"""The model description an engine folder carries (manifest.json "model").

ModelConfig is frozen data: what the runtime needs to rebuild a Llama-family decoder, nothing
about where it came from. Checkpoint readers (spinserve.engines) produce it; the runtime consumes it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class Architecture(str, enum.Enum):
    LLAMA = "llama"  # Llama 2 / 3.x, SmolLM2
    MISTRAL = "mistral"  # without sliding window
    QWEN2 = "qwen2"  # qkv bias
    QWEN3 = "qwen3"  # q/k RMSNorm per head, no qkv bias


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1+); rope_type "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architecture"] = self.architecture.value
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["architecture"] = Architecture(d["architecture"])
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
