"""Lowering: an r1c function -> a Python function over JAX arrays, `fn(*inputs, *weights) -> tuple of results`.

JAX traces it per concrete shape (symbolic IR dims are bound from the inputs' shapes when it is traced), so one
lowering serves every shape; `jax.jit(fn).lower(...)` gives the StableHLO. Each op goes through its lowering in
jax_ops.py; an op without one is a LoweringError naming the op, its results and its loc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from r1c.backends import TargetError
from r1c.backends.tpu.jax_ops import KERNELS, LOWERINGS, Ctx, jdtype
from r1c.ir.core import Function, Module, Op
from r1c.ir.interpreter import bind_dims
from r1c.ir.types import DType

NARROW = (DType.bf16, DType.f16, DType.fp8e4m3)
FP8_MAX = 448.0


class LoweringError(TargetError):
    """An op or option the tpu target cannot lower (a TargetError: the CLI reports it in one line)."""


def missing_lowerings(f: Function) -> list[Op]:
    return [op for op in f.body if op.name != "param" and op.name not in LOWERINGS]


def check_lowerable(f: Function, target: str = "tpu") -> None:
    """Fail before tracing, naming every op without a lowering (the first one's values and loc)."""
    missing = missing_lowerings(f)
    if missing:
        op = missing[0]
        names = ", ".join(sorted({o.name for o in missing}))
        raise LoweringError(
            f"{target} target: no lowering for op(s) {names} in @{f.name} (first: '{op.name}' defining "
            f"{', '.join(str(r) for r in op.results)} at loc {op.loc or '?'})"
        )


def _widen(x: Any) -> Any:
    """Ops compute in float32: narrow float operands are widened (the interpreter's semantics)."""
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32 else x


def _narrow(x: Any, dtype: DType) -> Any:
    """Round a result to its declared dtype; fp8 saturates at its largest finite value as the reference does."""
    if dtype == DType.fp8e4m3:
        x = jnp.clip(x.astype(jnp.float32), -FP8_MAX, FP8_MAX)
    want = jdtype(dtype)
    return x if x.dtype == want else x.astype(want)


@dataclass
class Lowered:
    """The function to trace and what feeds it: the weight names in the order it takes them after the inputs."""

    fn: Callable[..., tuple]
    function: Function
    weights: list[str]


def lower(
    module: Module,
    entry: str,
    kernels: str = "pallas",
    interpret: bool = True,
    precision: Any = None,
    mesh: Any = None,
) -> Lowered:
    """`mesh` (a jax Mesh over `data`/`expert`) makes the Pallas calls run under shard_map (jax_ops.Ctx)."""
    if kernels not in KERNELS:
        raise LoweringError(f"tpu target: kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    f = module.functions[entry]
    check_lowerable(f)
    params = [op for op in f.body if op.name == "param"]
    weights = list(dict.fromkeys(op.attrs["name"] for op in params))

    def fn(*args: Any) -> tuple:
        inputs, wvals = args[: len(f.args)], dict(zip(weights, args[len(f.args) :]))
        ctx = Ctx(env=bind_dims(f, list(inputs)), kernels=kernels, interpret=interpret, mesh=mesh)
        if precision is not None:
            ctx.precision = precision
        values: dict[Any, Any] = {a: _narrow(x, a.type.dtype) for a, x in zip(f.args, inputs)}
        for op in f.body:
            if op.name == "param":
                values[op.result] = _narrow(wvals[op.attrs["name"]], op.result.type.dtype)
                continue
            try:
                outs = LOWERINGS[op.name](ctx, [_widen(values[v]) for v in op.operands], op)
            except (ValueError, TypeError, NotImplementedError) as e:  # name the op: a JAX error names a primitive
                raise LoweringError(
                    f"tpu target: lowering '{op.name}' defining {', '.join(str(r) for r in op.results)} at loc "
                    f"{op.loc or '?'} failed: {type(e).__name__}: {e}"
                ) from e
            for r, o in zip(op.results, outs):
                values[r] = _narrow(jnp.asarray(o), r.type.dtype)
        return tuple(values[r] for r in f.results)

    return Lowered(fn, f, weights)


def to_device_dtype(x: np.ndarray, dtype: DType) -> np.ndarray:
    """A numpy value in the dtype the lowered function takes (bf16/fp8 are stored as float32 by the reference)."""
    return np.asarray(x).astype(np.dtype(jdtype(dtype)))


def to_reference_dtype(x: Any, dtype: DType) -> np.ndarray:
    """A result back in the reference interpreter's storage type (bf16/fp8 as float32)."""
    return np.asarray(x).astype(dtype.numpy)
