"""Canonicalize: local simplifications applied to a fixed point, then dead-op removal.

Each pattern either names an existing value that the op's result equals, or a cheaper op that computes the
same results. Identities only fire when the result type equals the kept value's type: `x + 0` where the
zero broadcasts x to a bigger shape is not a no-op.

One forward sweep reaches the fixed point: operands are remapped before an op is looked at and patterns
repeat on the op until none applies, so nothing later can enable a pattern on an earlier op.
"""

from __future__ import annotations

from typing import Callable

from r1c.ir.core import Function, Module, Op, Value
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import erase_dead, remap_operands, remap_results, splat_value

Producers = dict[Value, Op]
Pattern = Callable[[Op, Producers], "Value | Op | None"]


def _same(v: Value, op: Op) -> Value | None:
    return v if v.type == op.results[0].type else None


def _splat_is(v: Value, producers: Producers, x: float) -> bool:
    return splat_value(v, producers) == x


def _identity_operand(op: Op, producers: Producers, unit: float, commutative: bool) -> Value | None:
    a, b = op.operands
    if _splat_is(b, producers, unit) and _same(a, op):
        return a
    if commutative and _splat_is(a, producers, unit) and _same(b, op):
        return b
    return None


def _producer(v: Value, producers: Producers, name: str) -> Op | None:
    op = producers.get(v)
    return op if op is not None and op.name == name else None


def _rebuild(op: Op, operand: Value) -> Value | Op:
    """A reshape/broadcast_to of `operand` to op's result (whose intermediate step collapses), or `operand`
    itself when that is the identity."""
    if operand.type == op.results[0].type:
        return operand
    return Op(op.name, (operand,), op.results, dict(op.attrs), op.loc)


def _neg(op: Op, producers: Producers) -> Value | None:
    inner = _producer(op.operands[0], producers, "neg")
    return inner.operands[0] if inner is not None else None


def _reshape(op: Op, producers: Producers) -> Value | Op | None:
    if _same(op.operands[0], op):
        return op.operands[0]
    inner = _producer(op.operands[0], producers, "reshape")
    return _rebuild(op, inner.operands[0]) if inner is not None else None


def _broadcast_to(op: Op, producers: Producers) -> Value | Op | None:
    if _same(op.operands[0], op):
        return op.operands[0]
    inner = _producer(op.operands[0], producers, "broadcast_to")
    return _rebuild(op, inner.operands[0]) if inner is not None else None


def _perm(op: Op) -> list[int]:
    rank = op.operands[0].type.rank
    return [p % rank for p in op.attrs["perm"]]


def _transpose(op: Op, producers: Producers) -> Value | Op | None:
    perm = _perm(op)
    if perm == list(range(len(perm))):
        return op.operands[0]
    inner = _producer(op.operands[0], producers, "transpose")
    if inner is None:
        return None
    # Result axis i is the inner result's axis perm[i], which is the source's axis inner_perm[perm[i]].
    inner_perm = _perm(inner)
    composed = tuple(inner_perm[p] for p in perm)
    if list(composed) == list(range(len(composed))):
        return inner.operands[0]
    return Op("transpose", (inner.operands[0],), op.results, {"perm": composed}, op.loc)


PATTERNS: dict[str, Pattern] = {
    "add": lambda op, p: _identity_operand(op, p, 0.0, commutative=True),
    "sub": lambda op, p: _identity_operand(op, p, 0.0, commutative=False),
    "mul": lambda op, p: _identity_operand(op, p, 1.0, commutative=True),
    "div": lambda op, p: _identity_operand(op, p, 1.0, commutative=False),
    "neg": _neg,
    "reshape": _reshape,
    "broadcast_to": _broadcast_to,
    "transpose": _transpose,
    # A slice whose result has the operand's type selected every element in order: step >= 1 and n == size.
    "slice": lambda op, p: _same(op.operands[0], op),
    "cast": lambda op, p: _same(op.operands[0], op),
    "concat": lambda op, p: op.operands[0] if len(op.operands) == 1 else None,
}


def canonicalize_function(f: Function) -> None:
    mapping: dict[Value, Value] = {}
    producers: Producers = {}
    body: list[Op] = []
    for op in f.body:
        remap_operands(op, mapping)
        while (pattern := PATTERNS.get(op.name)) is not None:
            new = pattern(op, producers)
            if new is None:
                break
            if isinstance(new, Value):
                mapping[op.results[0]] = new
                op = None
                break
            op = new
        if op is not None:
            body.append(op)
            producers.update((r, op) for r in op.results)
    f.body = body
    remap_results(f, mapping)
    erase_dead(f)


@register_pass(
    "canonicalize",
    "Local simplifications to a fixed point (x+0, x*1, double neg, reshape/transpose "
    "chains, no-op cast/slice/broadcast/concat), then remove dead ops.",
)
def canonicalize(module: Module) -> Module:
    for f in module.functions.values():
        canonicalize_function(f)
    return module
