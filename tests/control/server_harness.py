"""Test harness for the HTTP server: a tiny engine folder and `spinserve` served by uvicorn in a
subprocess on a free loopback port (perf/serve_harness.py; stopped with SIGTERM at the end)."""

from __future__ import annotations

from pathlib import Path

import httpx
from tiny_models import VOCAB, make_tokenizer

from spinserve.perf import serve_harness
from spinserve.perf.serve_harness import free_port  # noqa: F401 - the tests import it from here

API_KEY = "test-key-1234"
MODEL = "tiny-llama"
MAX_BODY_BYTES = 64 * 1024
KV_CACHE_TOKENS = 16384


MAX_CONTEXT = 512


def make_checkpoint(out: Path, seed: int) -> Path:
    """A tiny random Llama (head_dim 64: a size the paged-KV kernels support) + tokenizer."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=VOCAB - 3,
        eos_token_id=VOCAB - 2,
        pad_token_id=VOCAB - 1,
    )
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits so greedy argmax is decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def build_tiny_engine(tmp: Path, seed: int = 0) -> Path:
    from spinserve.engines.build import build_engine

    ckpt = make_checkpoint(tmp / "ckpt", seed=seed)
    return build_engine(ckpt, tmp / "engine", progress=False)


def engine_overrides() -> dict:
    return {"engine.device": "cpu", "cache.kv_cache_tokens": KV_CACHE_TOKENS}


SERVER_SCRIPT = """
import sys
from pathlib import Path
from spinserve.configs.settings import load_settings
from spinserve.control.server import run_server
port, engine, key, model, body, kv = sys.argv[1:7]
settings = load_settings(**{"engine.device": "cpu", "cache.kv_cache_tokens": int(kv),
                            "server.api_key": key or None, "server.model_name": model,
                            "server.max_body_bytes": int(body)})
run_server(Path(engine), settings, host="127.0.0.1", port=int(port), shutdown_grace_s=60.0,
           integrity_checks=True, log_level="warning")
"""


class ServerProcess(serve_harness.ServerProcess):
    """The tiny engine served with the test settings (API key, model name, body limit)."""

    def __init__(self, engine_dir: Path, api_key: str | None = API_KEY) -> None:
        self.api_key = api_key
        args = [str(engine_dir), api_key or "", MODEL, str(MAX_BODY_BYTES), str(KV_CACHE_TOKENS)]
        super().__init__(SERVER_SCRIPT, args, log_dir=engine_dir.parent)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def scrape(server: ServerProcess) -> dict[str, float]:
    """GET /metrics -> {'name{labels}': value} (samples only, no comments)."""
    r = httpx.get(f"{server.base_url}/metrics", headers=server.headers, timeout=10)
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
