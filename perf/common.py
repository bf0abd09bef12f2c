"""Shared pieces of benchmark records: device name, git sha, date, JSON writing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path


def git_sha() -> str:
    """HEAD's short sha; $SPIN_GIT_SHA where the tree is a copy without .git (device runs)."""
    if os.environ.get("SPIN_GIT_SHA"):
        return os.environ["SPIN_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}"


def record(bench: str, config: dict, metrics: dict, **extra) -> dict:
    return {
        "bench": bench,
        "device": device_name(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "metrics": metrics,
        **extra,
    }


def write_record(rec: dict, out_dir: Path, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return path
