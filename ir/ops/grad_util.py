"""Helpers shared by VJP rules (see docs/autodiff.md for the rule signature).

A rule is `vjp(fb, op, cotangents) -> cotangents per operand`; it emits ops through `fb`. Every returned
cotangent must have exactly its operand's type, which is what `unbroadcast` and `expand_reduced` restore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from r1c.ir import dims
from r1c.ir.core import DimList, Op, Value
from r1c.ir.types import DType, TensorType

if TYPE_CHECKING:
    from r1c.build import FunctionBuilder

VJP = Callable[["FunctionBuilder", Op, list[Value | None]], list[Value | None]]


def no_grad(fb: "FunctionBuilder", op: Op, cotangents: list[Value | None]) -> list[Value | None]:
    """The rule of a non-differentiable op (indices, comparisons, iota): no operand gets a gradient."""
    return [None] * len(op.operands)


def is_float(v: Value) -> bool:
    return v.type.dtype.is_float


def scalar(fb: "FunctionBuilder", value: float, dtype: DType) -> Value:
    """A rank-0 constant; elementwise ops broadcast it, which keeps symbolic shapes out of constants."""
    return fb.constant(value=float(value), dtype=dtype, shape=())


def zeros(fb: "FunctionBuilder", t: TensorType) -> Value:
    """Zeros of type `t` (possibly symbolic: a broadcast scalar rather than a sized constant)."""
    zero = scalar(fb, 0.0, t.dtype)
    return zero if t.rank == 0 else fb.broadcast_to(zero, shape=DimList(t.shape))


def unbroadcast(fb: "FunctionBuilder", g: Value, target: TensorType) -> Value:
    """Sum `g` over the dims numpy broadcasting added to reach g's shape from `target`'s, giving type `target`."""
    if g.type == target:
        return g
    lead = g.type.rank - target.rank
    if lead < 0:
        raise ValueError(f"unbroadcast: {g.type} has lower rank than {target}")
    if lead:
        g = fb.reduce_sum(g, axes=tuple(range(lead)), keepdims=False)
    stretched = tuple(
        i for i, (d, t) in enumerate(zip(g.type.shape, target.shape)) if dims.normalize(t) == 1 and d != 1
    )
    if stretched:
        g = fb.reduce_sum(g, axes=stretched, keepdims=True)
    if g.type.dtype != target.dtype:
        g = fb.cast(g, dtype=target.dtype)
    if g.type != target:
        raise ValueError(f"unbroadcast: cannot reduce {g.type} to {target}")
    return g


def expand_reduced(fb: "FunctionBuilder", g: Value, target: TensorType, axes: tuple[int, ...]) -> Value:
    """Broadcast the cotangent of a reduction over `axes` (keepdims or not) back to the operand's type."""
    norm = sorted(a % target.rank for a in axes)
    kept = tuple(1 if i in norm else d for i, d in enumerate(target.shape))
    if g.type.shape != kept:
        g = fb.reshape(g, shape=DimList(kept))
    return fb.broadcast_to(g, shape=DimList(target.shape))


def count(fb: "FunctionBuilder", t: TensorType, axes: tuple[int, ...]) -> Value:
    """How many elements a reduction over `axes` of `t` combines, as a float of t's dtype that broadcasts
    against `t`: a rank-0 constant for static sizes; symbolic sizes are only known at run time, so then
    it is a keepdims sum of ones."""
    sizes = [t.shape[a % t.rank] for a in axes]
    if all(isinstance(s, int) for s in sizes):
        n = 1
        for s in sizes:
            n *= s
        return scalar(fb, n, t.dtype)
    ones = fb.broadcast_to(scalar(fb, 1.0, t.dtype), shape=DimList(t.shape))
    return fb.reduce_sum(ones, axes=tuple(axes), keepdims=True)


def accumulate(fb: "FunctionBuilder", a: Value | None, b: Value | None) -> Value | None:
    """Sum two cotangents of one value, either of which may be None (zero)."""
    if a is None:
        return b
    if b is None:
        return a
    return fb.add(a, b)
