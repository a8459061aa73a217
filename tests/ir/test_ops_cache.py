"""cache_write and cached_attention (ir/ops/cache.py): type rules, references against torch SDPA on each row's
prefix (random fill levels, GQA), the error for a step that does not fit, cost, and no VJP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.ir import registry
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType

WRITE, ATTN = registry.get("cache_write"), registry.get("cached_attention")


def f32(*shape):
    return TensorType(DType.f32, shape)


def i32(*shape):
    return TensorType(DType.int32, shape)


def test_types():
    cache, new, start = f32(2, "B", 4, "C", 8), f32("B", 4, "S", 8), i32("B")
    assert WRITE.type_rule([cache, new, start], {"layer": 1}) == [cache]
    q = f32("B", 8, "S", 8)
    out = ATTN.type_rule([q, cache, f32(2, "B", 4, "C", 6), start], {"layer": 0, "scale": 0.1})
    assert out == [f32("B", 8, "S", 6)]


@pytest.mark.parametrize(
    "ins,attrs,msg",
    [
        ((f32(2, 3, 4, 9, 8), f32(3, 4, 1, 8), i32(3)), {"layer": 2}, "layer 2 is out of range"),
        ((f32(2, 3, 4, 9, 8), f32(3, 4, 1, 6), i32(3)), {"layer": 0}, "head dim of cache and new"),
        ((f32(2, 3, 4, 9, 8), f32(3, 4, 1, 8), f32(3)), {"layer": 0}, "start must be int32"),
        ((f32(2, 3, 4, 9, 8), f32(3, 4, 1, 8), i32(2)), {"layer": 0}, "batch of start"),
        ((f32(3, 4, 9, 8), f32(3, 4, 1, 8), i32(3)), {"layer": 0}, "rank 5"),
    ],
)
def test_write_rule_errors(ins, attrs, msg):
    with pytest.raises(OpError, match=msg):
        WRITE.type_rule(list(ins), attrs)


def test_attention_rule_errors():
    cache = f32(2, 3, 4, 9, 8)
    with pytest.raises(OpError, match="6 query heads are not a multiple of 4"):
        ATTN.type_rule([f32(3, 6, 1, 8), cache, cache, i32(3)], {"layer": 0, "scale": 1.0})
    with pytest.raises(OpError, match="head dim of q and k_cache"):
        ATTN.type_rule([f32(3, 4, 1, 4), cache, cache, i32(3)], {"layer": 0, "scale": 1.0})


def test_write_reference():
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((2, 3, 2, 6, 4)).astype(np.float32)
    new = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    start = np.array([0, 3, 4], np.int32)
    (out,) = WRITE.reference([cache, new, start], {"layer": 1})
    want = cache.copy()
    for b, s in enumerate(start):
        want[1, b, :, s : s + 2] = new[b]
    np.testing.assert_array_equal(out, want)
    assert np.array_equal(cache[1, 0, :, :2], cache[1, 0, :, :2]) and not np.shares_memory(out, cache)


@pytest.mark.parametrize("op,extra", [(WRITE, {}), (ATTN, {"scale": 1.0})])
def test_step_past_the_cache_is_an_error(op, extra):
    cache = np.zeros((1, 2, 1, 5, 4), np.float32)
    start = np.array([0, 4], np.int32)  # row 1: slots 4 and 5 of 5
    step = np.ones((2, 1, 2, 4), np.float32)
    ins = [cache, step, start] if op is WRITE else [step, cache, cache, start]
    with pytest.raises(OpError, match="row 1 starts at 4 with 2 new token"):
        op.reference(ins, {"layer": 0, **extra})


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 2),
    g=st.integers(1, 3),
    sq=st.integers(1, 4),
    slots=st.integers(4, 9),
    seed=st.integers(0, 2**16),
)
def test_cached_attention_is_causal_attention_on_each_prefix(b, hkv, g, sq, slots, seed):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, slots - sq + 1, b).astype(np.int32)
    q = rng.standard_normal((b, hkv * g, sq, 8))
    k, v = rng.standard_normal((2, b, hkv, slots, 8)), rng.standard_normal((2, b, hkv, slots, 5))
    (out,) = ATTN.reference([q, k, v, start], {"layer": 1, "scale": 0.4})
    for r in range(b):
        n = int(start[r]) + sq
        kr = torch.as_tensor(k[1, r, :, :n]).repeat_interleave(g, 0)
        vr = torch.as_tensor(v[1, r, :, :n]).repeat_interleave(g, 0)
        mask = torch.ones(sq, n, dtype=torch.bool).tril(n - sq)  # queries are the newest sq of n tokens
        want = F.scaled_dot_product_attention(torch.as_tensor(q[r]), kr, vr, attn_mask=mask, scale=0.4)
        np.testing.assert_allclose(out[r], want.numpy(), rtol=1e-10, atol=1e-12)


def test_cost_and_no_vjp():
    cache, q, start = f32(2, 4, 2, 16, 8), f32(4, 4, 1, 8), i32(4)
    (out,) = ATTN.type_rule([q, cache, cache, start], {"layer": 0, "scale": 1.0})
    cost = ATTN.cost([q, cache, cache, start], [out], {"layer": 0, "scale": 1.0})
    assert cost.flops == 2 * 4 * 4 * 1 * 16 * 16  # every slot visible: the upper bound
    assert cost.bytes == 4 * (4 * 4 * 8 + 4 * 2 * 16 * 16 + 4 * 4 * 8)  # q, one layer of K and V, out
    assert WRITE.cost([cache, f32(4, 2, 1, 8), start], [cache], {"layer": 0}).bytes == 4 * (2 * 64 + 4)
    for op in (WRITE, ATTN):
        with pytest.raises(OpError, match="not differentiable"):
            op.vjp(None, type("FakeOp", (), {"name": op.name})(), [None])
