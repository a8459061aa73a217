"""Constant folding: an elementwise op whose operands are all splat constants becomes a splat `constant`,
and so does data movement (reshape, broadcast_to, transpose, slice) of a splat. The folded value comes
from the op's own numpy reference, so folding cannot disagree with the interpreter. Ends with dead-op
removal, which drops the constants that fed folded ops.

A splat with a symbolic shape cannot be a `constant` (its shape must be static): it becomes a scalar
constant broadcast to the shape, which is also the form this pass leaves alone.
"""

from __future__ import annotations

import numpy as np

from r1c.ir import registry
from r1c.ir.core import DimList, Function, Module, Op, Value
from r1c.ir.interpreter import to_storage
from r1c.ir.ops.elementwise import BINARY, COMPARE, UNARY
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import NameGen, erase_dead, splat_value

ELEMENTWISE = (
    frozenset(UNARY)
    | frozenset(BINARY)
    | frozenset(COMPARE)
    | {"logical_and", "logical_or", "logical_not", "where", "swiglu", "cast"}
)
MOVEMENT = frozenset({"reshape", "broadcast_to", "transpose", "slice"})


def _fold_value(op: Op, values: list[float]) -> float:
    if op.name in MOVEMENT:
        return values[0]
    # The interpreter's view of each operand: its splat value stored in the operand's dtype (f16 computes
    # in float32, like the interpreter's compute view).
    args = []
    for v, x in zip(op.operands, values):
        stored = to_storage(np.asarray(x, np.float64), v.type.dtype)
        args.append(stored.astype(np.float32) if stored.dtype == np.float16 else stored)
    with np.errstate(all="ignore"):
        out = registry.get(op.name).reference(args, op.attrs)[0]
        return float(to_storage(np.asarray(out), op.results[0].type.dtype))


def _splat_ops(op: Op, value: float, names: NameGen) -> list[Op]:
    r = op.results[0]
    if r.type.is_static:
        return [
            Op("constant", (), (r,), {"value": value, "dtype": r.type.dtype, "shape": DimList(r.type.shape)}, op.loc)
        ]
    scalar = Value(names.fresh(f"{r.name}.splat"), r.type.with_shape(()))
    return [
        Op("constant", (), (scalar,), {"value": value, "dtype": r.type.dtype, "shape": DimList()}, op.loc),
        Op("broadcast_to", (scalar,), (r,), {"shape": DimList(r.type.shape)}, op.loc),
    ]


def _already_folded(op: Op, producers: dict[Value, Op]) -> bool:
    src = producers.get(op.operands[0]) if op.operands else None
    return (
        op.name == "broadcast_to"
        and not op.results[0].type.is_static
        and src is not None
        and src.name == "constant"
        and src.results[0].type.rank == 0
    )


def fold_function(f: Function) -> None:
    producers: dict[Value, Op] = {}
    names = NameGen(f)
    body: list[Op] = []
    for op in f.body:
        new = [op]
        if (op.name in ELEMENTWISE or op.name in MOVEMENT) and not _already_folded(op, producers):
            values = [splat_value(v, producers) for v in op.operands]
            if all(x is not None for x in values):
                new = _splat_ops(op, _fold_value(op, values), names)
        for o in new:
            body.append(o)
            producers.update((r, o) for r in o.results)
    f.body = body
    erase_dead(f)


@register_pass(
    "constant-fold",
    "Fold elementwise ops of splat constants, and reshape/broadcast/transpose/slice "
    "of a splat, into splat constants (values from the op's reference).",
)
def constant_fold(module: Module) -> Module:
    for f in module.functions.values():
        fold_function(f)
    return module
