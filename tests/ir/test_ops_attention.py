"""attention against torch's scaled_dot_product_attention with an explicit boolean mask (GQA, causal,
sliding window, attention sinks), its mask helper, and its flop count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.ir import registry
from r1c.ir.ops.attention import attention_mask, visible_pairs
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def f32(*shape):
    return TensorType(DType.f32, shape)


def expected_mask(sq: int, skv: int, causal: bool, window: int, sinks: int) -> np.ndarray:
    """The mask from the op's documentation, one (query, key) pair at a time: queries are the newest
    sq tokens; causal hides later keys; window keeps the last `window` keys; the first `sinks` keys stay."""
    out = np.zeros((sq, skv), dtype=bool)
    for i in range(sq):
        p = i + skv - sq  # absolute position of query i
        for j in range(skv):
            visible = (not causal) or j <= p
            if causal and window and not (p - window < j or j < sinks):
                visible = False
            out[i, j] = visible
    return out


masks = st.tuples(st.integers(1, 7), st.integers(1, 9), st.booleans(), st.integers(0, 5), st.integers(0, 3)).map(
    lambda t: (t[0], t[1], t[2], t[3] if t[2] else 0, t[4] if t[2] and t[3] else 0)
)


@settings(max_examples=60, deadline=None)
@given(m=masks)
def test_mask_and_visible_pairs(m):
    sq, skv, causal, window, sinks = m
    want = expected_mask(sq, skv, causal, window, sinks)
    np.testing.assert_array_equal(attention_mask(sq, skv, causal, window, sinks), want)
    assert visible_pairs(sq, skv, causal, window, sinks) == int(want.sum())


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    m=masks,
    dims=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    scale=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_matches_sdpa(run_op, assert_close, b, hkv, group, m, dims, scale, seed):
    sq, skv, causal, window, sinks = m
    dk, dv = dims
    h = hkv * group
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, dk)).astype(np.float32)
    k = rng.standard_normal((b, hkv, skv, dk)).astype(np.float32)
    v = rng.standard_normal((b, hkv, skv, dv)).astype(np.float32)
    (got,) = run_op("attention", [q, k, v], scale=scale, causal=causal, window=window, sinks=sinks)

    mask = expected_mask(sq, skv, causal, window, sinks)
    # Query heads h*group .. h*group+group-1 share k/v head h: that is repeat_interleave, as in enable_gqa.
    kr = _t(k).double().repeat_interleave(group, dim=1)
    vr = _t(v).double().repeat_interleave(group, dim=1)
    want = F.scaled_dot_product_attention(_t(q).double(), kr, vr, attn_mask=_t(mask), scale=scale)
    rows = mask.any(axis=1)  # a query that sees no key: torch gives NaN, r1c defines the output as 0
    assert_close(got[:, :, rows], want[:, :, rows])
    assert np.all(got[:, :, ~rows] == 0)
    if group > 1 and dk == dv:
        gqa = F.scaled_dot_product_attention(
            _t(q).double(), _t(k).double(), _t(v).double(), attn_mask=_t(mask), scale=scale, enable_gqa=True
        )
        assert_close(got[:, :, rows], gqa[:, :, rows])


def test_attention_symbolic_lengths(run_op, assert_close):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
    types = [
        TensorType(DType.f32, ("B", 4, "S", 8)),
        TensorType(DType.f32, ("B", 2, "T", 8)),
        TensorType(DType.f32, ("B", 2, "T", 8)),
    ]
    (got,) = run_op("attention", [q, k, v], types=types, env={"B": 2, "S": 3, "T": 5}, scale=0.3)
    mask = _t(expected_mask(3, 5, True, 0, 0))
    want = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), attn_mask=mask, scale=0.3, enable_gqa=True)
    assert_close(got, want)


A = {"scale": 0.125, "causal": True, "window": 0, "sinks": 0}


@pytest.mark.parametrize(
    "types,attrs,msg",
    [
        ([f32(1, 4, 3, 8), f32(1, 3, 3, 8), f32(1, 3, 3, 8)], A, "multiple"),
        ([f32(1, 4, 3, 8), f32(1, 0, 3, 8), f32(1, 0, 3, 8)], A, "multiple"),
        ([f32(1, 4, 3, 8), f32(1, 2, 3, 4), f32(1, 2, 3, 8)], A, "head dim"),
        ([f32(1, 4, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 5, 8)], A, "length"),
        ([f32(1, 4, 3, 8), f32(2, 2, 3, 8), f32(2, 2, 3, 8)], A, "batch"),
        ([f32(1, 4, 3, 8), f32(1, 2, 3, 8), f32(1, 1, 3, 8)], A, "heads"),
        ([f32(4, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 3, 8)], A, "rank 4"),
        ([f32(1, 4, 3, 8), TensorType(DType.bf16, (1, 2, 3, 8)), f32(1, 2, 3, 8)], A, "dtypes differ"),
        ([f32(1, 4, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 3, 8)], {**A, "window": -1}, ">= 0"),
        ([f32(1, 4, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 3, 8)], {**A, "causal": False, "window": 4}, "causal"),
    ],
)
def test_invalid(types, attrs, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get("attention").infer(types, attrs)
    assert "attention" in str(e.value)


def test_scale_is_required():
    with pytest.raises(OpError, match="attention needs attribute 'scale'"):
        registry.get("attention").complete_attrs({})


def _cost(b, h, hkv, sq, skv, dk, dv, **attrs):
    ins = [f32(b, h, sq, dk), f32(b, hkv, skv, dk), f32(b, hkv, skv, dv)]
    a = {**A, **attrs}
    return registry.get("attention").cost(ins, registry.get("attention").infer(ins, a), a)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    hkv=st.integers(1, 4),
    group=st.integers(1, 4),
    s=st.integers(1, 4096),
    dk=st.sampled_from([64, 192]),
    dv=st.sampled_from([64, 128]),
)
def test_attention_cost(b, hkv, group, s, dk, dv):
    h = hkv * group
    full = _cost(b, h, hkv, s, s, dk, dv, causal=False)
    causal = _cost(b, h, hkv, s, s, dk, dv)
    # Q K^T and P V: 2 flops per multiply-add, over every visible (query, key) pair of every head.
    assert full.flops == 2 * b * h * s * s * (dk + dv)
    assert causal.flops == 2 * b * h * (s * (s + 1) // 2) * (dk + dv)
    assert causal.flops / full.flops == pytest.approx(0.5, abs=0.5 / s + 1e-12)  # causal about halves the work
    assert full.bytes == causal.bytes == 4 * (b * h * s * dk + b * hkv * s * (dk + dv) + b * h * s * dv)


def test_attention_cost_window_and_decode():
    # Sliding window of 128 over 4096 tokens: every query past the first 127 sees exactly 128 keys.
    w = 128
    c = _cost(1, 1, 1, 4096, 4096, 64, 64, window=w)
    assert c.flops == 2 * (w * (w + 1) // 2 + (4096 - w) * w) * 128
    # With 4 sinks, each query at position p >= w + 4 also sees the 4 sink keys.
    c = _cost(1, 1, 1, 4096, 4096, 64, 64, window=w, sinks=4)
    extra = sum(min(4, max(0, p - w + 1)) for p in range(4096))
    assert c.flops == 2 * (w * (w + 1) // 2 + (4096 - w) * w + extra) * 128
    # One decode step sees the whole cache: no halving.
    c = _cost(2, 8, 8, 1, 1000, 64, 64)
    assert c.flops == 2 * 2 * 8 * 1000 * 128


def test_attention_cost_huge_is_closed_form():
    """A 1M-token prefill must not build a 10^12-entry mask to count flops."""
    s = 1 << 20
    c = _cost(1, 1, 1, s, s, 64, 64)
    assert c.flops == 2 * (s * (s + 1) // 2) * 128
