"""Data-movement ops (reshape, transpose, concat, slice, broadcast_to, gather, take, one_hot) against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from r1c.build import BuildError
from r1c.ir import DimList, registry
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def f32(*shape):
    return TensorType(DType.f32, shape)


def _rand(seed: int, shape) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=np.float32)


@settings(max_examples=25, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_reshape_matches_torch(run_op, shape, data, seed):
    x = _rand(seed, shape)
    # A target shape: a random regrouping of the prime factors of numel, maybe with one -1.
    n = int(np.prod(shape))
    factors = [p for p in (2, 3, 5, 7) for _ in range(20) if n % p ** (_ + 1) == 0]
    target = [1] * data.draw(st.integers(1, 4))
    for p in factors:
        target[data.draw(st.integers(0, len(target) - 1))] *= p
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    (got,) = run_op("reshape", [x], shape=target)
    np.testing.assert_array_equal(got, torch.reshape(_t(x), target).numpy())


def test_reshape_symbolic(run_op):
    x = _rand(0, (2, 3, 8))
    types = [TensorType(DType.f32, ("B", "S", 8))]
    (got,) = run_op("reshape", [x], types=types, shape=DimList(["B*S", 2, -1]))
    np.testing.assert_array_equal(got, x.reshape(6, 2, 4))
    (t,) = registry.get("reshape").infer(types, {"shape": DimList(["B*S", 2, -1])})
    assert t.shape == ("B*S", 2, 4)


@settings(max_examples=20, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=5, max_side=4), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_transpose_matches_torch(run_op, shape, data, seed):
    rank = len(shape)
    perm = data.draw(st.permutations(range(rank)))
    perm = [p - rank if data.draw(st.booleans()) else p for p in perm]  # negative axes are allowed
    x = _rand(seed, shape)
    (got,) = run_op("transpose", [x], perm=perm)
    np.testing.assert_array_equal(got, torch.permute(_t(x), perm).numpy())


@settings(max_examples=20, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_concat_matches_torch(run_op, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    parts = [
        _rand(seed + i, tuple(s if j == axis % len(shape) else d for j, d in enumerate(shape)))
        for i, s in enumerate(sizes)
    ]
    (got,) = run_op("concat", parts, axis=axis)
    np.testing.assert_array_equal(got, torch.cat([_t(p) for p in parts], dim=axis).numpy())


@settings(max_examples=30, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=8), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_slice_matches_torch(run_op, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[axis]
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, size + 3))  # past the end clamps, like Python slicing
    if data.draw(st.booleans()) and stop < size:
        stop -= size  # a negative stop counts from the end
    step = data.draw(st.integers(1, 3))
    x = _rand(seed, shape)
    (got,) = run_op("slice", [x], axis=axis, start=start, stop=stop, step=step)
    # torch.narrow + index_select: an independent formulation of start:stop:step.
    end = min(stop if stop >= 0 else stop + size, size)
    idx = torch.arange(start, end, step)
    np.testing.assert_array_equal(got, torch.index_select(_t(x), axis % len(shape), idx).numpy())


@settings(max_examples=20, deadline=None)
@given(shape=array_shapes(min_dims=0, max_dims=3, max_side=4), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_broadcast_to_matches_torch(run_op, shape, data, seed):
    # Set some operand dims to 1 so they broadcast, and prepend new leading dims.
    src = tuple(1 if data.draw(st.booleans()) else d for d in shape)
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    target = lead + shape
    x = _rand(seed, src)
    (got,) = run_op("broadcast_to", [x], shape=list(target))
    np.testing.assert_array_equal(got, _t(x).expand(target).numpy())


def test_broadcast_to_symbolic():
    # A symbol only in the target cannot be bound from broadcast_to's one operand, so the type rule is
    # checked on symbols and the reference on the shape the interpreter would bind.
    x = _rand(0, (1, 4))
    (t,) = registry.get("broadcast_to").infer([f32(1, 4)], {"shape": DimList(["B", 2, 4])})
    assert t.shape == ("B", 2, 4)
    (ref,) = registry.get("broadcast_to").reference([x], {"shape": DimList([3, 2, 4])})
    np.testing.assert_array_equal(ref, _t(x).expand(3, 2, 4).numpy())


@settings(max_examples=20, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=5), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_gather_matches_torch(run_op, shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    n_idx = data.draw(st.integers(1, 6))
    idx_shape = tuple(n_idx if i == axis % len(shape) else d for i, d in enumerate(shape))
    idx = rng.integers(0, shape[axis], idx_shape).astype(np.int32)
    x = _rand(seed, shape)
    (got,) = run_op("gather", [x, idx], axis=axis)
    np.testing.assert_array_equal(got, torch.gather(_t(x), axis, _t(idx).long()).numpy())


@settings(max_examples=20, deadline=None)
@given(
    shape=array_shapes(min_dims=1, max_dims=3, max_side=5),
    idx_shape=array_shapes(min_dims=0, max_dims=2, max_side=4),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_take_matches_torch(run_op, shape, idx_shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    idx = np.asarray(rng.integers(0, shape[axis], idx_shape), dtype=np.int32)
    x = _rand(seed, shape)
    (got,) = run_op("take", [x, idx], axis=axis)
    ax = axis % len(shape)
    want = torch.index_select(_t(x), ax, _t(idx).long().reshape(-1)).reshape(shape[:ax] + idx_shape + shape[ax + 1 :])
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("name,attrs", [("gather", {"axis": 0}), ("take", {"axis": 0})])
def test_index_out_of_range(run_op, name, attrs):
    x = _rand(0, (3, 2))
    for bad in (3, -1):
        idx = np.full((2, 2) if name == "gather" else (2,), bad, np.int32)
        with pytest.raises(Exception, match=f"{name}: index out of range"):
            run_op(name, [x, idx], **attrs)


@pytest.mark.parametrize("dtype", [DType.f32, DType.int32, DType.bf16])
@settings(max_examples=10, deadline=None)
@given(shape=array_shapes(min_dims=0, max_dims=2, max_side=4), depth=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_one_hot_matches_torch(run_op, dtype, shape, depth, seed):
    idx = np.asarray(np.random.default_rng(seed).integers(0, depth, shape), dtype=np.int32)
    (got,) = run_op("one_hot", [idx], depth=depth, dtype=dtype)
    assert got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, F.one_hot(_t(idx).long(), depth).numpy())


@pytest.mark.parametrize(
    "name,types,attrs,msg",
    [
        ("reshape", [f32(2, 3)], {"shape": DimList([4, 2])}, "elements"),
        ("reshape", [f32(2, 3)], {"shape": DimList([-1, -1])}, "at most one -1"),
        ("reshape", [f32(2, 3)], {"shape": DimList([4, -1])}, "cannot infer"),
        ("reshape", [f32(2, 4)], {"shape": DimList([-2, -4])}, "reshape"),
        ("reshape", [f32(2, 4)], {"shape": DimList(["B+1", 8])}, "reshape"),
        ("transpose", [f32(2, 3)], {"perm": (0, 0)}, "permutation"),
        ("transpose", [f32(2, 3)], {"perm": (0, 1, 2)}, "permutation"),
        ("transpose", [f32(2, 3)], {"perm": (0, 2)}, "permutation"),
        ("concat", [f32(2, 3), f32(2, 4)], {"axis": 0}, "axis 1"),
        ("concat", [f32(2, 3), f32(2, 3, 1)], {"axis": 0}, "ranks differ"),
        ("concat", [f32(2, 3), TensorType(DType.bf16, (2, 3))], {"axis": 0}, "dtypes differ"),
        ("concat", [f32(2, 3)], {"axis": 2}, "out of range"),
        ("concat", [TensorType(DType.f32, ("S", 3)), f32(2, 3)], {"axis": 0}, "static"),
        ("slice", [f32(4)], {"axis": 0, "start": 0, "stop": 4, "step": 0}, "step"),
        ("slice", [f32(4)], {"axis": 0, "start": 4, "stop": 6, "step": 1}, "out of range"),
        ("slice", [f32(4)], {"axis": 0, "start": 2, "stop": 2, "step": 1}, "empty"),
        ("slice", [f32(4)], {"axis": 1, "start": 0, "stop": 1, "step": 1}, "out of range"),
        ("broadcast_to", [f32(2, 3)], {"shape": DimList([3])}, "lower rank"),
        ("broadcast_to", [f32(2, 3)], {"shape": DimList([4, 3])}, "does not broadcast"),
        ("broadcast_to", [f32(2, 3)], {"shape": DimList([2, -3])}, "broadcast_to"),
        ("gather", [f32(2, 3), TensorType(DType.f32, (2, 3))], {"axis": 0}, "int32"),
        ("gather", [f32(2, 3), TensorType(DType.int32, (2,))], {"axis": 0}, "rank"),
        ("gather", [f32(2, 3), TensorType(DType.int32, (2, 4))], {"axis": 0}, "axis 1"),
        ("take", [f32(2, 3), TensorType(DType.f32, (2,))], {"axis": 0}, "int32"),
        ("take", [f32(2, 3), TensorType(DType.int32, (2,))], {"axis": 2}, "out of range"),
        ("one_hot", [f32(2)], {"depth": 3, "dtype": DType.f32}, "int32"),
        ("one_hot", [TensorType(DType.int32, (2,))], {"depth": 0, "dtype": DType.f32}, "depth"),
    ],
)
def test_invalid(name, types, attrs, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get(name).infer(types, attrs)
    assert name in str(e.value)


def test_builder_reports_bad_reshape():
    from r1c import build

    mb = build.ModuleBuilder("bad")
    f = mb.function("forward", x=f32(2, 3))
    with pytest.raises(BuildError, match="reshape"):
        f.reshape(f.args[0], shape=[5, -1])


def test_traffic_costs():
    """Data movement does no arithmetic and moves at least its output."""
    for name, ins, attrs in [
        ("transpose", [f32(4, 8)], {"perm": (1, 0)}),
        ("concat", [f32(4, 8), f32(2, 8)], {"axis": 0}),
        ("slice", [f32(4, 8)], {"axis": 1, "start": 0, "stop": 4, "step": 1}),
        ("gather", [f32(4, 8), TensorType(DType.int32, (4, 2))], {"axis": 1}),
    ]:
        outs = registry.get(name).infer(ins, attrs)
        c = registry.get(name).cost(ins, outs, attrs)
        out_bytes = sum(int(np.prod(o.shape)) * o.dtype.itemsize for o in outs)
        in_bytes = sum(int(np.prod(i.shape)) * i.dtype.itemsize for i in ins)
        assert c.flops == 0 and c.bytes == in_bytes + out_bytes, name
