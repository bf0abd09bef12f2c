"""GGUF checkpoints (llama.cpp files) -> HF-style config dict + HF-named fp32 tensors.

Data flow: GGUFReader (memory-mapped) -> metadata keys `{arch}.*` / `tokenizer.ggml.*` -> the
config.json a transformers checkpoint of the same model would carry; each tensor is de-quantised
with `gguf.quants.dequantize` (numpy, fp32), renamed `blk.N.attn_q` -> `model.layers.N.self_attn.
q_proj`, and for the llama architecture the Q/K rows are un-permuted (llama.cpp's converter
interleaves each head's rotary halves; transformers' GGUF loader undoes it the same way, so both
give identical tensors). Tensors are produced lazily, one at a time, so peak memory stays at one
de-quantised tensor plus what the consumer keeps.

Supported: llama (Llama 2/3.x, SmolLM2, and Mistral, which llama.cpp stores as llama), qwen2,
qwen3. Tied embeddings: no `output.weight` => tie_word_embeddings. Llama 3.x rope scaling is
stored by llama.cpp only as the `rope_freqs.weight` factors; it is matched back to the llama3
parameters. The tokenizer (tokenizer.json + tokenizer_config.json + generation_config.json) is
exported through transformers' GGUF tokenizer conversion.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .errors import EngineError

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# model_type -> (transformers class, extra config.json keys of that model family)
_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", {"mlp_bias": False, "pretraining_tp": 1}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": None}),
    "qwen3": ("Qwen3ForCausalLM", {"use_sliding_window": False, "sliding_window": None}),
}
# GGUF per-layer tensor stem -> HF module path inside model.layers.N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"
# Llama 3.x rope-scaling parameters llama.cpp folds into rope_freqs.weight (factor is read back)
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class GGUFError(EngineError, ValueError):
    """A GGUF file that cannot be read or is not a supported model; the message names why."""


def _unsupported(what: str) -> GGUFError:
    return GGUFError(
        f"{what}: spinserve reads GGUF architectures {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} "
        "(Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3)"
    )


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GGUFError(
            f"{path} is not a readable GGUF file ({e}): it is truncated or corrupt, download it again"
        ) from None


def _value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        v = f.contents()
    except Exception as e:  # malformed field bytes
        raise GGUFError(f"GGUF metadata field {key!r} is corrupt ({e})") from None
    if isinstance(v, float):  # GGUF stores float32: keep its shortest decimal (1e-05, not 9.99e-06)
        v = float(str(np.float32(v)))
    return v


def _required(reader: gguf.GGUFReader, key: str) -> int:
    v = _value(reader, key)
    if not isinstance(v, int):
        raise GGUFError(
            f"GGUF metadata lacks integer field {key!r} (found {v!r}): file is incomplete"
        )
    return v


def _hf_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne is innermost-first


def _model_type(reader: gguf.GGUFReader) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise _unsupported(f"GGUF architecture {arch!r} is not supported")
    names = f"{_value(reader, 'general.name', '')} {_value(reader, 'general.basename', '')}"
    return "mistral" if arch == "llama" and "mistral" in names.lower() else arch


def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover config.json's llama3 rope_scaling from llama.cpp's per-frequency factors."""
    params = {"rope_type": "llama3", "factor": float(freqs.max()), **_LLAMA3_ROPE}
    old_ctx = params["original_max_position_embeddings"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    expect = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            expect.append(1.0)
        elif wavelen > old_ctx / low:
            expect.append(params["factor"])
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            expect.append(1 / ((1 - smooth) / params["factor"] + smooth))
    if freqs.shape != (head_dim // 2,) or not np.allclose(freqs, expect, rtol=1e-4):
        raise _unsupported(
            "rope_freqs.weight does not match llama3 rope scaling (factor "
            f"{params['factor']}, low/high 1/4, original context 8192)"
        )
    return params


def _rope_scaling(reader, arch: str, theta: float, head_dim: int, tensors: dict) -> dict | None:
    kind = _value(reader, f"{arch}.rope.scaling.type")
    if _ROPE_FREQS in tensors:
        freqs = gguf.quants.dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        return _llama3_rope_scaling(np.asarray(freqs, np.float64).reshape(-1), theta, head_dim)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": _value(reader, f"{arch}.rope.scaling.factor", 1.0)}
    orig = _value(reader, f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = orig
    return scaling  # the builder decides whether it supports this rope type


def _token_ids(reader: gguf.GGUFReader) -> dict:
    ids = {}
    for key in ("bos", "eos", "padding"):
        v = _value(reader, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            ids["pad_token_id" if key == "padding" else f"{key}_token_id"] = v
    return ids


def _hf_config(reader: gguf.GGUFReader, tensors: dict) -> dict:
    model_type = _model_type(reader)
    arch = _value(reader, "general.architecture")
    hidden = _required(reader, f"{arch}.embedding_length")
    heads = _required(reader, f"{arch}.attention.head_count")
    kv_heads = _value(reader, f"{arch}.attention.head_count_kv", heads)
    rot_dim = _value(reader, f"{arch}.rope.dimension_count")
    head_dim = _value(reader, f"{arch}.attention.key_length") or rot_dim or hidden // heads
    if rot_dim is not None and rot_dim != head_dim:
        raise _unsupported(
            f"partial rotary embedding ({rot_dim} of {head_dim} dims) is not supported"
        )
    if not isinstance(kv_heads, int):
        raise _unsupported(f"per-layer KV head counts {kv_heads!r} are not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF file has no token_embd.weight: file is incomplete")
    theta = _value(reader, f"{arch}.rope.freq_base", 10000.0)
    cls, extra = _FAMILIES[model_type]
    cfg = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": _required(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _required(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _required(reader, f"{arch}.context_length"),
        "rms_norm_eps": _value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, theta, head_dim, tensors),
        "vocab_size": _hf_shape(tensors["token_embd.weight"])[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",  # de-quantised values are exact only in fp32
        **_token_ids(reader),
    }
    if model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type in ("qwen2", "qwen3"):
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    return {**cfg, **extra}


def _hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor; None for tensors folded into the config."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name == _ROPE_FREQS:
        return None
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise _unsupported(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` (rotary halves interleaved per head) on rows of a Q/K tensor."""
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, rows, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFTensors(Iterator[tuple[str, torch.Tensor]]):
    """Lazy (HF name, fp32 tensor) iterator over a GGUF file; len() = number of tensors."""

    def __init__(self, path: Path, reader: gguf.GGUFReader, cfg: dict, progress: bool) -> None:
        self._path = path
        self._items = [(t, n) for t in reader.tensors if (n := _hf_name(t.name)) is not None]
        # (Q heads, K heads) to un-permute with; llama.cpp permutes only the llama architecture
        self._heads = None
        if cfg["model_type"] in ("llama", "mistral"):
            self._heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
        self._gen = self._generate(progress)

    def __len__(self) -> int:
        return len(self._items)

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def _generate(self, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
        bar = tqdm(self._items, desc="de-quantising GGUF", unit="tensor", disable=not progress)
        for t, name in bar:
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise GGUFError(
                    f"{self._path}: tensor {t.name} ({t.tensor_type.name}) cannot be "
                    f"de-quantised ({e}): re-export the GGUF with a common type (F16, Q8_0, Q4_K)"
                ) from None
            w = np.asarray(w, dtype=np.float32)
            if w.shape != _hf_shape(t):
                raise GGUFError(
                    f"{self._path}: tensor {t.name} has shape {w.shape}, "
                    f"expected {_hf_shape(t)}: file is corrupt"
                )
            if self._heads is not None and ".attn_q." in t.name:
                w = _unpermute(w, self._heads[0])
            elif self._heads is not None and ".attn_k." in t.name:
                w = _unpermute(w, self._heads[1])
            yield name, torch.from_numpy(np.array(w, dtype=np.float32, copy=True))


def read_gguf(path: Path, *, progress: bool = False) -> tuple[dict, GGUFTensors]:
    """Read a GGUF file: (HF config.json dict, lazy iterator of (HF name, fp32 tensor)).

    Raises GGUFError (a ValueError) for an unreadable file or an unsupported architecture,
    before any tensor is de-quantised.
    """
    path = Path(path)
    reader = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _hf_config(reader, tensors)
    return cfg, GGUFTensors(path, reader, cfg, progress)


def export_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    """Write the GGUF's tokenizer as HF files (tokenizer.json, tokenizer_config.json with the
    chat template, special tokens, generation_config.json) so it loads offline from out_dir."""
    from transformers import AutoTokenizer

    path, out_dir = Path(path), Path(out_dir)
    reader = _open(path)
    _model_type(reader)  # unsupported architecture -> GGUFError before the slow conversion
    arch = _value(reader, "general.architecture")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise GGUFError(f"{path}: the tokenizer cannot be converted ({e})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    _finish_tokenizer_config(out_dir, tok.chat_template, _value(reader, f"{arch}.context_length"))
    ids = _token_ids(reader)
    eos = [ids[k] for k in ("eos_token_id",) if k in ids]
    for key in ("eot", "eom"):  # end-of-turn / end-of-message also end a generation
        v = _value(reader, f"tokenizer.ggml.{key}_token_id")
        if v is not None and v not in eos:
            eos.append(v)
    gen = {k: v for k, v in ids.items() if k != "eos_token_id"}
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _finish_tokenizer_config(out_dir: Path, chat_template: str | None, max_len: int | None) -> None:
    """tokenizer_config.json also carries the chat template (older transformers read it there,
    newer ones chat_template.jinja) and the model's context; load-time flags are dropped."""
    path = out_dir / "tokenizer_config.json"
    tc = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    if chat_template:
        tc["chat_template"] = chat_template
    if max_len:
        tc["model_max_length"] = max_len
    path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
