"""Lowerings of the expert-fusion ops (ir/ops/moe_fused.py) for the cpu target, each with the semantics of the op's
numpy reference, over the hand-written TIR of kernels_moe.py.

moe_permute is a counting sort (group offsets, row_of, the token of each row) plus a parallel row copy; the row
movements (gather, scatter, unpermute) are parallel loops; grouped_matmul is a grouped GEMM over each group's
contiguous rows only. Its weight is usually a concat in the graph (gate+up along N, routed+shared experts along E):
the lowering reads the concat's parts in place, one kernel per part, so the concatenated copy of every expert's
weights (1.5 GB a layer at V2-Lite) is never made. Row copies work for any dtype; the arithmetic is float32 only.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Callable

import tvm
from tvm import relax
from tvm.relax import op as R

from r1c.backends.cpu import kernels_moe
from r1c.backends.cpu.relax_ops import OPAQUE, lowering, tvm_dtype
from r1c.ir.core import Op, Value
from r1c.ir.types import DType

_CONCAT = tvm.ir.Op.get("relax.concat")


def _f32(op: Op) -> None:
    dtype = op.operands[0].type.dtype
    if dtype != DType.f32:
        raise NotImplementedError(f"cpu target: {op.name} is lowered for float32 only, got {dtype.value}")


def _static(op: Op, v: Value, axis: int, what: str) -> int:
    d = v.type.shape[axis]
    if not isinstance(d, int):
        raise NotImplementedError(f"cpu target: {op.name} needs a static {what}, got {v.type}")
    return d


def _kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add a kernels_moe function, opaque to FuseOps (fused, it would lose the attr that keeps its schedule)."""
    return bb.add_func(func.with_attr("op_pattern", OPAQUE), name)


def _i32(*shape: Any) -> relax.TensorType:
    return relax.TensorType(list(shape), "int32")


@lowering("moe_permute")
def _moe_permute(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    x, ids = ins
    a = op.attrs
    xv, idv = op.operands
    t, k, d = ctx(idv.type.shape[0]), _static(op, idv, 1, "slot count K"), _static(op, xv, 1, "width D")
    dt = tvm_dtype(xv.type.dtype)  # a row copy: any dtype
    route = kernels_moe.permute_route(
        a["num_experts"], k, a["num_shared"], float(a["capacity_factor"]), tvm_dtype(idv.type.dtype)
    )
    e = a["num_experts"]
    out = bb.emit(relax.call_tir(_kernel(bb, route, "moe_permute"), [ids], [_i32(e + 1), _i32(t, k), _i32(t * k)]))
    offsets, row_of, row_token = (bb.emit(relax.TupleGetItem(out, i)) for i in range(3))
    copy = _kernel(bb, kernels_moe.copy_rows(d, dt, "int32"), "moe_copy_rows")
    xs = relax.call_tir(copy, [x, row_token], relax.TensorType([t * k, d], dt))
    return [xs, offsets, row_of]


@lowering("moe_gather_rows")
def _moe_gather_rows(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    y, row_of = ins
    yv, rv = op.operands
    t, k, d = ctx(rv.type.shape[0]), ctx(rv.type.shape[1]), _static(op, yv, 1, "width D")
    dt = tvm_dtype(yv.type.dtype)
    copy = _kernel(bb, kernels_moe.copy_rows(d, dt, tvm_dtype(rv.type.dtype)), "moe_copy_rows")
    out = bb.emit(relax.call_tir(copy, [y, R.reshape(row_of, [t * k])], relax.TensorType([t * k, d], dt)))
    return [R.reshape(out, [t, k, d])]


@lowering("moe_scatter_rows")
def _moe_scatter_rows(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    _f32(op)
    z, row_of = ins
    zv, rv = op.operands
    t, k, d = ctx(zv.type.shape[0]), ctx(zv.type.shape[1]), _static(op, zv, 2, "width D")
    scatter = _kernel(bb, kernels_moe.scatter_add_rows(d, tvm_dtype(rv.type.dtype)), "moe_scatter_rows")
    args = [R.reshape(z, [t * k, d]), R.reshape(row_of, [t * k])]
    return [relax.call_tir(scatter, args, relax.TensorType([t * k, d], "float32"))]


@lowering("moe_unpermute")
def _moe_unpermute(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    _f32(op)
    yv, rv, _ = op.operands
    t, k, d = ctx(rv.type.shape[0]), _static(op, rv, 1, "slot count K"), _static(op, yv, 1, "width D")
    combine = _kernel(bb, kernels_moe.unpermute(d, k, tvm_dtype(rv.type.dtype)), "moe_unpermute")
    return [relax.call_tir(combine, list(ins), relax.TensorType([t, d], "float32"))]


@lowering("grouped_matmul")
def _grouped_matmul(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    _f32(op)
    x, w, offsets = ins
    xv, _, ov = op.operands
    rows, kdim = ctx(xv.type.shape[0]), _static(op, xv, 1, "contraction dim")
    n_off, off_dt = int(ov.type.shape[0]), tvm_dtype(ov.type.dtype)

    def gemm(w: Any, first: int) -> Any:
        """The grouped GEMM against w, through a concat's parts: along N the outputs sit side by side; along E
        each part's kernel zeroes the rows of the other parts' groups, so adding the outputs is exact."""
        bound = bb.lookup_binding(w) if isinstance(w, relax.Var) else None
        if isinstance(bound, relax.Call) and bound.op.same_as(_CONCAT) and isinstance(bound.args[0], relax.Tuple):
            parts, axis = list(bound.args[0].fields), int(bound.attrs.axis) % 3
            if axis == 1:
                return bb.emit(R.concat([gemm(p, first) for p in parts], axis=1))
            if axis == 0:
                firsts = [first + sum(int(q.ty.shape[0]) for q in parts[:i]) for i in range(len(parts))]
                return reduce(lambda a, b: bb.emit(R.add(a, b)), [gemm(p, f) for p, f in zip(parts, firsts)])
        if w in getattr(ctx, "packed", {}):
            raise NotImplementedError("cpu target: grouped_matmul reads weights unpacked, got one packed at load")
        groups, n, _ = (int(s) for s in w.ty.shape)
        gv = _kernel(bb, kernels_moe.grouped_gemm(groups, first, n, kdim, n_off, off_dt), "moe_grouped_gemm")
        return bb.emit(relax.call_tir(gv, [x, w, offsets], relax.TensorType([rows, n], "float32")))

    return [gemm(w, op.attrs["first_expert"])]


@lowering("grouped_matmul_wgrad")
def _grouped_matmul_wgrad(bb: relax.BlockBuilder, ins: list[Any], op: Op, ctx: Callable) -> list[Any]:
    _f32(op)
    dyv, xv, ov = op.operands
    n, d = _static(op, dyv, 1, "width N of dy"), _static(op, xv, 1, "width D of x")
    a = op.attrs
    wgrad = kernels_moe.grouped_wgrad(a["num_experts"], a["first_expert"], n, d, int(ov.type.shape[0]),
                                      tvm_dtype(ov.type.dtype))  # fmt: skip
    gv = _kernel(bb, wgrad, "moe_grouped_wgrad")
    return [relax.call_tir(gv, list(ins), relax.TensorType([a["num_experts"], n, d], "float32"))]
