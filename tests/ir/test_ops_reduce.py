"""Reductions, argmax, softmax/log_softmax, cumsum and topk against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from r1c.ir import registry
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def f32(*shape):
    return TensorType(DType.f32, shape)


@st.composite
def shape_and_axes(draw, min_dims: int = 1):
    shape = draw(array_shapes(min_dims=min_dims, max_dims=4, max_side=5))
    rank = len(shape)
    picked = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    # Spell some axes negatively: the rule and the reference must agree on what -1 means.
    axes = tuple(a - rank if draw(st.booleans()) else a for a in picked)
    return shape, axes


TORCH_REDUCE = {
    "reduce_sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "reduce_mean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "reduce_max": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
}


@pytest.mark.parametrize("name", sorted(TORCH_REDUCE))
@settings(max_examples=12, deadline=None)
@given(sa=shape_and_axes(), keepdims=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_reduce_matches_torch(run_op, assert_close, name, sa, keepdims, seed):
    shape, axes = sa
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (got,) = run_op(name, [x], axes=list(axes), keepdims=keepdims)
    assert_close(got, TORCH_REDUCE[name](_t(x).double(), axes, keepdims))


def test_reduce_sum_int(run_op):
    x = np.random.default_rng(0).integers(-9, 9, (3, 4, 5)).astype(np.int32)
    (got,) = run_op("reduce_sum", [x], axes=[0, -1])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, torch.sum(_t(x), dim=(0, -1)).numpy())


@settings(max_examples=20, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=5), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_argmax_matches_torch(run_op, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (got,) = run_op("argmax", [x], axis=axis)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, torch.argmax(_t(x), dim=axis).numpy())


def test_argmax_ties_pick_first(run_op):
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    (got,) = run_op("argmax", [x], axis=1)
    np.testing.assert_array_equal(got, [1, 0])


@pytest.mark.parametrize("name,fn", [("softmax", torch.softmax), ("log_softmax", torch.log_softmax)])
@settings(max_examples=15, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=6), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_softmax_matches_torch(run_op, assert_close, name, fn, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    # Large logits: a reference without max subtraction would overflow here.
    x = (np.random.default_rng(seed).standard_normal(shape) * 40).astype(np.float32)
    (got,) = run_op(name, [x], axis=axis)
    assert np.all(np.isfinite(got))
    assert_close(got, fn(_t(x).double(), dim=axis))


def test_softmax_masked_entries(run_op):
    x = np.array([[0.5, -np.inf, 1.5], [-np.inf, 2.0, -np.inf]], np.float32)
    (got,) = run_op("softmax", [x], axis=-1)
    np.testing.assert_allclose(got, torch.softmax(_t(x), dim=-1).numpy(), rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=6), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_cumsum_matches_torch(run_op, assert_close, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (got,) = run_op("cumsum", [x], axis=axis)
    assert_close(got, torch.cumsum(_t(x).double(), dim=axis))


@settings(max_examples=25, deadline=None)
@given(
    shape=array_shapes(min_dims=1, max_dims=3, max_side=7),
    data=st.data(),
    largest=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_matches_torch(run_op, shape, data, largest, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    k = data.draw(st.integers(1, shape[axis]))
    # A permutation of distinct values: torch does not promise an order among ties.
    x = np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32) - 3.5
    vals, idx = run_op("topk", [x], k=k, axis=axis, largest=largest)
    tv, ti = torch.topk(_t(x), k, dim=axis, largest=largest, sorted=True)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(vals, tv.numpy())
    np.testing.assert_array_equal(idx, ti.numpy())


def test_topk_ties_lower_index_first(run_op):
    x = np.array([[1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    vals, idx = run_op("topk", [x], k=3)
    np.testing.assert_array_equal(vals, [[2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(idx, [[1, 2, 4]])
    vals, idx = run_op("topk", [-x], k=2, largest=False)
    np.testing.assert_array_equal(idx, [[1, 2]])


def test_topk_int_extremes(run_op):
    """Negating the key would overflow at INT_MIN and sort it first; it must come last."""
    x = np.array([[5, np.iinfo(np.int32).min, 7, -1]], np.int32)
    vals, idx = run_op("topk", [x], k=4)
    np.testing.assert_array_equal(vals, [[7, 5, -1, np.iinfo(np.int32).min]])
    np.testing.assert_array_equal(idx, [[2, 0, 3, 1]])


def test_topk_nan_ranks_largest_like_torch(run_op):
    x = np.array([[0.5, np.nan, 2.0, -1.0]], np.float32)
    for largest in (True, False):
        vals, idx = run_op("topk", [x], k=2, largest=largest)
        tv, ti = torch.topk(_t(x), 2, largest=largest)
        np.testing.assert_array_equal(idx, ti.numpy())
        np.testing.assert_array_equal(vals, tv.numpy())  # NaN compares equal to NaN here


@pytest.mark.parametrize(
    "name,types,attrs,msg",
    [
        ("reduce_sum", [f32(2, 3)], {"axes": (2,), "keepdims": False}, "out of range"),
        ("reduce_sum", [f32(2, 3)], {"axes": (0, -2), "keepdims": False}, "repeated"),
        ("reduce_max", [f32(2, 3)], {"axes": (), "keepdims": False}, "axis"),
        ("reduce_mean", [TensorType(DType.int32, (2, 3))], {"axes": (0,), "keepdims": False}, "float"),
        ("argmax", [f32(2, 3)], {"axis": -3}, "out of range"),
        ("softmax", [f32(2, 3)], {"axis": 2}, "out of range"),
        ("softmax", [TensorType(DType.int32, (2, 3))], {"axis": -1}, "float"),
        ("log_softmax", [TensorType(DType.int32, (2, 3))], {"axis": -1}, "float"),
        ("cumsum", [f32(4)], {"axis": 1}, "out of range"),
        ("topk", [f32(2, 3)], {"k": 4, "axis": -1, "largest": True}, "out of range"),
        ("topk", [f32(2, 3)], {"k": 0, "axis": -1, "largest": True}, "out of range"),
        ("topk", [f32(2, 3)], {"k": 1, "axis": 2, "largest": True}, "out of range"),
    ],
)
def test_invalid(name, types, attrs, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get(name).infer(types, attrs)
    assert name in str(e.value)


def test_bad_attribute_kinds():
    with pytest.raises(OpError, match="'k' of topk must be int"):
        registry.get("topk").complete_attrs({"k": 1.5})
    with pytest.raises(OpError, match="topk needs attribute 'k'"):
        registry.get("topk").complete_attrs({})
    with pytest.raises(OpError, match="'axes' of reduce_sum must be ints"):
        registry.get("reduce_sum").complete_attrs({"axes": [0.5]})


def test_topk_symbolic_axis_type():
    vals, idx = registry.get("topk").infer([TensorType(DType.f32, ("T", 64))], {"k": 8, "axis": -1, "largest": True})
    assert vals.shape == ("T", 8) and idx == TensorType(DType.int32, ("T", 8))
