"""Public entry points of the paged-KV ops. Signatures and semantics: see reference.py.

(Initial version: dispatches to the references; the Triton kernels register as torch.ops.spin.*.)
"""

from __future__ import annotations

from .reference import append_kv_ref as append_kv
from .reference import paged_decode_attention_ref as paged_decode_attention
from .reference import paged_prefill_attention_ref as paged_prefill_attention

__all__ = ["append_kv", "paged_decode_attention", "paged_prefill_attention"]
