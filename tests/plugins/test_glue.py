"""The fused decoder glue (rms_norm, add_rms_norm, rope_qkv, silu_mul): Triton kernels (interpreter on
CPU, compiled on CUDA) against the torch references, HF's rounding order; bad inputs refused."""

from __future__ import annotations

import pytest
import torch

from spinserve.plugins import ops
from spinserve.plugins._ops_glue import (
    fold_page_minmax_ref,
    rms_norm_ref,
    rope_qkv_ref,
    silu_mul_ref,
)
from spinserve.plugins._validate import UnsupportedInputError
from spinserve.runtime.rope import cos_sin


def _cos_sin(T: int, D: int, dtype, device, seed: int):
    positions = torch.randint(0, 30000, (T,), generator=torch.Generator().manual_seed(seed))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return cos_sin(inv_freq.to(device), positions.to(device), dtype)


def _check_glue(device: str, dtype: torch.dtype, T: int, H: int, KV: int, D: int, n: int):
    g = torch.Generator().manual_seed(T * 7 + D)
    x = torch.randn(T, n, generator=g).to(device, dtype)
    res = torch.randn(T, n, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    tol = 0 if dtype == torch.float32 else 1e-2
    out = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), atol=tol + 1e-5, rtol=tol)
    out, summed = ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, x + res)  # one rounding, as torch's add
    torch.testing.assert_close(out, rms_norm_ref(x + res, w, 1e-5), atol=tol + 1e-5, rtol=tol)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g).to(device, dtype)
    cos, sin = _cos_sin(T, D, dtype, device, seed=T)
    got = ops.rope_qkv(qkv, cos, sin, H, KV)
    want = rope_qkv_ref(qkv, cos, sin, H, KV)
    for a, b, heads in zip(got, want, (H, KV, KV)):
        assert a.shape == (T, heads, D) and a.is_contiguous()
        torch.testing.assert_close(a, b, atol=tol + 1e-6, rtol=tol)
    assert torch.equal(got[2], want[2])  # v is a plain copy
    # Quest's min/max fold: rows of distinct pages, fresh pages restart from the key
    B = 4
    N = B * KV + 5
    keys = torch.randn(B, KV, D, generator=g).to(device, dtype)
    rows = torch.randperm(N, generator=g)[: B * KV].to(device, torch.int32)
    fresh = torch.tensor([True, False, False, True])[:B].to(device)
    tables = [torch.randn(N, D, generator=g).to(device, dtype) for _ in range(2)]
    tables[1] += 3  # max >= min
    want = [t.clone() for t in tables]
    fold_page_minmax_ref(*want, rows, fresh, keys)
    ops.fold_page_minmax(*tables, rows, fresh, keys)
    assert torch.equal(tables[0], want[0]) and torch.equal(tables[1], want[1])
    r = rows.long().view(B, KV)
    assert torch.equal(tables[0][r[0]], keys[0]) and torch.equal(tables[1][r[3]], keys[3])


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("T", "H", "KV", "D", "n"), [(3, 4, 2, 64, 96), (1, 6, 1, 128, 256)])
def test_glue_kernels_match_references_interpreted(T, H, KV, D, n):
    _check_glue("cpu", torch.float32, T, H, KV, D, n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("T", "H", "KV", "D", "n"), [(32, 32, 8, 128, 4096), (7, 9, 3, 64, 576)])
def test_glue_kernels_match_references_gpu(dtype, T, H, KV, D, n):
    _check_glue("cuda", dtype, T, H, KV, D, n)


def _check_silu_mul(device: str, dtype: torch.dtype, T: int, n: int) -> None:
    g = torch.Generator().manual_seed(T + n)
    x = (4 * torch.randn(T, 2 * n, generator=g)).to(device, dtype)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp overflow / underflow, silu(0) = 0
    got = ops.silu_mul(x)
    want = silu_mul_ref(x)
    gate, up = x.float().chunk(2, dim=-1)
    assert got.shape == (T, n) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got[0, :3], want[0, :3])
    if dtype == torch.float32:  # exp rounding only
        torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)
    else:  # torch rounds silu to the dtype, then the product: at most one ulp of each apart
        torch.testing.assert_close(got, want, rtol=2 * 2**-8, atol=1e-3)
        assert (got == want).float().mean() > 0.99
    torch.testing.assert_close(want.float(), gate * torch.sigmoid(gate) * up, rtol=2e-2, atol=1e-2)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("T", "n"), [(3, 1500), (1, 64)])
def test_silu_mul_matches_reference_interpreted(T, n):
    _check_silu_mul("cpu", torch.float32, T, n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("T", "n"), [(32, 14336), (256, 14336), (7, 1536)])
def test_silu_mul_matches_reference_gpu(dtype, T, n):
    _check_silu_mul("cuda", dtype, T, n)


def test_silu_mul_reference_is_the_models_old_mlp_activation():
    """On CPU (no Triton) the op is exactly F.silu(gate) * up of the chunked projection."""
    x = torch.randn(4, 2 * 96).to(torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(ops.silu_mul(x), torch.nn.functional.silu(gate) * up)


def test_glue_reference_equals_hf_rotation_and_norm():
    """The references follow transformers' Llama code (rotate_half; norm in fp32, cast, scale)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    T, H, KV, D = 5, 4, 2, 64
    qkv = torch.randn(T, (H + 2 * KV) * D)
    cos, sin = _cos_sin(T, D, torch.float32, "cpu", seed=3)
    q, k, v = rope_qkv_ref(qkv, cos, sin, H, KV)
    hq = qkv[:, : H * D].view(1, T, H, D).transpose(1, 2)
    hk = qkv[:, H * D : (H + KV) * D].view(1, T, KV, D).transpose(1, 2)
    wq, wk = apply_rotary_pos_emb(hq, hk, cos[None], sin[None])
    torch.testing.assert_close(q, wq[0].transpose(0, 1))
    torch.testing.assert_close(k, wk[0].transpose(0, 1))
    norm = LlamaRMSNorm(96, eps=1e-6)
    norm.weight.data = torch.randn(96)
    x = torch.randn(T, 96)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight.data, 1e-6), norm(x))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5), "weight must be"),
        (lambda: ops.rms_norm(torch.randn(2, 8, 2), torch.ones(8), 1e-5), "x must be"),
        (lambda: ops.silu_mul(torch.randn(2, 7)), "gate | up"),
        (lambda: ops.silu_mul(torch.randn(8, 2).t()), "gate | up"),
        (lambda: ops.silu_mul(torch.randn(2, 8).long()), "gate | up"),
        (
            lambda: ops.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5),
            "residual must",
        ),
        (
            lambda: ops.rope_qkv(
                torch.randn(2, 7 * 64), *_cos_sin(2, 64, torch.float32, "cpu", 0), 4, 2
            ),
            "qkv must be",
        ),
        (
            lambda: ops.rope_qkv(
                torch.randn(2, 8 * 48), torch.ones(2, 48), torch.ones(2, 48), 4, 2
            ),
            "cos must be",
        ),
    ],
)
def test_glue_rejects_bad_inputs(call, match):
    with pytest.raises(UnsupportedInputError, match=match):
        call()
