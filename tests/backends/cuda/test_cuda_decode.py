"""Quantized-KV kernels of the cuda backend (quantize, dequantize, attention_kvq, mla_attention_kvq) against the IR
ops' numpy references. On CPU they run in Triton's interpreter (tests/conftest.py), so shapes are tiny and q is
f32/f16 (the interpreter cannot dot bf16); bench/decode_cuda.py checks bf16 on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import decode_attention as da
from r1c.backends.cuda.kernels.kv_quant import QuantKernelError
from r1c.backends.cuda.launchers import get_launcher, has_launcher
from r1c.ir import registry
from r1c.ir.types import DType

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
_empty = torch.empty


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an element no kernel writes fails the check."""

    def nan_empty(*args, **kwargs):
        t = _empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.dtype != torch.float8_e4m3fn else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


def rel(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np_(out).astype(np.float64) - ref) / np.linalg.norm(ref))


def quantize(x: torch.Tensor, dtype: DType, gran: str, axis: int, bits: int = 8):
    return get_launcher("quantize")(x, dtype=dtype, bits=bits, token_axis=axis, granularity=gran)


def test_launchers_registered():
    for op in ("quantize", "dequantize", "attention_kvq", "mla_attention_kvq"):
        assert has_launcher(op), op


@pytest.mark.parametrize(
    "dtype,bits,gran,xdt",
    [
        (DType.int8, 8, "per_token", torch.float32),
        (DType.int8, 8, "per_channel", torch.float16),
        (DType.int8, 4, "per_token", torch.float16),
        (DType.fp8e4m3, 8, "per_token", torch.float32),
        (DType.fp8e4m3, 8, "per_channel", torch.float32),
    ],
)
def test_quantize_exact(dtype, bits, gran, xdt):
    x = (torch.randn(2, 3, 37, 24) * torch.logspace(-3, 2, 24)).to(xdt)  # channels over 5 decades: fp8 subnormals
    x[0, 0, 5] = 0  # a zero token group (per_token) ...
    x[1, 2, :, 3] = 0  # ... and a zero channel group (per_channel)
    x[1, 1, 7, 2] = float("nan")  # a NaN: its group's scale is NaN and its codes 0
    x = x.to(DEVICE)
    attrs = registry.get("quantize").complete_attrs(
        {"dtype": dtype, "bits": bits, "granularity": gran, "token_axis": 2}
    )
    q, s = get_launcher("quantize")(x, **attrs)
    q_ref, s_ref = registry.get("quantize").reference([np_(x)], attrs)
    assert tuple(s.shape) == s_ref.shape and tuple(q.shape) == q_ref.shape
    np.testing.assert_array_equal(np_(q), q_ref.astype(np.float32))
    np.testing.assert_array_equal(s.cpu().numpy(), s_ref)  # NaN == NaN for assert_array_equal


@pytest.mark.parametrize("out_dtype", [DType.f32, DType.f16])
def test_dequantize(out_dtype):
    x = torch.randn(2, 5, 3, 8, device=DEVICE)
    for gran in ("per_token", "per_channel"):
        q, s = quantize(x, DType.int8, gran, 1)
        out = get_launcher("dequantize")(q, s, dtype=out_dtype, bits=8)
        ref = registry.get("dequantize").reference([np_(q), np_(s)], {"dtype": out_dtype, "bits": 8})[0]
        assert out.dtype == {DType.f32: torch.float32, DType.f16: torch.float16}[out_dtype]
        assert rel(out, ref) < (1e-6 if out_dtype == DType.f32 else 1e-3)


# (B, H, Hkv, Sq, Skv, D, causal, window, sinks, code dtype, key/value scale granularity, q dtype, splits)
ATTN_CASES = [
    (2, 4, 4, 1, 70, 16, True, 0, 0, DType.int8, ("per_channel", "per_token"), torch.float32, None),  # MHA decode
    (1, 2, 2, 1, 90, 24, True, 20, 2, DType.int8, ("per_channel", "per_token"), torch.float32, 3),  # window+sinks
    (2, 4, 2, 1, 70, 24, True, 0, 0, DType.fp8e4m3, ("per_channel", "per_token"), torch.float32, 3),  # GQA, fp8
    (1, 4, 1, 3, 90, 32, True, 20, 0, DType.int8, ("per_channel", "per_token"), torch.float16, 2),  # drafts, window
    (1, 2, 2, 5, 40, 16, False, 0, 0, DType.int8, ("per_token", "per_channel"), torch.float32, 1),  # swapped scales
    (1, 2, 1, 70, 70, 16, True, 0, 0, DType.int8, ("per_channel", "per_token"), torch.float32, 2),  # prefill
    (1, 2, 2, 1, 50, 64, True, 0, 0, DType.fp8e4m3, ("per_token", "per_channel"), torch.float16, 2),  # MHA fp8
]


@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_kvq(case):
    b, h, hkv, sq, skv, d, causal, window, sinks, code, (kg, vg), qdt, splits = case
    q = torch.randn(b, h, sq, d, device=DEVICE).to(qdt)
    (kq, ks), (vq, vs) = (
        quantize(torch.randn(b, hkv, skv, d, device=DEVICE), code, kg, 2),
        quantize(torch.randn(b, hkv, skv, d, device=DEVICE), code, vg, 2),
    )
    attrs = registry.get("attention_kvq").complete_attrs(
        {"scale": d**-0.5, "causal": causal, "window": window, "sinks": sinks}
    )
    ref = registry.get("attention_kvq").reference([np_(t) for t in (q, kq, ks, vq, vs)], attrs)[0]
    out = da.attention_kvq_run(q, kq, ks, vq, vs, scale=d**-0.5, causal=causal, window=window, sinks=sinks, bits=8,
                               splits=splits, block_n=16)  # fmt: skip
    assert out.dtype == qdt and tuple(out.shape) == ref.shape
    assert rel(out, ref) < TOL[qdt]
    if splits is None:  # the registered launcher (default tiling) too
        assert rel(get_launcher("attention_kvq")(q, kq, ks, vq, vs, **attrs), ref) < TOL[qdt]


@pytest.mark.skipif(DEVICE == "cpu", reason="the PTX int8 conversion (_I8_TO_F32) runs only on the GPU")
def test_attention_kvq_int8_conversion_every_code():
    """The prmt/sub conversion of the one-row path against I2F, on codes covering all of -128..127."""
    b, h, skv, d = 2, 4, 300, 128
    q = torch.randn(b, h, 1, d, device=DEVICE)
    kq = torch.randint(-128, 128, (b, h, skv, d), device=DEVICE, dtype=torch.int8)
    vq = torch.arange(b * h * skv * d, device=DEVICE).remainder(256).sub(128).to(torch.int8).view(b, h, skv, d)
    ks, vs = torch.rand(b, h, 1, d, device=DEVICE) * 0.02, torch.rand(b, h, skv, 1, device=DEVICE) * 0.02
    kw = dict(scale=d**-0.5, causal=True, window=0, sinks=0, bits=8)
    fast = da.attention_kvq_run(q, kq, ks, vq, vs, **kw)
    torch.testing.assert_close(fast, da.attention_kvq_run(q, kq, ks, vq, vs, int8_asm=False, **kw), rtol=1e-6, atol=0)
    attrs = registry.get("attention_kvq").complete_attrs({"scale": d**-0.5, "causal": True})
    ref = registry.get("attention_kvq").reference([np_(t) for t in (q, kq, ks, vq, vs)], attrs)[0]
    assert rel(fast, ref) < 1e-5


@pytest.mark.parametrize("rows", [1, 2])  # one row: the CUDA-core path; two (GQA): tl.dot
def test_attention_kvq_elementwise_scales_and_4bit(rows):
    b, hkv, skv, d = 1, 2, 33, 16
    q = torch.randn(b, hkv * rows, 1, d, device=DEVICE)
    k, v = torch.randn(b, hkv, skv, d, device=DEVICE), torch.randn(b, hkv, skv, d, device=DEVICE)
    kq, _ = quantize(k, DType.int8, "per_token", 2, bits=4)
    vq, _ = quantize(v, DType.int8, "per_token", 2, bits=4)
    ks = torch.rand(b, hkv, skv, d, device=DEVICE) + 0.5  # a scale per element: dequantized in the tile
    vs = torch.rand(b, 1, skv, d, device=DEVICE) + 0.5  # and broadcast over heads
    attrs = registry.get("attention_kvq").complete_attrs({"scale": 0.3, "causal": True, "bits": 4})
    ref = registry.get("attention_kvq").reference([np_(t) for t in (q, kq, ks, vq, vs)], attrs)[0]
    assert rel(get_launcher("attention_kvq")(q, kq, ks, vq, vs, **attrs), ref) < 1e-5


MLA_CASES = [  # (B, H, Sq, Skv, C, dr, dn, dv, window, latent scale, rotary scale, code, q dtype)
    (2, 4, 1, 50, 32, 8, 16, 16, 0, "per_token", "per_channel", DType.int8, torch.float32),
    (1, 3, 2, 40, 24, 16, 8, 12, 0, "per_channel", "per_token", DType.fp8e4m3, torch.float32),
    (1, 2, 3, 45, 64, 16, 16, 16, 10, "per_token", "per_channel", DType.int8, torch.float16),
]


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_attention_kvq(case):
    b, h, sq, skv, c, dr, dn, dv, window, lg, rg, code, qdt = case
    q = torch.randn(b, h, sq, dn + dr, device=DEVICE).to(qdt)
    w = (torch.randn(h * (dn + dv), c, device=DEVICE) * c**-0.5).to(qdt)
    lq, ls = quantize(torch.randn(b, skv, c, device=DEVICE), code, lg, 1)
    rq, rs = quantize(torch.randn(b, skv, 1, dr, device=DEVICE), code, rg, 1)
    attrs = registry.get("mla_attention_kvq").complete_attrs(
        {"scale": (dn + dr) ** -0.5, "causal": True, "window": window, "qk_nope_head_dim": dn, "v_head_dim": dv}
    )
    out = get_launcher("mla_attention_kvq")(q, lq, ls, rq, rs, w, **attrs)
    ref = registry.get("mla_attention_kvq").reference([np_(t) for t in (q, lq, ls, rq, rs, w)], attrs)[0]
    assert out.dtype == qdt and tuple(out.shape) == ref.shape
    assert rel(out, ref) < TOL[qdt]


def _kvq_inputs(code=torch.int8, d=16, sq=1, skv=8):
    q = torch.randn(1, 2, sq, d, device=DEVICE)
    kq = torch.randint(-127, 128, (1, 2, skv, d), device=DEVICE, dtype=torch.int8).to(code)
    s = torch.ones(1, 2, 1, d, device=DEVICE)
    return q, kq, s, kq.clone(), s


def test_clear_errors():
    launch = get_launcher("attention_kvq")
    attrs = registry.get("attention_kvq").complete_attrs({"scale": 0.25})
    q, kq, ks, vq, vs = _kvq_inputs()
    bmap, counts = torch.zeros(1, 1, 1, 2, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(da.DecodeKernelError, match="tiled form"):
        launch(q, kq, ks, vq, vs, bmap, counts, **attrs)
    with pytest.raises(da.DecodeKernelError, match="block-sparse"):
        launch(q, kq, ks, vq, vs, **{**attrs, "layout_block": 4, "layout": (0, 0)})
    with pytest.raises(da.DecodeKernelError, match="bits=4"):
        launch(*_kvq_inputs(torch.float8_e4m3fn), **{**attrs, "bits": 4})
    with pytest.raises(da.DecodeKernelError, match="head dims up to 256"):
        launch(*_kvq_inputs(d=320), **attrs)
    with pytest.raises(da.DecodeKernelError, match="Sq <= Skv"):
        launch(*_kvq_inputs(sq=9), **attrs)
    with pytest.raises(da.DecodeKernelError, match="must share a dtype"):
        launch(q, kq, ks, vq.to(torch.float8_e4m3fn), vs, **attrs)
    with pytest.raises(da.DecodeKernelError, match="q must be"):
        launch(q.to(torch.int32), kq, ks, vq, vs, **attrs)
    with pytest.raises(QuantKernelError, match="x must be"):
        quantize(torch.ones(2, 3, dtype=torch.int32), DType.int8, "per_token", 0)
