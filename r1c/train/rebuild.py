"""Rewrite one function by re-emitting its ops through the builder, letting a callback replace any op."""

from __future__ import annotations

from typing import Callable

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.ir.core import Module, Op, Value
from r1c.passes.rewrite import clone_module

# (fb, op, mapped operands) -> the op's new results, or None to copy the op unchanged
Rewrite = Callable[[FunctionBuilder, Op, list[Value]], "tuple[Value, ...] | None"]


def rebuild(module: Module, function: str, rewrite: Rewrite) -> Module:
    """A copy of `module` whose `function` is re-emitted op by op (types re-inferred, locs kept)."""
    mb = ModuleBuilder(module.name)
    mb.module = clone_module(module)
    src = mb.module.functions.pop(function)
    order = list(module.functions)
    fb = mb.function(function, **{a.name: a.type for a in src.args})
    env: dict[Value, Value] = dict(zip(src.args, fb.args))
    for op in src.body:
        operands = [env[v] for v in op.operands]
        with fb.scope(op.loc) if op.loc else _NoScope():
            out = rewrite(fb, op, operands)
            if out is None:
                out = _copy(fb, op, operands)
        env.update(zip(op.results, out))
    fb.ret(*(env[r] for r in src.results))
    mb.module.functions = {name: mb.module.functions[name] for name in order}
    return mb.module


def _copy(fb: FunctionBuilder, op: Op, operands: list[Value]) -> tuple[Value, ...]:
    if op.name == "param":
        return (fb.param(op.attrs["name"]),)
    out = fb.op(op.name, *operands, **op.attrs)
    return out if isinstance(out, tuple) else (out,)


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
