"""The IR verifier: SSA form, known ops, complete attributes, and result types that agree with each
op's type rule. Every error names the function, the op and the value."""

from __future__ import annotations

from r1c.ir import registry
from r1c.ir.core import Function, Module, Op
from r1c.ir.registry import OpError, UnknownOpError
from r1c.ir.types import TensorType


class VerifyError(ValueError):
    pass


def _where(f: Function, op: Op) -> str:
    lhs = ", ".join(str(r) for r in op.results)
    loc = f" (at {op.loc})" if op.loc else ""
    return f"@{f.name}: '{op.name}' defining {lhs}{loc}"


def result_types(m: Module, op: Op) -> list[TensorType]:
    """The types `op` must produce in `m`: from its type rule, or for `param` from the module's table."""
    if op.name == "param":
        name = op.attrs["name"]
        if name not in m.params:
            raise OpError(f"parameter @{name} is not declared in module @{m.name}")
        return [m.params[name].type]
    return registry.get(op.name).infer([v.type for v in op.operands], op.attrs)


def verify_function(m: Module, f: Function) -> None:
    defined: dict[str, object] = {}
    for a in f.args:
        if a.name in defined:
            raise VerifyError(f"@{f.name}: argument %{a.name} is declared twice")
        defined[a.name] = a
    for op in f.body:
        where = _where(f, op)
        for v in op.operands:
            if v.name not in defined:
                raise VerifyError(f"{where}: operand %{v.name} is used before it is defined")
            if defined[v.name] != v:
                raise VerifyError(
                    f"{where}: operand %{v.name} has type {v.type} here but was defined as {defined[v.name].type}"
                )
        try:
            opdef = registry.get(op.name)
        except UnknownOpError as e:
            raise VerifyError(f"{where}: {e}") from None
        try:
            opdef.check_arity(len(op.operands))
            opdef.check_attrs(op.attrs)
            expected = result_types(m, op)
        except OpError as e:
            raise VerifyError(f"{where}: {e}") from None
        got = [r.type for r in op.results]
        if len(got) != len(expected):
            raise VerifyError(f"{where}: produces {len(expected)} result(s), the op lists {len(got)}")
        for r, want in zip(op.results, expected):
            if r.type != want:
                raise VerifyError(f"{where}: result %{r.name} is declared {r.type} but the type rule gives {want}")
        for r in op.results:
            if r.name in defined:
                raise VerifyError(f"{where}: %{r.name} is defined twice")
            defined[r.name] = r
    for r in f.results:
        if r.name not in defined or defined[r.name] != r:
            raise VerifyError(f"@{f.name}: returned value %{r.name} is not defined in the function")


def verify(m: Module) -> Module:
    if not m.functions:
        raise VerifyError(f"module @{m.name} has no functions")
    for name, p in m.params.items():
        if name != p.name:
            raise VerifyError(f"module @{m.name}: parameter table key {name!r} differs from its name {p.name!r}")
        if not p.type.is_static:
            raise VerifyError(f"parameter @{name} has symbolic shape {p.type}; parameters must be static")
    for f in m.functions.values():
        verify_function(m, f)
    return m
