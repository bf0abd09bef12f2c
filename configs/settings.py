"""Runtime settings: pydantic-settings with env prefix SPIN_ (nested with `__`), an optional TOML
file, and explicit overrides (CLI flags) on top: overrides > env > TOML > defaults.

    SPIN_ENGINE__DEVICE=cpu  SPIN_CACHE__PAGE_SIZE=8  SPIN_SPARSE__ALGORITHM=quest
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(str, enum.Enum):
    AUTO = "auto"  # float32 on CPU, bfloat16 on CUDA
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device = Device.AUTO
    dtype: DType = DType.AUTO
    max_running_requests: int = Field(64, ge=1, description="decode batch cap")
    max_batched_tokens: int = Field(2048, ge=16, description="prefill + decode tokens per step")
    prefill_chunk_tokens: int = Field(512, ge=8, description="longest prefill chunk per request")
    max_context: int | None = Field(None, ge=16, description="cap below the model's own")
    cuda_graphs: bool = Field(True, description="replay decode as CUDA graphs (CUDA only)")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (None = torch's default)"
    )


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    page_size: int | None = Field(None, description="tokens per page; None = the engine's")
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="KV pool capacity in tokens; None = sized from memory"
    )
    kv_memory_fraction: float = Field(0.85, gt=0, le=0.95, description="of free GPU memory")
    cpu_kv_memory_gib: float = Field(2.0, gt=0, description="KV pool size on CPU")
    hierarchy: bool = Field(
        False, description="sparse requests keep only their working set in HBM (host pool)"
    )
    host_pool_tokens: int | None = Field(
        None, ge=16, description="pinned host KV pool in tokens; None = 2x the HBM pool"
    )
    buffer_ratio: float = Field(4.0, ge=0, description="HBM buffer pages per mandatory page")
    fused_resolve: bool = Field(
        True,
        description="hierarchy lookups, victims and installs as one Triton kernel per layer "
        "on CUDA (False: torch ops; the CPU always uses those)",
    )

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, v: int | None) -> int | None:
        if v is not None and v not in (8, 16, 32):
            raise ValueError(f"page_size {v} is not supported: use 8, 16 or 32")
        return v


class SparseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: str = "dense"
    budget_tokens: int = Field(2048, ge=1)
    sink_tokens: int = Field(16, ge=0)
    window_tokens: int = Field(128, ge=0)
    dense_layers: int = Field(2, ge=0, description="first layers attend densely")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    model_name: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPIN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    engine: EngineSettings = EngineSettings()
    cache: CacheSettings = CacheSettings()
    sparse: SparseSettings = SparseSettings()
    server: ServerSettings = ServerSettings()
    cache_dir: Path | None = None  # where the embedded model's engine is built; None = ~/.cache

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # TomlConfigSettingsSource reads model_config["toml_file"]; absent file = no values
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @property
    def device(self) -> str:
        return resolve_device(self.engine.device)


def resolve_device(device: Device) -> str:
    if device is Device.AUTO:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.value


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"engine.device": "cpu"} -> {"engine": {"device": "cpu"}}; None values are dropped."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < TOML file < SPIN_* env < overrides ("section.field" keys)."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} not found")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    merged = _FileSettings(**_nest(overrides))
    return Settings.model_validate(merged.model_dump())
