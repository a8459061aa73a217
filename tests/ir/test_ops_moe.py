"""moe_experts against a straightforward torch loop over tokens and their routed experts."""

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


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).double()


def torch_moe(x, ids, w, wg, wu, wd) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
            out[t] += w[t, j] * (wd[e] @ h)
    return out


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 6),
    e=st.integers(1, 5),
    data=st.data(),
    fd=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**32 - 1),
)
def test_moe_matches_torch_loop(run_op, assert_close, t, e, data, fd, seed):
    f, d = fd
    k = data.draw(st.integers(1, e))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    # Distinct experts per token, as a top-k router gives; some tests below also repeat one.
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    wg, wu = (rng.standard_normal((e, f, d)).astype(np.float32) * 0.5 for _ in range(2))
    wd = rng.standard_normal((e, d, f)).astype(np.float32) * 0.5
    (got,) = run_op("moe_experts", [x, ids, w, wg, wu, wd])
    assert_close(got, torch_moe(*(_t(a) for a in (x, ids, w, wg, wu, wd))))


def test_moe_repeated_expert_and_unused_experts(run_op, assert_close):
    """The same expert twice for one token adds up both weights; experts nobody routes to contribute nothing."""
    rng = np.random.default_rng(3)
    e, f, d = 6, 3, 4
    x = rng.standard_normal((3, d)).astype(np.float32)
    ids = np.array([[2, 2], [0, 2], [2, 5]], np.int32)
    w = rng.random((3, 2)).astype(np.float32)
    wg, wu = rng.standard_normal((e, f, d)).astype(np.float32), rng.standard_normal((e, f, d)).astype(np.float32)
    wd = rng.standard_normal((e, d, f)).astype(np.float32)
    (got,) = run_op("moe_experts", [x, ids, w, wg, wu, wd])
    assert_close(got, torch_moe(*(_t(a) for a in (x, ids, w, wg, wu, wd))))


def test_moe_expert_out_of_range(run_op):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    wg = rng.standard_normal((3, 2, 4)).astype(np.float32)
    wd = rng.standard_normal((3, 4, 2)).astype(np.float32)
    w = np.ones((2, 1), np.float32)
    for bad in (3, -1):
        with pytest.raises(Exception, match="moe_experts: expert id out of range"):
            run_op("moe_experts", [x, np.array([[0], [bad]], np.int32), w, wg, wg, wd])


def f32(*shape):
    return TensorType(DType.f32, shape)


def i32(*shape):
    return TensorType(DType.int32, shape)


GOOD = [f32(5, 8), i32(5, 2), f32(5, 2), f32(4, 16, 8), f32(4, 16, 8), f32(4, 8, 16)]


def _with(i: int, t: TensorType) -> list[TensorType]:
    return [t if j == i else g for j, g in enumerate(GOOD)]


@pytest.mark.parametrize(
    "types,msg",
    [
        (_with(0, f32(5, 8, 1)), "rank 2"),
        (_with(1, f32(5, 2)), "expert ids"),
        (_with(1, i32(4, 2)), "tokens of ids"),
        (_with(2, f32(5, 3)), "top-k"),
        (_with(2, i32(5, 2)), "float"),
        (_with(4, f32(4, 12, 8)), "differ"),
        (_with(3, f32(4, 16, 7)), "differ"),
        (_with(5, f32(3, 8, 16)), "experts"),
        (_with(5, f32(4, 8, 12)), "ffn dim"),
        (_with(5, TensorType(DType.bf16, (4, 8, 16))), "dtypes differ"),
        (GOOD[:5], "operands"),
    ],
)
def test_invalid(types, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get("moe_experts").infer(types, {})
    assert "moe_experts" in str(e.value)


def test_good_type():
    assert registry.get("moe_experts").infer(GOOD, {}) == [GOOD[0]]
    sym = [TensorType(DType.f32, ("T", 8)), TensorType(DType.int32, ("T", 2)), TensorType(DType.f32, ("T", 2))] + GOOD[
        3:
    ]
    assert registry.get("moe_experts").infer(sym, {}) == [sym[0]]


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 4096),
    e=st.integers(1, 256),
    k=st.integers(1, 8),
    f=st.sampled_from([64, 2048]),
    d=st.sampled_from([128, 7168]),
)
def test_moe_cost(t, e, k, f, d):
    ins = [
        TensorType(DType.bf16, (t, d)),
        TensorType(DType.int32, (t, k)),
        TensorType(DType.f32, (t, k)),
        TensorType(DType.bf16, (e, f, d)),
        TensorType(DType.bf16, (e, f, d)),
        TensorType(DType.bf16, (e, d, f)),
    ]
    opdef = registry.get("moe_experts")
    c = opdef.cost(ins, opdef.infer(ins, {}), {})
    # Per routed (token, expert) pair: gate and up projections (2*F*D each), down projection (2*D*F), and the
    # SwiGLU between them, costed as the swiglu op costs an F-vector.
    swiglu = registry.get("swiglu").cost([TensorType(DType.bf16, (f,))] * 2, [TensorType(DType.bf16, (f,))], {})
    assert c.flops == t * k * (3 * 2 * f * d + swiglu.flops)
    # Weights are read once per expert that can be touched (at most t*k of them), not once per token.
    touched = min(e, t * k)
    assert c.bytes == 2 * t * d + 4 * t * k + 4 * t * k + touched * 3 * f * d * 2 + 2 * t * d
