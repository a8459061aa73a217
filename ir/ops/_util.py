"""Helpers shared by op definitions: broadcasting, axis normalization, result-type shorthands."""

from __future__ import annotations

from r1c.ir import dims
from r1c.ir.dims import Dim
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def axis_of(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise OpError(f"{op}: axis {axis} is out of range for rank {rank}")
    return axis % rank


def broadcast_shapes(op: str, *shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        size: Dim = 1
        for s in shapes:
            d = s[i - rank + len(s)] if i - rank + len(s) >= 0 else 1
            if d == 1:
                continue
            if size != 1 and size != d:
                raise OpError(
                    f"{op}: shapes {' and '.join('[' + ','.join(map(str, s)) + ']' for s in shapes)} "
                    f"do not broadcast (dimension {size} vs {d})"
                )
            size = d
        out.append(size)
    return tuple(out)


def same_dtype(op: str, types: list[TensorType]) -> DType:
    kinds = {t.dtype for t in types}
    if len(kinds) != 1:
        raise OpError(f"{op}: operand dtypes differ ({', '.join(str(t) for t in types)}); insert a cast")
    return kinds.pop()


def require_float(op: str, t: TensorType) -> None:
    if not t.dtype.is_float:
        raise OpError(f"{op}: needs a float operand, got {t}")


def require_int(op: str, t: TensorType, what: str = "indices") -> None:
    if t.dtype not in (DType.int32, DType.int8):
        raise OpError(f"{op}: {what} must be int32, got {t}")


def require_rank(op: str, t: TensorType, rank: int, what: str) -> None:
    if t.rank != rank:
        raise OpError(f"{op}: {what} must have rank {rank}, got {t}")


def same_dim(op: str, a: Dim, b: Dim, what: str) -> None:
    if dims.normalize(a) != dims.normalize(b):
        raise OpError(f"{op}: {what} mismatch: {a} vs {b}")
