"""The Python graph-builder API. The DSL lowers through it too, so both produce identical IR.

from r1c import build
mb = build.ModuleBuilder("mlp")
f = mb.function("forward", x=build.tensor("f32", ["B", 64]))
w = f.param("w", build.tensor("f32", [64, 64]), init="normal(0.02)")
f.ret(f.silu(f.linear(f.args[0], w)))
module = mb.build()
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from r1c.ir import registry
from r1c.ir.core import Function, Module, Op, Param, Value
from r1c.ir.registry import OpError
from r1c.ir.types import TensorType, tensor
from r1c.ir.verifier import verify

__all__ = ["BuildError", "FunctionBuilder", "ModuleBuilder", "tensor"]


class BuildError(ValueError):
    pass


class ModuleBuilder:
    def __init__(self, name: str, attrs: dict[str, Any] | None = None) -> None:
        self.module = Module(name, attrs=dict(attrs or {}))

    def declare_param(self, name: str, type: TensorType, init: str = "zeros") -> Param:
        existing = self.module.params.get(name)
        if existing is not None:
            if existing.type != type:
                raise BuildError(f"parameter @{name} declared as {existing.type} and again as {type}")
            return existing
        if not type.is_static:
            raise BuildError(f"parameter @{name} must have a static shape, got {type}")
        self.module.params[name] = Param(name, type, init)
        return self.module.params[name]

    def function(self, name: str, **args: TensorType) -> "FunctionBuilder":
        if name in self.module.functions:
            raise BuildError(f"function @{name} already exists")
        fb = FunctionBuilder(self, name, args)
        self.module.functions[name] = fb.function
        return fb

    def build(self, check: bool = True) -> Module:
        return verify(self.module) if check else self.module


_VALUE_NAME = re.compile(r"[^A-Za-z0-9_.]")


class FunctionBuilder:
    def __init__(self, parent: ModuleBuilder, name: str, args: dict[str, TensorType]) -> None:
        self.parent = parent
        self.function = Function(name, [Value(n, t) for n, t in args.items()], [], [])
        self._names = {a.name for a in self.function.args}
        self._counter = 0
        self._scope: list[str] = []
        self._params: dict[str, Value] = {}

    @classmethod
    def appending_to(cls, parent: ModuleBuilder, function: Function) -> "FunctionBuilder":
        """A builder that appends ops to an existing function of `parent`'s module (fresh names avoid its own)."""
        fb = cls(parent, function.name, {})
        fb.function = function
        fb._names = {a.name for a in function.args} | {r.name for op in function.body for r in op.results}
        fb._params = {op.attrs["name"]: op.result for op in function.body if op.name == "param"}
        return fb

    @property
    def args(self) -> list[Value]:
        return self.function.args

    def arg(self, name: str) -> Value:
        for a in self.function.args:
            if a.name == name:
                return a
        raise BuildError(f"@{self.function.name} has no argument %{name}")

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Ops built inside carry loc("outer.name"): passes and pipeline partitioning read layer boundaries from it."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    @property
    def loc(self) -> str | None:
        return ".".join(self._scope) or None

    def _fresh(self, hint: str | None = None) -> str:
        if hint:
            base = _VALUE_NAME.sub("_", hint)
            name, i = base, 1
            while name in self._names:
                name, i = f"{base}.{i}", i + 1
        else:
            while str(self._counter) in self._names:
                self._counter += 1
            name = str(self._counter)
            self._counter += 1
        self._names.add(name)
        return name

    def param(self, name: str, type: TensorType | None = None, init: str = "zeros") -> Value:
        """Read a weight; declares it in the module when a type is given."""
        if type is not None:
            self.parent.declare_param(name, type, init)
        elif name not in self.parent.module.params:
            raise BuildError(f"parameter @{name} is not declared; give its type")
        if name not in self._params:
            t = self.parent.module.params[name].type
            v = Value(self._fresh(name), t)
            self.function.body.append(Op("param", (), (v,), {"name": name}, None))
            self._params[name] = v
        return self._params[name]

    def op(self, opname: str, *operands: Value, **attrs: Any) -> Value | tuple[Value, ...]:
        opdef = registry.get(opname)
        for v in operands:
            if not isinstance(v, Value):
                raise BuildError(f"{opname}: operand {v!r} is not an IR value")
        try:
            full = opdef.complete_attrs(attrs)
            types = opdef.infer([v.type for v in operands], full)
        except OpError as e:
            shapes = ", ".join(f"{v}: {v.type}" for v in operands)
            raise BuildError(f"{opname}({shapes}): {e}") from None
        results = tuple(Value(self._fresh(), t) for t in types)
        self.function.body.append(Op(opname, operands, results, full, self.loc))
        return results[0] if len(results) == 1 else results

    def ret(self, *values: Value) -> None:
        self.function.results = list(values)

    def __getattr__(self, opname: str):
        if opname.startswith("_"):
            raise AttributeError(opname)
        registry.get(opname)  # unknown names fail here, with a suggestion
        return lambda *operands, **attrs: self.op(opname, *operands, **attrs)
