"""Narrow float formats: `round_to` against torch's own conversions, bit for bit, and ops evaluated in
bf16/f16/fp8 through the interpreter equal the f32 result rounded to that format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c import build
from r1c.ir import run
from r1c.ir.types import DType, TensorType, round_to


def _edge_f32() -> np.ndarray:
    """Values where rounding is easy to get wrong: exact ties, just-off ties, huge, tiny, subnormal, signed zero."""
    one = np.float32(1.0)
    ties = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2 + 2.0**-7, 1.5 + 2.0**-8]  # bf16 halfway points
    near = [np.nextafter(np.float32(t), np.float32(10)) for t in ties] + [
        np.nextafter(np.float32(t), np.float32(0)) for t in ties
    ]
    big = [3.3895314e38, 3.4028235e38, -3.4028235e38, 65504.0, 65520.0, 1e30, np.inf, -np.inf]
    tiny = [1e-45, -1e-45, 1.17549435e-38, 9.2e-41, 1e-30, 0.0, -0.0]
    return np.array(ties + near + big + tiny + [one], dtype=np.float32)


def _random_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random float32 bit patterns: every exponent, both signs, NaNs included."""
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_round_to_bf16_matches_torch_bitwise(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [
            _edge_f32(),
            _random_bits(rng, 2000),
            (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)).astype(np.float32),
        ]
    )
    got = round_to(x, DType.bf16)
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert got.dtype == np.float32
    # NaN payloads are not portable (torch's scalar path gives 0x7FC0, its vector path 0xFFFF): NaN stays NaN.
    nan = np.isnan(x)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_round_to_bf16_nan_stays_nan():
    nans = np.array([0xFFFFFFFF, 0x7FFFFFFF, 0x7F800001, 0xFFC00000], np.uint32).view(np.float32)
    assert np.all(np.isnan(round_to(nans, DType.bf16)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_round_to_fp8e4m3_matches_torch(seed):
    rng = np.random.default_rng(seed)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    grid = grid[np.isfinite(grid)]
    mids = (np.sort(grid)[1:] + np.sort(grid)[:-1]) / 2  # exact ties between neighbours: round to even
    x = np.concatenate(
        [
            grid,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            rng.standard_normal(3000) * 10.0 ** rng.integers(-4, 3, 3000),
            [-0.0, 2.0**-10, 2.0**-11],
        ]
    )
    x = np.clip(x, -448.0, 448.0).astype(np.float32)
    got = round_to(x, DType.fp8e4m3)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).float().numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_round_to_fp8_saturates():
    got = round_to(np.array([1000.0, -1e6, 449.0], np.float32), DType.fp8e4m3)
    np.testing.assert_array_equal(got, [448.0, -448.0, 448.0])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_round_to_f16_matches_torch(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [_edge_f32()[np.abs(_edge_f32()) < 1e30], (rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 5, 2000))]
    ).astype(np.float32)
    got = round_to(x, DType.f16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), torch.from_numpy(x).half().numpy().view(np.uint16))


# --- ops in narrow dtypes through the interpreter --------------------------------------------------------


def _module(name: str, types: list[TensorType], attrs: dict):
    mb = build.ModuleBuilder(name)
    f = mb.function("forward", **{f"a{i}": t for i, t in enumerate(types)})
    f.ret(f.op(name, *f.args, **attrs))
    return mb.build()


CASES = [
    ("add", [(4, 8), (8,)], {}),
    ("mul", [(4, 8), (4, 8)], {}),
    ("exp", [(4, 8)], {}),
    ("silu", [(3, 16)], {}),
    ("swiglu", [(3, 16), (3, 16)], {}),
    ("matmul", [(2, 4, 16), (2, 16, 8)], {}),
    ("linear", [(5, 32), (8, 32)], {}),
    ("softmax", [(4, 8)], {"axis": -1}),
    ("rmsnorm", [(4, 16), (16,)], {"eps": 1e-6}),
    ("reduce_sum", [(4, 16)], {"axes": [1]}),
    ("attention", [(1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)], {"scale": 0.35}),
]


@pytest.mark.parametrize("dtype", [DType.bf16, DType.f16, DType.fp8e4m3])
@pytest.mark.parametrize("name,shapes,attrs", CASES, ids=[c[0] for c in CASES])
def test_narrow_dtype_equals_rounded_f32(name, shapes, attrs, dtype):
    rng = np.random.default_rng(hash((name, dtype.value)) % 2**32)
    # Inputs already representable in the narrow type, so both runs see the same values.
    inputs = [round_to(rng.standard_normal(s).astype(np.float32), dtype).astype(np.float32) for s in shapes]
    narrow = _module(name, [TensorType(dtype, s) for s in shapes], attrs)
    wide = _module(name, [TensorType(DType.f32, s) for s in shapes], attrs)
    (got,) = run(narrow, [x.astype(dtype.numpy) for x in inputs], {})
    (ref,) = run(wide, inputs, {})
    want = round_to(ref, dtype)
    assert got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(ref, want) or dtype == DType.f32  # the rounding really happened


@pytest.mark.parametrize("name", ["exp", "sin"])  # both have values that round differently from float64
def test_f16_rounds_via_f32_like_other_narrow_types(name):
    """Ops compute in float32 then round: rounding float64 straight to f16 differs on ~1 in 20000 values,
    so a quarter million of them would show the difference."""
    x = np.abs(np.random.default_rng(5).standard_normal((512, 512))).astype(np.float16) + np.float16(0.01)
    (got,) = run(_module(name, [TensorType(DType.f16, x.shape)], {}), [x], {})
    (ref,) = run(_module(name, [TensorType(DType.f32, x.shape)], {}), [x.astype(np.float32)], {})
    np.testing.assert_array_equal(got.view(np.uint16), ref.astype(np.float16).view(np.uint16))
