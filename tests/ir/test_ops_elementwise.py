"""Elementwise ops (unary, binary, comparisons, logical, where, swiglu) against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from r1c.build import BuildError
from r1c.ir import registry
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType

# Each unary op: torch implementation and the input domain it is defined on.
UNARY = {
    "neg": (torch.neg, "any"),
    "exp": (torch.exp, "any"),
    "log": (torch.log, "positive"),
    "sqrt": (torch.sqrt, "positive"),
    "rsqrt": (torch.rsqrt, "positive"),
    "reciprocal": (torch.reciprocal, "nonzero"),
    "abs": (torch.abs, "any"),
    "square": (torch.square, "any"),
    "tanh": (torch.tanh, "any"),
    "sigmoid": (torch.sigmoid, "any"),
    "silu": (F.silu, "any"),
    "gelu": (lambda x: F.gelu(x, approximate="none"), "any"),
    "relu": (F.relu, "any"),
    "softplus": (lambda x: F.softplus(x, beta=1.0, threshold=1e9), "any"),  # no linear cut-off: exact log(1+e^x)
    "sin": (torch.sin, "any"),
    "cos": (torch.cos, "any"),
}


def _t(x) -> torch.Tensor:
    """numpy -> torch, also for the 0-d results numpy gives as scalars."""
    return torch.as_tensor(np.asarray(x))


def _data(rng: np.random.Generator, shape: tuple[int, ...], domain: str = "any", scale: float = 3.0) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * scale
    if domain == "positive":
        x = np.abs(x) + 0.05
    elif domain == "nonzero":
        x = np.where(np.abs(x) < 0.05, 0.5, x).astype(np.float32)
    return np.asarray(x, dtype=np.float32)


@pytest.mark.parametrize("name", sorted(UNARY))
@settings(max_examples=8, deadline=None)
@given(shape=array_shapes(min_dims=0, max_dims=4, max_side=5), seed=st.integers(0, 2**32 - 1))
def test_unary_matches_torch(run_op, assert_close, name, shape, seed):
    fn, domain = UNARY[name]
    x = _data(np.random.default_rng(seed), shape, domain)
    (got,) = run_op(name, [x])
    assert_close(got, fn(_t(x).double()))


def test_unary_float_only_rejects_ints():
    for name in UNARY:
        t = TensorType(DType.int32, (3,))
        if name in ("neg", "abs", "square", "relu"):
            assert registry.get(name).infer([t], {}) == [t]
        else:
            with pytest.raises(OpError, match=name):
                registry.get(name).infer([t], {})


@pytest.mark.parametrize("name", ["neg", "abs", "square", "relu"])
def test_unary_on_ints(run_op, name):
    x = np.random.default_rng(1).integers(-50, 50, (4, 5)).astype(np.int32)
    (got,) = run_op(name, [x])
    want = {"neg": torch.neg, "abs": torch.abs, "square": torch.square, "relu": F.relu}[name](_t(x))
    np.testing.assert_array_equal(got, want.numpy())


BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}
COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


@pytest.mark.parametrize("name", sorted(BINARY))
@settings(max_examples=8, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4), seed=st.integers(0, 2**32 - 1))
def test_binary_matches_torch(run_op, assert_close, name, shapes, seed):
    rng = np.random.default_rng(seed)
    a = _data(rng, shapes.input_shapes[0])
    b = _data(rng, shapes.input_shapes[1], "nonzero")
    if name == "pow":  # real powers need a positive base
        a = np.asarray(np.abs(a) + 0.1, dtype=np.float32)
    (got,) = run_op(name, [a, b])
    assert got.shape == shapes.result_shape
    assert_close(got, BINARY[name](_t(a).double(), _t(b).double()))


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "maximum", "minimum"])
def test_binary_on_ints(run_op, name):
    rng = np.random.default_rng(7)
    a = rng.integers(-100, 100, (3, 4)).astype(np.int32)
    b = rng.integers(1, 9, (4,)).astype(np.int32) * rng.choice([-1, 1], (4,)).astype(np.int32)
    (got,) = run_op(name, [a, b])
    ta, tb = _t(a), _t(b)
    want = torch.div(ta, tb, rounding_mode="floor") if name == "div" else BINARY[name](ta, tb)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("name", sorted(COMPARE))
@settings(max_examples=6, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4), seed=st.integers(0, 2**32 - 1))
def test_compare_matches_torch(run_op, name, shapes, seed):
    rng = np.random.default_rng(seed)
    # Small integers as floats so that equal pairs actually occur.
    a = rng.integers(-2, 3, shapes.input_shapes[0]).astype(np.float32)
    b = rng.integers(-2, 3, shapes.input_shapes[1]).astype(np.float32)
    (got,) = run_op(name, [a, b])
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, COMPARE[name](_t(a), _t(b)).numpy())


@pytest.mark.parametrize("name,fn", [("logical_and", torch.logical_and), ("logical_or", torch.logical_or)])
@settings(max_examples=6, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4), seed=st.integers(0, 2**32 - 1))
def test_logical_binary(run_op, name, fn, shapes, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.random(s) < 0.5 for s in shapes.input_shapes)
    (got,) = run_op(name, [a, b])
    np.testing.assert_array_equal(got, fn(_t(a), _t(b)).numpy())


def test_logical_not(run_op):
    a = np.random.default_rng(3).random((5, 3)) < 0.5
    (got,) = run_op("logical_not", [a])
    np.testing.assert_array_equal(got, torch.logical_not(_t(a)).numpy())


@settings(max_examples=10, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=4), seed=st.integers(0, 2**32 - 1))
def test_where_matches_torch(run_op, shapes, seed):
    rng = np.random.default_rng(seed)
    c = rng.random(shapes.input_shapes[0]) < 0.5
    a, b = _data(rng, shapes.input_shapes[1]), _data(rng, shapes.input_shapes[2])
    (got,) = run_op("where", [c, a, b])
    np.testing.assert_array_equal(got, torch.where(_t(c), _t(a), _t(b)).numpy())


@settings(max_examples=10, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=5), seed=st.integers(0, 2**32 - 1))
def test_swiglu_matches_torch(run_op, assert_close, shapes, seed):
    rng = np.random.default_rng(seed)
    g, u = (_data(rng, s) for s in shapes.input_shapes)
    (got,) = run_op("swiglu", [g, u])
    assert_close(got, F.silu(_t(g).double()) * _t(u).double())


def test_symbolic_broadcast(run_op, assert_close):
    """A symbolic batch dim broadcasts against 1 and binds from the inputs at run time."""
    rng = np.random.default_rng(0)
    a, b = _data(rng, (5, 1, 3)), _data(rng, (1, 4, 3))
    types = [TensorType(DType.f32, ("B", 1, 3)), TensorType(DType.f32, (1, "S", 3))]
    (got,) = run_op("add", [a, b], types=types, env={"B": 5, "S": 4})
    assert_close(got, _t(a) + _t(b))


def f32(*shape):
    return TensorType(DType.f32, shape)


@pytest.mark.parametrize(
    "name,types,msg",
    [
        ("add", [f32(2, 3), f32(4, 3)], "broadcast"),
        ("mul", [f32(2, 3), TensorType(DType.bf16, (2, 3))], "dtypes differ"),
        ("sub", [TensorType(DType.bool, (2,)), TensorType(DType.bool, (2,))], "bool"),
        ("lt", [f32(3), f32(4)], "broadcast"),
        ("logical_and", [f32(2), TensorType(DType.bool, (2,))], "bool"),
        ("where", [f32(2), f32(2), f32(2)], "bool"),
        ("where", [TensorType(DType.bool, (2,)), f32(2), TensorType(DType.int32, (2,))], "dtypes differ"),
        ("where", [TensorType(DType.bool, (3,)), f32(2), f32(2)], "broadcast"),
        ("swiglu", [TensorType(DType.int32, (2,)), TensorType(DType.int32, (2,))], "float"),
        ("add", [f32(2), f32(2), f32(2)], "operands"),
    ],
)
def test_invalid_types(name, types, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get(name).infer(types, {})
    assert name in str(e.value)


def test_builder_wraps_type_errors():
    from r1c import build

    mb = build.ModuleBuilder("bad")
    f = mb.function("forward", a=f32(2, 3), b=f32(3, 2))
    with pytest.raises(BuildError, match="add"):
        f.add(*f.args)
    with pytest.raises(BuildError, match="no attribute"):
        f.exp(f.args[0], axis=1)
