"""The KV-quantization ops (ir/ops/quant.py): the error model of quantize/dequantize, attention_kvq and the
absorbed mla_attention_kvq against the unfused attention on dequantized K/V, costs, and VJPs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.build import ModuleBuilder, tensor
from r1c.ir import registry
from r1c.ir.interpreter import run
from r1c.ir.ops.quant import qmax
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType

FORMATS = [(DType.int8, 8), (DType.int8, 4), (DType.fp8e4m3, 8)]


def _ref(name: str, ins: list[np.ndarray], **attrs) -> list[np.ndarray]:
    opdef = registry.get(name)
    return opdef.reference(ins, opdef.complete_attrs(attrs))


def _quant(x: np.ndarray, dtype: DType, bits: int, granularity: str, token_axis: int = 1):
    return _ref("quantize", [x], dtype=dtype, bits=bits, granularity=granularity, token_axis=token_axis)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    fmt=st.sampled_from(FORMATS),
    granularity=st.sampled_from(["per_token", "per_channel"]),
    log_mag=st.floats(-6, 6),
    seed=st.integers(0, 2**16),
)
def test_quantize_error_model(shape, fmt, granularity, log_mag, seed):
    """int: |x - q*s| <= s/2; fp8: <= 2^-4 |x| for normal numbers, 2^-10 s below; codes stay in range."""
    dtype, bits = fmt
    x = (np.random.default_rng(seed).standard_normal(shape) * 10.0**log_mag).astype(np.float32)
    token_axis = len(shape) - 2
    q, scale = _quant(x, dtype, bits, granularity, token_axis)
    assert scale.dtype == np.float32 and scale.ndim == x.ndim
    reduced = (token_axis,) if granularity == "per_channel" else tuple(range(token_axis + 1, x.ndim))
    assert all((scale.shape[i] == 1) == (i in reduced) or x.shape[i] == 1 for i in range(x.ndim))
    s = np.broadcast_to(scale.astype(np.float64), x.shape)
    err = np.abs(x - q.astype(np.float64) * s)
    slack = 1e-6 * np.abs(x) + 1e-30  # float32 scale rounding
    if dtype == DType.int8:
        assert q.dtype == np.int8 and np.abs(q).max() <= qmax(dtype, bits)
        assert np.all(err <= s / 2 + slack)
    else:
        assert np.abs(q).max() <= 448.0
        assert np.all(err <= np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * s) + slack)
    (back,) = _ref("dequantize", [q, scale])
    assert np.array_equal(back, q.astype(np.float64) * scale.astype(np.float64))


def test_quantize_zero_group_and_exact_extremes():
    x = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], np.float32)[None]
    q, scale = _quant(x, DType.int8, 8, "per_token")
    assert scale[0, 0, 0] == 0 and not q[0, 0].any()  # an all-zero token quantizes to zeros, not NaN
    assert q[0, 1, 1] == -127  # amax maps to the largest code
    (back,) = _ref("dequantize", [q, scale])
    assert back[0, 1, 1] == pytest.approx(-2.0, rel=1e-6)


def _attn_inputs(rng, b, h, hkv, sq, skv, dk, dv):
    return (
        rng.standard_normal((b, h, sq, dk)),
        rng.standard_normal((b, hkv, skv, dk)).astype(np.float32),
        rng.standard_normal((b, hkv, skv, dv)).astype(np.float32),
    )


@settings(max_examples=30, deadline=None)
@given(
    hkv=st.integers(1, 2),
    rep=st.integers(1, 2),
    s=st.integers(1, 9),
    window=st.integers(0, 4),
    fmt=st.sampled_from(FORMATS),
    tiled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_kvq_is_attention_on_dequantized_kv(hkv, rep, s, window, fmt, tiled, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _attn_inputs(rng, 2, hkv * rep, hkv, s, s, 4, 3)
    dtype, bits = fmt
    kq, ks = _quant(k, dtype, bits, "per_channel", 2)
    vq, vs = _quant(v, dtype, bits, "per_token", 2)
    mask = {"causal": True, "window": window, "sinks": 1 if window else 0}
    maps = _ref("attention_block_map", [q, k], block_q=3, block_k=2, **mask) if tiled else []
    tiles = {"block_q": 3, "block_k": 2} if tiled else {}
    (got,) = _ref("attention_kvq", [q, kq, ks, vq, vs, *maps], scale=0.5, bits=bits, **mask, **tiles)
    (want,) = _ref("attention", [q, kq * ks.astype(np.float64), vq * vs.astype(np.float64)], scale=0.5, **mask)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _unfused_mla(q, latent, k_rot, w, dn, dv, mask):
    """The stdlib's mla block on given latent and rotary key: per-head K/V through kv_b, then attention."""
    b, s, _ = latent.shape
    h = q.shape[1]
    kv = (latent @ w.T).reshape(b, s, h, dn + dv)
    k = np.concatenate([kv[..., :dn], np.broadcast_to(k_rot, (b, s, h, k_rot.shape[3]))], axis=-1)
    (o,) = _ref("attention", [q, k.transpose(0, 2, 1, 3), kv[..., dn:].transpose(0, 2, 1, 3)], **mask)
    return o


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 3),
    dn=st.integers(1, 5),
    dr=st.integers(1, 4),
    dv=st.integers(1, 5),
    c=st.integers(1, 6),
    s=st.integers(1, 8),
    causal=st.booleans(),
    fmt=st.sampled_from(FORMATS),
    tiled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_absorbed_mla_equals_unfused_mla(h, dn, dr, dv, c, s, causal, fmt, tiled, seed):
    """The absorbed form (q through W_UK, attention over the latent, W_UV after) is the stdlib's MLA on the
    dequantized cache, up to float rounding."""
    rng = np.random.default_rng(seed)
    b = 2
    q = rng.standard_normal((b, h, s, dn + dr))
    latent = rng.standard_normal((b, s, c)).astype(np.float32)
    k_rot = rng.standard_normal((b, s, 1, dr)).astype(np.float32)
    w = rng.standard_normal((h * (dn + dv), c)).astype(np.float32)
    dtype, bits = fmt
    lq, ls = _quant(latent, dtype, bits, "per_token")
    rq, rs = _quant(k_rot, dtype, bits, "per_channel")
    mask = {"causal": causal}
    maps = _ref("attention_block_map", [q, q], block_q=2, block_k=3, **mask) if tiled else []
    tiles = {"block_q": 2, "block_k": 3} if tiled else {}
    attrs = {"qk_nope_head_dim": dn, "v_head_dim": dv, "bits": bits, "scale": 0.4, **mask, **tiles}
    (got,) = _ref("mla_attention_kvq", [q, lq, ls, rq, rs, w, *maps], **attrs)
    want = _unfused_mla(
        q, lq * ls.astype(np.float64), rq * rs.astype(np.float64), w.astype(np.float64), dn, dv, {"scale": 0.4, **mask}
    )
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def _t(dtype: str, *shape: int) -> TensorType:
    return TensorType(DType(dtype), shape)


def test_costs_read_fewer_kv_bytes():
    """Quantized K/V cost 1 byte (4-bit: half) per element instead of 4, plus the scales."""
    b, h, s, d = 1, 8, 1024, 64
    q, kv, out = _t("f32", b, h, s, d), _t("f32", b, h, s, d), [_t("f32", b, h, s, d)]
    dense = registry.get("attention").cost([q, kv, kv], out, {"scale": 1.0, "causal": True, "window": 0, "sinks": 0})
    opdef = registry.get("attention_kvq")
    kq, ks, vs = _t("int8", b, h, s, d), _t("f32", b, h, 1, d), _t("f32", b, h, s, 1)
    by_bits = {}
    for bits in (8, 4):
        attrs = opdef.complete_attrs({"scale": 1.0, "bits": bits})
        by_bits[bits] = opdef.cost([q, kq, ks, kq, vs], out, attrs)
    kv_bytes = 2 * b * h * s * d
    assert by_bits[8].bytes == dense.bytes - 2 * 4 * b * h * s * d + kv_bytes + 4 * (b * h * d + b * h * s)
    assert by_bits[4].bytes == by_bits[8].bytes - kv_bytes // 2
    assert by_bits[8].flops == dense.flops + 2 * b * h * s * d  # one dequantizing multiply per K/V element
    qd = registry.get("quantize")
    qc = qd.cost([kv], [kq, ks], qd.complete_attrs({"bits": 4, "granularity": "per_channel", "token_axis": 2}))
    assert qc.bytes == 4 * b * h * s * d + b * h * s * d // 2 + 4 * b * h * d


def test_mla_cost_counts_the_latent_not_per_head_kv():
    opdef = registry.get("mla_attention_kvq")
    b, h, s, dn, dr, dv, c = 1, 16, 4096, 128, 64, 128, 512
    ins = [_t("f32", b, h, 1, dn + dr), _t("int8", b, s, c), _t("f32", b, s, 1), _t("int8", b, s, 1, dr)]
    ins += [_t("f32", b, 1, 1, dr), _t("f32", h * (dn + dv), c)]
    attrs = opdef.complete_attrs({"scale": 1.0, "qk_nope_head_dim": dn, "v_head_dim": dv})
    (out,) = opdef.infer(ins, attrs)
    cost = opdef.cost(ins, [out], attrs)
    weights_and_q = 4 * (h * (dn + dr) + h * (dn + dv) * c + h * dv)
    assert cost.bytes == weights_and_q + s * c + s * dr + 4 * (s + dr)  # one byte per cached element


def test_type_errors_name_the_op():
    opdef = registry.get("attention_kvq")
    attrs = opdef.complete_attrs({"scale": 1.0})
    q, k = _t("f32", 1, 2, 4, 8), _t("f32", 1, 2, 4, 8)
    with pytest.raises(OpError, match="attention_kvq: k must be int8 or fp8e4m3"):
        opdef.infer([q, k, _t("f32", 1, 2, 1, 8), k, _t("f32", 1, 2, 4, 1)], attrs)
    kq = _t("int8", 1, 2, 4, 8)
    with pytest.raises(OpError, match="attention_kvq: k scale dim 2"):
        opdef.infer([q, kq, _t("f32", 1, 2, 3, 8), kq, _t("f32", 1, 2, 4, 1)], attrs)
    with pytest.raises(OpError, match="fp8e4m3 quantization stores 8 bits"):
        registry.get("quantize").infer(
            [q], registry.get("quantize").complete_attrs({"dtype": DType.fp8e4m3, "bits": 4})
        )
    with pytest.raises(OpError, match="token_axis must not be the last axis"):
        registry.get("quantize").infer([q], registry.get("quantize").complete_attrs({"token_axis": -1}))


def test_quantize_and_fused_ops_refuse_differentiation():
    for name in ("quantize", "attention_kvq", "mla_attention_kvq"):
        with pytest.raises(OpError, match="inference transform"):
            registry.get(name).vjp(None, type("Op", (), {"name": name})(), [None])


def test_dequantize_vjp():
    """y = q * scale with fp8 q: dq = g * scale, dscale = per-group sum of g * q (checked by the interpreter)."""
    mb = ModuleBuilder("dq")
    fb = mb.function("forward", q=tensor("fp8e4m3", [2, 3, 4]), s=tensor("f32", [2, 1, 4]), g=tensor("f32", [2, 3, 4]))
    q, s, g = fb.args
    y = fb.dequantize(q, s)
    dq, ds = registry.get("dequantize").vjp(fb, fb.function.body[-1], [g])
    assert dq.type == q.type and ds.type == s.type
    fb.ret(y, dq, ds)
    m = mb.build()
    rng = np.random.default_rng(3)
    qv, sv, gv = rng.standard_normal((2, 3, 4)), rng.random((2, 1, 4)) + 0.1, rng.standard_normal((2, 3, 4))
    qv = _quant(qv.astype(np.float32), DType.fp8e4m3, 8, "per_token")[0]
    _, got_dq, got_ds = run(m, [qv, sv, gv], {})
    np.testing.assert_allclose(got_dq, gv * sv, rtol=2.0**-4)  # g * scale, rounded to q's fp8 type
    np.testing.assert_allclose(got_ds, (gv * qv).sum(axis=1, keepdims=True), rtol=1e-5)
    ints = ModuleBuilder("dq8").function(
        "forward", q=tensor("int8", [2, 4]), s=tensor("f32", [2, 1]), g=tensor("f32", [2, 4])
    )
    ints.dequantize(ints.args[0], ints.args[1])
    d_int, d_scale = registry.get("dequantize").vjp(ints, ints.function.body[-1], [ints.args[2]])
    assert d_int is None and d_scale.type == ints.args[1].type  # integer codes get no gradient, scales do
