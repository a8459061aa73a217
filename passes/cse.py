"""Common-subexpression elimination: a pure op identical to an earlier one (same op name, operands and
attributes; `param` ops reading the same name) reuses the earlier results. Locations are debug info and
do not take part: the first op's location is kept."""

from __future__ import annotations

from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.printer import format_attrs
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import is_pure, remap_operands, remap_results


def _key(op: Op) -> tuple:
    # The printed attributes are canonical and tell 1, 1.0 and true apart (dict equality would not),
    # and nan equals nan there, which is right: two identical constant(nan) ops are the same value.
    return (op.name, tuple(v.name for v in op.operands), format_attrs(op.attrs), tuple(str(r.type) for r in op.results))


def cse_function(f: Function) -> None:
    seen: dict[tuple, Op] = {}
    mapping: dict[Value, Value] = {}
    body: list[Op] = []
    for op in f.body:
        remap_operands(op, mapping)
        if is_pure(op):
            key = _key(op)
            first = seen.get(key)
            if first is not None:
                mapping.update(zip(op.results, first.results))
                continue
            seen[key] = op
        body.append(op)
    f.body = body
    remap_results(f, mapping)


@register_pass("cse", "Reuse the results of an identical earlier op (same name, operands and attributes).")
def cse(module: Module) -> Module:
    for f in module.functions.values():
        cse_function(f)
    return module
