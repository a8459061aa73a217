"""Compile-time values: constant folding, symbolic dims, and the builtin functions on constants."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from r1c.ir import dims
from r1c.ir.core import Value
from r1c.ir.ops.nn import yarn_mscale
from r1c.ir.types import DType


class ConstError(ValueError):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Sym:
    """A symbolic dimension ("B", "B*S"): products and exact divisions only, like `r1c.ir.dims`."""

    dim: str

    def __str__(self) -> str:
        return self.dim


def dim_value(d: dims.Dim) -> int | Sym:
    return d if isinstance(d, int) else Sym(d)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_dim(v: Any) -> bool:
    return isinstance(v, Sym) or (isinstance(v, int) and not isinstance(v, bool))


def describe(v: Any) -> str:
    if isinstance(v, Value):
        return f"tensor {v.type}"
    if isinstance(v, bool):
        return f"bool {'true' if v else 'false'}"
    if isinstance(v, int):
        return f"int {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, DType):
        return f"dtype {v.value}"
    if isinstance(v, Sym):
        return f"symbolic dim {v.dim}"
    if isinstance(v, list):
        return f"list [{', '.join(describe(x) for x in v)}]"
    if isinstance(v, tuple):
        return f"{len(v)} values"
    return type(v).__name__


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
}
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "pow": "**"}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _dim_arith(op: str, a: int | Sym, b: int | Sym) -> int | Sym:
    da, db = (x.dim if isinstance(x, Sym) else x for x in (a, b))
    if op == "mul":
        return dim_value(dims.mul(da, db))
    if op == "floordiv":
        try:
            return dim_value(dims.div(da, db))
        except dims.DimError as e:
            raise ConstError(str(e), "symbolic dims divide only exactly") from None
    raise ConstError(
        f"symbolic dim arithmetic supports only * and exact //, not {_SYMBOLS[op]} ({da} {_SYMBOLS[op]} {db})",
        "shapes are products of symbols; compute sizes from config constants instead",
    )


def binary(op: str, a: Any, b: Any) -> Any:
    """Fold a binary operator on constants."""
    if op in ("and", "or"):
        if not (isinstance(a, bool) and isinstance(b, bool)):
            raise ConstError(
                f"'{op}' needs two bools, got {describe(a)} and {describe(b)}",
                "compare numbers first, e.g. `n > 0 and flag`",
            )
        return (a and b) if op == "and" else (a or b)
    if op in _COMPARE:
        if isinstance(a, Sym) or isinstance(b, Sym):
            if op not in ("==", "!="):
                raise ConstError(f"cannot order symbolic dims ({describe(a)} {op} {describe(b)})")
            eq = (
                is_dim(a)
                and is_dim(b)
                and dims.normalize(a.dim if isinstance(a, Sym) else a)
                == dims.normalize(b.dim if isinstance(b, Sym) else b)
            )
            return eq if op == "==" else not eq
        if (
            op not in ("==", "!=")
            and not (is_number(a) and is_number(b))
            and not (isinstance(a, str) and isinstance(b, str))
        ):
            raise ConstError(f"cannot compare {describe(a)} {op} {describe(b)}")
        return _COMPARE[op](a, b)
    if isinstance(a, Sym) or isinstance(b, Sym):
        if not (is_dim(a) and is_dim(b)):
            raise ConstError(f"cannot apply {_SYMBOLS[op]} to {describe(a)} and {describe(b)}")
        return _dim_arith(op, a, b)
    if op == "add" and isinstance(a, str) and isinstance(b, str):
        return a + b
    if not (is_number(a) and is_number(b)):
        raise ConstError(f"cannot apply {_SYMBOLS[op]} to {describe(a)} and {describe(b)}")
    if op in ("div", "floordiv", "mod") and b == 0:
        raise ConstError(f"division by zero ({a} {_SYMBOLS[op]} {b})")
    try:
        return _ARITH[op](a, b)
    except (OverflowError, ValueError, ZeroDivisionError) as e:
        raise ConstError(f"{a} {_SYMBOLS[op]} {b}: {e}") from None


def unary(op: str, a: Any) -> Any:
    if op == "not":
        if not isinstance(a, bool):
            raise ConstError(f"'not' needs a bool, got {describe(a)}")
        return not a
    if not is_number(a):
        raise ConstError(f"cannot negate {describe(a)}")
    return -a


def _numbers(name: str, args: tuple, lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}" if hi < 99 else f"at least {lo}"
        raise ConstError(f"{name}() takes {want} argument(s), got {len(args)}")
    for a in args:
        if not is_number(a):
            raise ConstError(f"{name}() needs numbers, got {describe(a)}")


def _math(name: str, fn: Callable[[float], float]) -> Callable[..., float]:
    def call(*args: Any) -> float:
        _numbers(name, args, 1, 1)
        try:
            return fn(args[0])
        except (ValueError, OverflowError) as e:
            raise ConstError(f"{name}({args[0]}): {e}") from None

    return call


def _minmax(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        _numbers(name, args, 1, 99)
        return fn(args)

    return call


def _int(*args: Any) -> int:
    _numbers("int", args, 1, 1)
    return int(args[0])


def _float(*args: Any) -> float:
    _numbers("float", args, 1, 1)
    return float(args[0])


def _yarn(*args: Any) -> float:
    _numbers("yarn_mscale", args, 1, 2)
    return yarn_mscale(*(float(a) for a in args))


# min/max/abs/sqrt/log/exp also name ops or op aliases: the lowering uses these only when every argument is a constant.
BUILTINS: dict[str, Callable[..., Any]] = {
    "min": _minmax("min", min),
    "max": _minmax("max", max),
    "int": _int,
    "float": _float,
    "sqrt": _math("sqrt", math.sqrt),
    "log": _math("log", math.log),
    "exp": _math("exp", math.exp),
    "abs": _math("abs", abs),
    "yarn_mscale": _yarn,
}

# Names that mean a constant unless a variable or config constant of that name shadows them.
DTYPE_NAMES: dict[str, DType] = {d.value: d for d in DType} | {"i32": DType.int32}
NAMED_CONSTANTS: dict[str, Any] = {"inf": math.inf}
