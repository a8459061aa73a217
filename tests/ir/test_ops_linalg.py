"""matmul and linear against torch, their type rules and their flop counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from r1c.ir import registry
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).double()


def f32(*shape):
    return TensorType(DType.f32, shape)


@settings(max_examples=25, deadline=None)
@given(
    batch=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
    mkn=st.tuples(*(st.integers(1, 6),) * 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_matches_torch(run_op, assert_close, batch, mkn, seed):
    m, k, n = mkn
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(batch.input_shapes[0] + (m, k)).astype(np.float32)
    b = rng.standard_normal(batch.input_shapes[1] + (k, n)).astype(np.float32)
    (got,) = run_op("matmul", [a, b])
    assert got.shape == batch.result_shape + (m, n)
    assert_close(got, torch.matmul(_t(a), _t(b)))


@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), max_size=3),
    io=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_matches_torch(run_op, assert_close, lead, io, seed):
    fin, fout = io
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(lead) + (fin,)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    (got,) = run_op("linear", [x, w])
    assert_close(got, F.linear(_t(x), _t(w)))


def test_linear_symbolic(run_op, assert_close):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)
    types = [TensorType(DType.f32, ("B", "S", 8)), f32(4, 8)]
    (got,) = run_op("linear", [x, w], types=types, env={"B": 3, "S": 5})
    assert_close(got, F.linear(_t(x), _t(w)))


@pytest.mark.parametrize(
    "name,types,msg",
    [
        ("matmul", [f32(2, 3), f32(4, 5)], "contraction"),
        ("matmul", [f32(3), f32(3, 4)], "rank"),
        ("matmul", [f32(2, 2, 3), f32(3, 3, 4)], "broadcast"),
        ("matmul", [f32(2, 3), TensorType(DType.bf16, (3, 4))], "dtypes differ"),
        ("matmul", [TensorType(DType.int32, (2, 3)), TensorType(DType.int32, (3, 4))], "float"),
        ("linear", [f32(2, 3), f32(4, 5)], "features"),
        ("linear", [f32(2, 3), f32(3)], "weight"),
        ("linear", [f32(2, 3), f32(2, 4, 3)], "weight"),
        ("linear", [TensorType(DType.bf16, (2, 3)), f32(4, 3)], "dtypes differ"),
    ],
)
def test_invalid_types(name, types, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get(name).infer(types, {})
    assert name in str(e.value)


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(st.integers(1, 5), max_size=2), mkn=st.tuples(*(st.integers(1, 64),) * 3))
def test_matmul_cost(batch, mkn):
    m, k, n = mkn
    a, b = f32(*batch, m, k), f32(*batch, k, n)
    (out,) = registry.get("matmul").infer([a, b], {})
    c = registry.get("matmul").cost([a, b], [out], {})
    nb = int(np.prod(batch, dtype=np.int64))
    assert c.flops == 2 * nb * m * n * k  # one multiply and one add per term of each dot product
    assert c.bytes == 4 * nb * (m * k + k * n + m * n)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 100), io=st.tuples(st.integers(1, 512), st.integers(1, 512)))
def test_linear_cost(tokens, io):
    fin, fout = io
    x, w = TensorType(DType.bf16, (tokens, fin)), TensorType(DType.bf16, (fout, fin))
    (out,) = registry.get("linear").infer([x, w], {})
    c = registry.get("linear").cost([x, w], [out], {})
    assert c.flops == 2 * tokens * fin * fout
    assert c.bytes == 2 * (tokens * fin + fout * fin + tokens * fout)
