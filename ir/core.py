"""IR objects: values, ops, functions, parameters, modules.

Values are immutable (name + type) so structural equality of whole modules is plain dataclass
equality; that is what `parse(print(m)) == m` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from r1c.ir.dims import Dim
from r1c.ir.types import DType, TensorType


class DimList(tuple):
    """An attribute that is a list of (possibly symbolic) dims, e.g. a reshape target."""


Attr = Any  # int | float | bool | str | DType | DimList | tuple[Attr, ...] | None


def freeze_attr(v: Any) -> Attr:
    if isinstance(v, DimList):
        return v
    if isinstance(v, (list, tuple)):
        frozen = tuple(freeze_attr(x) for x in v)
        # Only a genuine mix is ambiguous (a shape half-wrapped); all-string tuples are lists of names.
        if any(isinstance(x, str) for x in frozen) and any(
            isinstance(x, int) and not isinstance(x, bool) for x in frozen
        ):
            raise TypeError("a list mixing ints and strings is ambiguous: wrap shape lists in DimList")
        return frozen
    if isinstance(v, (bool, int, float, str, DType)) or v is None:
        return v
    raise TypeError(f"unsupported attribute value {v!r} of type {type(v).__name__}")


@dataclass(frozen=True)
class Value:
    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass
class Op:
    name: str
    operands: tuple[Value, ...]
    results: tuple[Value, ...]
    attrs: dict[str, Attr] = field(default_factory=dict)
    loc: str | None = None

    def __post_init__(self) -> None:
        self.operands = tuple(self.operands)
        self.results = tuple(self.results)
        self.attrs = {k: freeze_attr(v) for k, v in self.attrs.items()}

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"op {self.name} has {len(self.results)} results, not 1")
        return self.results[0]


@dataclass
class Param:
    """A named weight of the module. `init` is an initializer spec such as "normal(0.02)", "ones", "zeros"."""

    name: str
    type: TensorType
    init: str = "zeros"


@dataclass
class Function:
    name: str
    args: list[Value]
    body: list[Op]
    results: list[Value]

    def values(self) -> Iterator[Value]:
        yield from self.args
        for op in self.body:
            yield from op.results

    def users(self) -> dict[Value, list[Op]]:
        out: dict[Value, list[Op]] = {v: [] for v in self.values()}
        for op in self.body:
            for v in op.operands:
                out.setdefault(v, []).append(op)
        return out

    def producers(self) -> dict[Value, Op]:
        return {r: op for op in self.body for r in op.results}


@dataclass
class Module:
    name: str
    params: dict[str, Param] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)
    attrs: dict[str, Attr] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attrs = {k: freeze_attr(v) for k, v in self.attrs.items()}

    @property
    def main(self) -> Function:
        """The entry function: `forward` if present, else the first one."""
        if "forward" in self.functions:
            return self.functions["forward"]
        if not self.functions:
            raise ValueError(f"module @{self.name} has no functions")
        return next(iter(self.functions.values()))

    def __str__(self) -> str:
        from r1c.ir.printer import print_module

        return print_module(self)


def symbolic_dims(types: list[TensorType]) -> set[str]:
    from r1c.ir import dims

    return {s for t in types for d in t.shape for s in dims.symbols(d)}


__all__ = ["Attr", "Dim", "DimList", "Function", "Module", "Op", "Param", "Value", "freeze_attr", "symbolic_dims"]
