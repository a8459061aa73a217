"""Helpers shared by passes: cloning, use replacement, fresh names, dead-op removal, splat lookup.

Passes rewrite functions in place in one forward sweep: results are remapped as the sweep goes, so a
replacement chain (a -> b -> c) resolves without extra passes and the cost stays linear in the ops.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from r1c.ir import registry
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.interpreter import to_storage


def clone_module(m: Module) -> Module:
    """A copy whose functions, ops and param table can be changed without touching `m` (values are immutable)."""
    functions = {
        name: Function(
            f.name, list(f.args), [dataclasses.replace(op, attrs=dict(op.attrs)) for op in f.body], list(f.results)
        )
        for name, f in m.functions.items()
    }
    params = {name: dataclasses.replace(p) for name, p in m.params.items()}
    return Module(m.name, params, functions, dict(m.attrs))


def remap_operands(op: Op, mapping: dict[Value, Value]) -> None:
    if mapping and any(v in mapping for v in op.operands):
        op.operands = tuple(mapping.get(v, v) for v in op.operands)


def remap_results(f: Function, mapping: dict[Value, Value]) -> None:
    f.results = [mapping.get(v, v) for v in f.results]


def replace_all_uses(f: Function, mapping: dict[Value, Value]) -> None:
    """Replace every use of each key by its value, in operands and returned values (one linear sweep)."""
    for op in f.body:
        remap_operands(op, mapping)
    remap_results(f, mapping)


def is_pure(op: Op) -> bool:
    return registry.get(op.name).pure


def erase_dead(f: Function) -> int:
    """Drop pure ops none of whose results is used or returned; returns how many were dropped."""
    live = set(f.results)
    kept: list[Op] = []
    for op in reversed(f.body):
        if any(r in live for r in op.results) or not is_pure(op):
            kept.append(op)
            live.update(op.operands)
    dropped = len(f.body) - len(kept)
    f.body = kept[::-1]
    return dropped


class NameGen:
    """Fresh value names for one function (`base`, `base.1`, ...) that never collide with existing ones."""

    def __init__(self, f: Function) -> None:
        self.used = {v.name for v in f.values()}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}.{i}", i + 1
        self.used.add(name)
        return name


def splat_value(v: Value, producers: dict[Value, Op]) -> float | None:
    """The value every element of `v` holds, when its producer chain proves it is a splat constant.

    Looks through data movement (reshape, broadcast_to, transpose, slice) of a `constant`. The value is the
    one the interpreter stores (the attribute rounded to the dtype), so `int32` 0.5 reads as 0.
    """
    op = producers.get(v)
    while op is not None and op.name in ("reshape", "broadcast_to", "transpose", "slice"):
        op = producers.get(op.operands[0])
    if op is None or op.name != "constant" or op.results[0].type.dtype != v.type.dtype:
        return None
    return float(to_storage(np.asarray(op.attrs["value"], np.float64), v.type.dtype))
