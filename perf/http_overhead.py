"""HTTP serving overhead as a ratio, for the CI gate: wall(SSE over uvicorn) / wall(offline).

The same engine folder serves C concurrent streaming /v1/completions clients (C distinct
prompts, greedy, N tokens each, EOS ignored) from `run_server` in a subprocess, and runs the
same prompts through LLMEngine.generate in this process; the two alternate for `rounds` rounds
and the metric is the median per-round ratio. Both sides run torch on one thread.

Without --engine a tiny random Llama (2 layers, hidden 64, byte-level tokenizer) is built into a
temporary folder, so that the model's own time is small and the serving layer's share is large.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from .serve_harness import ServerProcess

SERVER_SCRIPT = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from spinserve.configs.settings import load_settings
from spinserve.control.server import run_server
port, engine, kv = sys.argv[1:4]
settings = load_settings(**{"engine.device": "cpu", "cache.kv_cache_tokens": int(kv),
                            "server.model_name": "overhead"})
run_server(Path(engine), settings, host="127.0.0.1", port=int(port), log_level="warning")
"""
KV_CACHE_TOKENS = 16384
TINY_VOCAB = 256


def make_tiny_engine(out: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 64, head_dim 64) with a byte-level tokenizer."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from spinserve.engines.build import build_engine

    torch.manual_seed(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[: TINY_VOCAB - 3]
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<s>": 253, "</s>": 254, "<pad>": 255}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = tf.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=253,
        eos_token_id=254,
        pad_token_id=255,
    )
    ckpt = out / "ckpt"
    tf.LlamaForCausalLM(cfg).save_pretrained(ckpt)
    fast.save_pretrained(ckpt)
    return build_engine(ckpt, out / "engine", progress=False)


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds (Linux /proc, 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _http_wall(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {
            "model": "overhead",
            "prompt": prompt,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        n = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    n = int(line.split('"completion_tokens":')[1].split(",")[0].strip(" }"))
        if n != new_tokens:
            raise RuntimeError(f"http stream returned {n} tokens, expected {new_tokens}")
        return n

    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        return time.perf_counter() - t0


def run_http_overhead(
    engine_dir: Path | None = None,
    clients: int = 4,
    new_tokens: int = 32,
    prompt_tokens: int = 64,
    rounds: int = 3,
) -> dict:
    import torch

    from spinserve.control.engine import LLMEngine
    from spinserve.runtime.sampling import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="spin-http-overhead-"))
    engine_dir = engine_dir or make_tiny_engine(tmp)
    server = ServerProcess(SERVER_SCRIPT, [str(engine_dir), str(KV_CACHE_TOKENS)], log_dir=tmp)
    try:
        engine = LLMEngine.from_engine_dir(
            engine_dir, device="cpu", **{"cache.kv_cache_tokens": KV_CACHE_TOKENS}
        )
        server.wait_ready(180)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        walls: dict[str, list[float]] = {"offline": [], "http": []}
        cpus: dict[str, list[float]] = {"offline": [], "http": []}
        for rnd in range(rounds + 1):  # round 0 warms both paths
            prompts = [
                [(rnd * 31 + i) % 200 + 10 + (j % 7) for j in range(prompt_tokens)]
                for i in range(clients)
            ]
            c0, t0 = time.process_time(), time.perf_counter()
            engine.generate(prompts, params)
            off, off_cpu = time.perf_counter() - t0, time.process_time() - c0
            s0 = _proc_cpu_s(server.proc.pid)
            http = asyncio.run(_http_wall(server.base_url, prompts, new_tokens))
            http_cpu = _proc_cpu_s(server.proc.pid) - s0
            if rnd:
                walls["offline"].append(off)
                walls["http"].append(http)
                cpus["offline"].append(off_cpu)
                cpus["http"].append(http_cpu)
    finally:
        server.stop()
        torch.set_num_threads(threads)
    ratios = [h / o for h, o in zip(walls["http"], walls["offline"])]
    cpu_ratios = [h / o for h, o in zip(cpus["http"], cpus["offline"])]
    tokens = clients * new_tokens
    med_off, med_http = statistics.median(walls["offline"]), statistics.median(walls["http"])
    return {
        "ratio": statistics.median(ratios),
        "cpu_ratio": statistics.median(cpu_ratios),
        "server_cpu_ms_per_token": statistics.median(cpus["http"]) / tokens * 1e3,
        "offline_cpu_ms_per_token": statistics.median(cpus["offline"]) / tokens * 1e3,
        "overhead_ms_per_token": (med_http - med_off) / tokens * 1e3,
        "offline_ms_per_token": med_off / tokens * 1e3,
        "clients": clients,
        "new_tokens": new_tokens,
    }
