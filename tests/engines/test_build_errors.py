"""Bad checkpoints and engine folders give one clear error (EngineError), nothing half-built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from spinserve.engines.build import build_engine
from spinserve.engines.errors import EngineError
from spinserve.engines.manifest import FORMAT_VERSION, read_manifest
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("bad") / "ckpt")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="unsupported architecture.*LlamaForCausalLM"):
        build_engine(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # staging folder removed


def test_truncated_safetensors(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "trunc")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="model.safetensors"):
        build_engine(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "notok")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="no tokenizer.json"):
        build_engine(bad, tmp_path / "out", progress=False)


def test_missing_config_and_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="no config.json"):
        build_engine(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(EngineError, match="not found"):
        build_engine(tmp_path / "nope", tmp_path / "out", progress=False)


def test_missing_tensor(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(ckpt, tmp_path / "missing")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EngineError, match="layers.1.gate_up_proj"):
        build_engine(bad, tmp_path / "out", progress=False)


def test_newer_engine_format_is_refused(ckpt, tmp_path):
    out = build_engine(ckpt, tmp_path / "eng", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"]["architecture"] == "llama"
    manifest["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="format version .* upgrade spinserve"):
        read_manifest(out)


def test_output_not_empty_and_bad_page_size(ckpt, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(EngineError, match="not empty"):
        build_engine(ckpt, tmp_path / "full", progress=False)
    with pytest.raises(EngineError, match="page size 12"):
        build_engine(ckpt, tmp_path / "p12", page_size=12, progress=False)


def test_cli_reports_user_errors_without_traceback(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    cmd = [
        sys.executable,
        "-m",
        "spinserve.control.cli",
        "build",
        "--checkpoint",
        str(bad),
        "--output",
        str(tmp_path / "o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: unsupported architecture" in r.stderr
    assert "Traceback" not in r.stderr
