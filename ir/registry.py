"""The op registry: each op has exactly one definition (operands, attributes, type rule,
numpy reference, cost, and a VJP slot that the training work fills in)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from r1c.ir.core import Attr, DimList
from r1c.ir.dims import DimError
from r1c.ir.types import DType, TensorType

REQUIRED = object()


class OpError(ValueError):
    """A type-rule or attribute error; the verifier prefixes it with the op and value names."""


@dataclass(frozen=True)
class AttrSpec:
    kind: str  # int | float | bool | str | dtype | dims | ints | floats | any
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None

    def check(self, op: str, name: str, value: Attr) -> None:
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "dtype": lambda v: isinstance(v, DType),
            "dims": lambda v: (
                isinstance(v, tuple) and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in v)
            ),
            "ints": lambda v: isinstance(v, tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in v),
            "floats": lambda v: isinstance(v, tuple) and all(isinstance(d, (int, float)) for d in v),
            "any": lambda v: True,
        }[self.kind]
        if value is None and self.default is None:
            return
        if not ok(value):
            raise OpError(f"attribute '{name}' of {op} must be {self.kind}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OpError(f"attribute '{name}' of {op} must be one of {list(self.choices)}, got {value!r}")


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int  # compulsory traffic: operands read + results written

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


TypeRule = Callable[[list[TensorType], dict[str, Attr]], list[TensorType]]
Reference = Callable[[list[np.ndarray], dict[str, Attr]], list[np.ndarray]]
CostRule = Callable[[list[TensorType], list[TensorType], dict[str, Attr]], Cost]


def bytes_of(types: list[TensorType]) -> int:
    total = 0
    for t in types:
        n = 1
        for d in t.shape:
            n *= d  # cost rules see concrete shapes
        total += n * t.dtype.itemsize
    return total


def traffic_cost(ins: list[TensorType], outs: list[TensorType], attrs: dict[str, Attr]) -> Cost:
    """Cost of ops that move data and do no arithmetic (reshape, gather, ...)."""
    return Cost(0, bytes_of(ins) + bytes_of(outs))


def numel(t: TensorType) -> int:
    """Element count of a concrete type (cost rules see concrete shapes)."""
    return int(np.prod(t.shape, dtype=np.int64))


def elementwise_cost(flops_per_element: int) -> CostRule:
    """`flops_per_element` for every result element, plus compulsory traffic."""

    def rule(ins: list[TensorType], outs: list[TensorType], attrs: dict[str, Attr]) -> Cost:
        return Cost(flops_per_element * sum(numel(o) for o in outs), bytes_of(ins) + bytes_of(outs))

    return rule


def per_input_cost(flops_per_element: int) -> CostRule:
    """`flops_per_element` for every element of the first operand (reductions, norms), plus compulsory traffic."""

    def rule(ins: list[TensorType], outs: list[TensorType], attrs: dict[str, Attr]) -> Cost:
        return Cost(flops_per_element * numel(ins[0]), bytes_of(ins) + bytes_of(outs))

    return rule


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    operands: tuple[str, ...]  # a trailing "*name" takes any number of operands
    type_rule: TypeRule
    reference: Reference
    cost: CostRule
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    vjp: Callable | None = None  # filled in by the training runtime issue
    pure: bool = True  # False for ops CSE/DCE must keep (none yet besides `param` semantics)

    @property
    def variadic(self) -> bool:
        return bool(self.operands) and self.operands[-1].startswith("*")

    def check_arity(self, n: int) -> None:
        fixed = len(self.operands) - (1 if self.variadic else 0)
        if (self.variadic and n < fixed) or (not self.variadic and n != fixed):
            want = f"at least {fixed}" if self.variadic else str(fixed)
            raise OpError(f"{self.name} takes {want} operands ({', '.join(self.operands)}), got {n}")

    def complete_attrs(self, attrs: dict[str, Attr]) -> dict[str, Attr]:
        """Fill defaults and check kinds; the IR always carries every attribute explicitly."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"{self.name} has no attribute(s) {sorted(unknown)}; it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                value = attrs[name]
            elif spec.default is REQUIRED:
                raise OpError(f"{self.name} needs attribute '{name}'")
            else:
                value = spec.default
            if isinstance(value, list):
                value = DimList(value) if spec.kind == "dims" else tuple(value)
            if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            spec.check(self.name, name, value)
            out[name] = value
        return out

    def check_attrs(self, attrs: dict[str, Attr]) -> None:
        missing = set(self.attrs) - set(attrs)
        if missing:
            raise OpError(f"{self.name} is missing attribute(s) {sorted(missing)}")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"{self.name} has no attribute(s) {sorted(unknown)}")
        for name, value in attrs.items():
            self.attrs[name].check(self.name, name, value)

    def infer(self, operand_types: list[TensorType], attrs: dict[str, Attr]) -> list[TensorType]:
        self.check_arity(len(operand_types))
        try:
            return self.type_rule(operand_types, attrs)
        except DimError as e:  # a bad dim in an attribute (reshape to [-2, 4]) is a type error of this op
            raise OpError(f"{self.name}: {e}") from None


_REGISTRY: dict[str, OpDef] = {}


class UnknownOpError(KeyError):
    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown op '{name}'{hint}")
        self.message = f"unknown op '{name}'{hint}"

    def __str__(self) -> str:
        return self.message


def register(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise ValueError(f"op {opdef.name} is defined twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def get(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownOpError(name) from None


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


def _ensure_loaded() -> None:
    import r1c.ir.ops  # noqa: F401  (registers every op on import)
