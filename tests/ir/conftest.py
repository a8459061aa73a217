"""Shared helpers for the per-op tests: build a one-op module through the builder, verify it, run it
through the reference interpreter, and check the result against the op's own type rule and cost rule.

Helpers are handed out as session-scoped fixtures (not imported) so hypothesis tests can use them
without the function-scoped-fixture health check, and no test module depends on sys.path tricks.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from r1c import build
from r1c.ir import registry, run
from r1c.ir.core import Module
from r1c.ir.types import DType, TensorType

_NP_TO_DTYPE = {
    np.dtype("float32"): DType.f32,
    np.dtype("float64"): DType.f32,
    np.dtype("float16"): DType.f16,
    np.dtype("int32"): DType.int32,
    np.dtype("int64"): DType.int32,
    np.dtype("int8"): DType.int8,
    np.dtype("bool"): DType.bool,
}


def dtype_of(x: np.ndarray) -> DType:
    return _NP_TO_DTYPE[np.asarray(x).dtype]


def build_op(name: str, arg_types: list[TensorType], **attrs: Any) -> Module:
    mb = build.ModuleBuilder(f"test_{name}")
    f = mb.function("forward", **{f"a{i}": t for i, t in enumerate(arg_types)})
    out = f.op(name, *f.args, **attrs)
    f.ret(*(out if isinstance(out, tuple) else (out,)))
    return mb.build()  # runs the verifier: result types must agree with the type rule


def check_cost(m: Module, env: dict[str, int]) -> None:
    """Every op's cost rule must accept concrete shapes and give non-negative integers."""
    for op in m.main.body:
        opdef = registry.get(op.name)
        ins = [TensorType(v.type.dtype, v.type.concrete(env)) for v in op.operands]
        outs = [TensorType(v.type.dtype, v.type.concrete(env)) for v in op.results]
        c = opdef.cost(ins, outs, op.attrs)
        assert isinstance(c.flops, (int, np.integer)) and isinstance(c.bytes, (int, np.integer)), c
        assert c.flops >= 0 and c.bytes >= 0, f"{op.name}: negative cost {c}"


def run_op_impl(
    name: str,
    inputs: list[np.ndarray],
    *,
    types: list[TensorType] | None = None,
    env: dict[str, int] | None = None,
    **attrs: Any,
) -> list[np.ndarray]:
    """Evaluate op `name` on `inputs` via builder + interpreter.

    `types` overrides the argument types (e.g. symbolic dims or narrow dtypes); by default each input's
    type is its concrete shape and the dtype its numpy dtype maps to. Checks that every result has the
    shape and storage dtype its inferred type says, and that the cost rule is sane.
    """
    inputs = [np.asarray(x) for x in inputs]
    if types is None:
        types = [TensorType(dtype_of(x), tuple(x.shape)) for x in inputs]
    m = build_op(name, types, **attrs)
    outs = run(m, inputs, {})
    from r1c.ir.interpreter import bind_dims

    bound = bind_dims(m.main, inputs)
    if env is not None:
        assert bound == env
    for r, x in zip(m.main.results, outs):
        assert x.shape == r.type.concrete(bound), (name, x.shape, r.type)
        assert x.dtype == r.type.dtype.numpy, (name, x.dtype, r.type)
    check_cost(m, bound)
    return outs


@pytest.fixture(scope="session")
def run_op() -> Callable[..., list[np.ndarray]]:
    return run_op_impl


@pytest.fixture(scope="session")
def assert_close() -> Callable[..., None]:
    def check(got: np.ndarray, want: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
        import torch

        if isinstance(want, torch.Tensor):
            want = want.detach().cpu().numpy()
        want = np.asarray(want)
        got = np.asarray(got)
        assert got.shape == want.shape, (got.shape, want.shape)
        # atol scales with the data so tiny absolute errors on large values do not need a per-test tolerance.
        scale = float(np.max(np.abs(want))) if want.size and want.dtype.kind == "f" else 1.0
        np.testing.assert_allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol * max(scale, 1.0)
        )

    return check
