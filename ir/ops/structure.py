"""Ops that make values: parameters, splat constants, iota, casts."""

from __future__ import annotations

import numpy as np

from r1c.ir.ops.grad_util import is_float, no_grad
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register, traffic_cost
from r1c.ir.types import DType, TensorType


def _param_rule(ins, attrs):
    # The type lives in the module's parameter table; the verifier checks it there.
    raise OpError("param takes its type from the module's parameter table")


def _param_ref(ins, attrs):
    raise OpError("param is read by the interpreter from the weights, not evaluated")


register(
    OpDef(
        "param",
        "Read the module parameter named `name`.",
        (),
        _param_rule,
        _param_ref,
        lambda ins, outs, a: Cost(0, bytes_of(outs)),
        {"name": AttrSpec("str")},
        vjp=no_grad,
    )
)

register(
    OpDef(
        "constant",
        "A tensor of `shape` filled with `value`.",
        (),
        lambda ins, a: [TensorType(a["dtype"], tuple(a["shape"]))],
        lambda ins, a: [np.full(_static(a["shape"], "constant"), a["value"], dtype=np.float64)],
        lambda ins, outs, a: Cost(0, bytes_of(outs)),
        {"value": AttrSpec("float"), "dtype": AttrSpec("dtype", DType.f32), "shape": AttrSpec("dims", ())},
        vjp=no_grad,
    )
)


def _static(shape, op: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in shape):
        raise OpError(f"{op}: shape {list(shape)} must be static here; use `broadcast_to` for symbolic shapes")
    return tuple(shape)


def _iota_ref(ins, a):
    (like,) = ins
    idx = np.arange(like.shape[a["axis"]]).reshape([-1 if i == a["axis"] % like.ndim else 1 for i in range(like.ndim)])
    return [np.broadcast_to(idx, like.shape)]


def _iota_rule(ins, a):
    (like,) = ins
    if not -like.rank <= a["axis"] < like.rank:
        raise OpError(f"iota: axis {a['axis']} out of range for {like}")
    return [like.with_dtype(a["dtype"])]


register(
    OpDef(
        "iota",
        "Indices along `axis`, with the shape of the operand (only its shape is read).",
        ("like",),
        _iota_rule,
        _iota_ref,
        lambda ins, outs, a: Cost(0, bytes_of(outs)),
        {"axis": AttrSpec("int"), "dtype": AttrSpec("dtype", DType.int32)},
        vjp=no_grad,
    )
)


def _cast_vjp(fb, op, cts):
    (x,), (g,) = op.operands, cts
    if g is None or not is_float(x) or not is_float(op.result):
        return [None]
    return [fb.cast(g, dtype=x.type.dtype)]


register(
    OpDef(
        "cast",
        "Convert to `dtype` (floats round to nearest even; float->int truncates toward zero).",
        ("x",),
        lambda ins, a: [ins[0].with_dtype(a["dtype"])],
        lambda ins, a: [
            ins[0].astype(np.float32)
            if a["dtype"].is_float
            else ins[0] != 0
            if a["dtype"] == DType.bool  # nonzero is true: do not truncate 0.5 to 0 first
            else np.trunc(ins[0])
            if ins[0].dtype.kind == "f"
            else ins[0]
        ],
        traffic_cost,
        {"dtype": AttrSpec("dtype")},
        vjp=_cast_vjp,
    )
)
