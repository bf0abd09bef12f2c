"""A sharded HF checkpoint (model.safetensors.index.json) builds the same engine as one file."""

from __future__ import annotations

import json

import torch
import transformers as tf
from safetensors.torch import load_file
from tiny_models import make_checkpoint

from spinserve.engines.build import build_engine


def test_sharded_checkpoint_builds_identical_weights(tmp_path):
    single = make_checkpoint("qwen3", tmp_path / "single")
    model = tf.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    for f in single.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3

    a = load_file(build_engine(single, tmp_path / "e1", progress=False) / "weights.safetensors")
    b = load_file(build_engine(sharded, tmp_path / "e2", progress=False) / "weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
