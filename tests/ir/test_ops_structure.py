"""param (through a tiny module), constant, iota and cast; and the interpreter's binding of symbolic dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from r1c import build
from r1c.ir import DimList, init_weights, random_inputs, registry, run
from r1c.ir.interpreter import InterpreterError, bind_dims
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType, round_to


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def f32(*shape):
    return TensorType(DType.f32, shape)


# --- param -----------------------------------------------------------------------------------------------


def _param_module(dtype: DType = DType.f32):
    mb = build.ModuleBuilder("p")
    f = mb.function("forward", x=TensorType(dtype, ("B", 3)))
    w = f.param("w", TensorType(dtype, (3,)), init="normal(1.0)")
    f.ret(f.add(f.args[0], w), w)
    return mb.build()


def test_param_reads_weights(assert_close):
    m = _param_module()
    weights = init_weights(m, seed=4)
    assert weights["w"].shape == (3,) and np.any(weights["w"] != 0)
    (x,) = random_inputs(m, m.main, {"B": 2}, seed=1)
    y, w = run(m, [x], weights)
    np.testing.assert_array_equal(w, weights["w"])
    assert_close(y, _t(x) + _t(weights["w"]))


def test_param_narrow_dtype_rounds_weight():
    m = _param_module(DType.bf16)
    w = np.random.default_rng(0).standard_normal(3).astype(np.float32)
    _, got = run(m, [np.ones((1, 3), np.float32)], {"w": w})
    np.testing.assert_array_equal(got, torch.tensor(w).to(torch.bfloat16).float().numpy())


def test_param_errors():
    m = _param_module()
    x = np.ones((2, 3), np.float32)
    with pytest.raises(InterpreterError, match="no weight given for parameter @w"):
        run(m, [x], {})
    with pytest.raises(InterpreterError, match="weight @w has shape"):
        run(m, [x], {"w": np.ones((4,), np.float32)})
    with pytest.raises(OpError, match="param"):
        registry.get("param").infer([], {"name": "w"})
    with pytest.raises(build.BuildError, match="not declared"):
        build.ModuleBuilder("q").function("forward").param("nope")


def test_param_cost():
    t = TensorType(DType.bf16, (4, 8))
    assert registry.get("param").cost([], [t], {"name": "w"}).bytes == 64


# --- constant / iota / cast ------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    shape=array_shapes(min_dims=0, max_dims=3, max_side=4),
    value=st.floats(-1e3, 1e3, width=32),
    dtype=st.sampled_from([DType.f32, DType.bf16, DType.int32, DType.f16]),
)
def test_constant_matches_torch(run_op, shape, value, dtype):
    (got,) = run_op("constant", [], value=value, dtype=dtype, shape=DimList(shape))
    tdt = {DType.f32: torch.float32, DType.bf16: torch.bfloat16, DType.int32: torch.int32, DType.f16: torch.float16}[
        dtype
    ]
    want = torch.full(shape, value, dtype=torch.float32).to(tdt)
    assert got.shape == shape and got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, want.to(torch.float32 if dtype.is_float else tdt).numpy())


def test_constant_needs_static_shape_and_sane_dims():
    with pytest.raises(OpError, match="constant"):
        registry.get("constant").infer([], {"value": 1.0, "dtype": DType.f32, "shape": DimList([-1])})
    with pytest.raises(OpError, match="constant: shape"):
        registry.get("constant").reference([], {"value": 1.0, "dtype": DType.f32, "shape": DimList(["B"])})


@settings(max_examples=15, deadline=None)
@given(
    shape=array_shapes(min_dims=1, max_dims=3, max_side=5),
    data=st.data(),
    dtype=st.sampled_from([DType.int32, DType.f32]),
)
def test_iota_matches_torch(run_op, shape, data, dtype):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    like = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (got,) = run_op("iota", [like], axis=axis, dtype=dtype)
    ax = axis % len(shape)
    view = [-1 if i == ax else 1 for i in range(len(shape))]
    want = torch.arange(shape[ax]).reshape(view).expand(shape)
    assert got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, want.numpy())


def test_iota_bad_axis():
    with pytest.raises(OpError, match="iota"):
        registry.get("iota").infer([f32(2, 3)], {"axis": 2, "dtype": DType.int32})


CASTS = [
    (DType.f32, DType.bf16),
    (DType.f32, DType.f16),
    (DType.f32, DType.fp8e4m3),
    (DType.f32, DType.int32),
    (DType.f32, DType.int8),
    (DType.bf16, DType.f32),
    (DType.int32, DType.f32),
    (DType.f32, DType.bool),
    (DType.f16, DType.bf16),
    (DType.int32, DType.int8),
]
TORCH = {
    DType.f32: torch.float32,
    DType.bf16: torch.bfloat16,
    DType.f16: torch.float16,
    DType.int32: torch.int32,
    DType.int8: torch.int8,
    DType.bool: torch.bool,
    DType.fp8e4m3: torch.float8_e4m3fn,
}


@pytest.mark.parametrize("src,dst", CASTS, ids=[f"{a}->{b}" for a, b in CASTS])
@settings(max_examples=6, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=2, max_side=6), seed=st.integers(0, 2**32 - 1))
def test_cast_matches_torch(run_op, src, dst, shape, seed):
    rng = np.random.default_rng(seed)
    if src.is_float:
        x = np.clip(rng.standard_normal(shape) * 30, -120, 120).astype(np.float32)  # int8 targets stay in range
        if src != DType.f32:
            x = round_to(x, src).astype(np.float32)
    else:
        x = rng.integers(-100, 100, shape).astype(np.int32)
    (got,) = run_op("cast", [x], types=[TensorType(src, shape)], dtype=dst)
    src_t = _t(x).to(TORCH[src])
    want = src_t.to(TORCH[dst])
    want = want.float() if dst in (DType.bf16, DType.fp8e4m3) else want
    assert got.dtype == dst.numpy
    np.testing.assert_array_equal(got, want.numpy())


# --- bind_dims -------------------------------------------------------------------------------------------


def _fn(**args: TensorType):
    mb = build.ModuleBuilder("b")
    fb = mb.function("forward", **args)
    fb.ret(*fb.args)
    return mb.build().main


def test_bind_dims_binds_symbols_and_products():
    f = _fn(x=TensorType(DType.f32, ("B*S", 4)), y=TensorType(DType.f32, ("B", "S")), z=TensorType(DType.f32, ("S*2",)))
    env = bind_dims(f, [np.ones((6, 4)), np.ones((2, 3)), np.ones((6,))])
    assert env == {"B": 2, "S": 3}


@pytest.mark.parametrize(
    "args,inputs,msg",
    [
        ({"x": f32(2, 3)}, [], "takes 1 inputs"),
        ({"x": f32(2, 3)}, [np.ones((2, 3)), np.ones(1)], "takes 1 inputs"),
        ({"x": f32(2, 3)}, [np.ones((2, 3, 1))], "expected rank 2"),
        ({"x": f32(2, 3)}, [np.ones((2, 4))], "dimension 3 does not match size 4"),
        (
            {"x": TensorType(DType.f32, ("B", 3)), "y": TensorType(DType.f32, ("B",))},
            [np.ones((2, 3)), np.ones(5)],
            "dimension B does not match size 5",
        ),
        (
            {"x": TensorType(DType.f32, ("B", "S")), "y": TensorType(DType.f32, ("B*S",))},
            [np.ones((2, 3)), np.ones(7)],
            "dimension B\\*S does not match size 7",
        ),
        ({"x": TensorType(DType.f32, ("S*2",))}, [np.ones(5)], "does not match size 5"),
    ],
)
def test_bind_dims_errors(args, inputs, msg):
    f = _fn(**args)
    with pytest.raises(InterpreterError, match=msg) as e:
        bind_dims(f, inputs)
    assert "forward" in str(e.value) or "%" in str(e.value)
