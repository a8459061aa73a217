"""Reductions, softmax and top-k."""

from __future__ import annotations

import numpy as np

from r1c.ir.ops._util import axis_of, require_float
from r1c.ir.ops.grad_util import count, expand_reduced, is_float, no_grad, zeros
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, elementwise_cost, numel, per_input_cost, register
from r1c.ir.types import DType, TensorType


def _axes(t: TensorType, axes: tuple[int, ...], op: str) -> tuple[int, ...]:
    norm = tuple(sorted({axis_of(a, t.rank, op) for a in axes}))
    if len(norm) != len(axes):
        raise OpError(f"{op}: repeated axis in {list(axes)}")
    return norm


def _reduce_rule(name: str):
    def rule(ins, a):
        (x,) = ins
        if not a["axes"]:
            raise OpError(f"{name}: give at least one axis")
        axes = _axes(x, a["axes"], name)
        if name == "reduce_mean":
            require_float(name, x)
        if a["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [x.with_shape(shape)]

    return rule


def _reduce_vjp(name: str):
    def vjp(fb, op, cts):
        (x,), (g,) = op.operands, cts
        if g is None or not is_float(x):
            return [None]
        axes = op.attrs["axes"]
        spread = expand_reduced(fb, g, x.type, axes)
        if name == "reduce_sum":
            return [spread]
        if name == "reduce_mean":
            return [fb.div(spread, count(fb, x.type, axes))]
        # max/min: like torch's amax/amin, ties share the cotangent evenly.
        hit = fb.cast(fb.eq(x, expand_reduced(fb, op.result, x.type, axes)), dtype=x.type.dtype)
        hits = fb.reduce_sum(hit, axes=axes, keepdims=True)
        return [fb.mul(spread, fb.div(hit, hits))]

    return vjp


REDUCE = {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min}
for _name, _fn in REDUCE.items():
    register(
        OpDef(
            _name,
            f"{_name.split('_')[1]} over `axes`.",
            ("x",),
            _reduce_rule(_name),
            (
                lambda fn: (
                    lambda ins, a: [
                        fn(
                            ins[0].astype(np.float64) if ins[0].dtype.kind == "f" else ins[0],
                            axis=tuple(a["axes"]),
                            keepdims=a["keepdims"],
                        )
                    ]
                )
            )(_fn),
            per_input_cost(1),
            {"axes": AttrSpec("ints"), "keepdims": AttrSpec("bool", False)},
            vjp=_reduce_vjp(_name),
        )
    )


def _argmax_rule(ins, a):
    (x,) = ins
    ax = axis_of(a["axis"], x.rank, "argmax")
    return [TensorType(DType.int32, tuple(d for i, d in enumerate(x.shape) if i != ax))]


register(
    OpDef(
        "argmax",
        "Index of the largest element along `axis` (first on ties).",
        ("x",),
        _argmax_rule,
        lambda ins, a: [np.argmax(ins[0], axis=a["axis"]).astype(np.int32)],
        per_input_cost(1),
        {"axis": AttrSpec("int", -1)},
        vjp=no_grad,
    )
)


def _softmax_rule(name: str):
    def rule(ins, a):
        require_float(name, ins[0])
        axis_of(a["axis"], ins[0].rank, name)
        return [ins[0]]

    return rule


def _softmax(x, axis):
    x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _softmax_vjp(fb, op, cts):
    (g,), y = cts, op.result
    if g is None:
        return [None]
    axis = op.attrs["axis"]
    dot = fb.reduce_sum(fb.mul(g, y), axes=(axis,), keepdims=True)
    return [fb.mul(y, fb.sub(g, dot))]


def _log_softmax_vjp(fb, op, cts):
    (g,), y = cts, op.result
    if g is None:
        return [None]
    total = fb.reduce_sum(g, axes=(op.attrs["axis"],), keepdims=True)
    return [fb.sub(g, fb.mul(fb.exp(y), total))]


register(
    OpDef(
        "softmax",
        "Softmax along `axis`, computed in float32 or wider.",
        ("x",),
        _softmax_rule("softmax"),
        lambda ins, a: [_softmax(ins[0], a["axis"])],
        elementwise_cost(5),
        {"axis": AttrSpec("int", -1)},
        vjp=_softmax_vjp,
    )
)
register(
    OpDef(
        "log_softmax",
        "Log-softmax along `axis`.",
        ("x",),
        _softmax_rule("log_softmax"),
        lambda ins, a: [_log_softmax(ins[0], a["axis"])],
        elementwise_cost(5),
        {"axis": AttrSpec("int", -1)},
        vjp=_log_softmax_vjp,
    )
)


def _cumsum_rule(ins, a):
    axis_of(a["axis"], ins[0].rank, "cumsum")
    return [ins[0]]


def _cumsum_vjp(fb, op, cts):
    (x,), (g,) = op.operands, cts
    if g is None or not is_float(x):
        return [None]
    # The reversed prefix sum: total - cumsum(g) + g (no flip op needed).
    axis = op.attrs["axis"]
    total = fb.reduce_sum(g, axes=(axis,), keepdims=True)
    return [fb.add(fb.sub(total, fb.cumsum(g, axis=axis)), g)]


register(
    OpDef(
        "cumsum",
        "Inclusive prefix sum along `axis`.",
        ("x",),
        _cumsum_rule,
        lambda ins, a: [np.cumsum(ins[0], axis=a["axis"])],
        elementwise_cost(1),
        {"axis": AttrSpec("int")},
        vjp=_cumsum_vjp,
    )
)


def _topk_rule(ins, a):
    (x,) = ins
    ax = axis_of(a["axis"], x.rank, "topk")
    size = x.shape[ax]
    if a["k"] < 1 or (isinstance(size, int) and a["k"] > size):
        raise OpError(f"topk: k={a['k']} is out of range for axis {a['axis']} of size {size}")
    shape = tuple(a["k"] if i == ax else d for i, d in enumerate(x.shape))
    return [x.with_shape(shape), TensorType(DType.int32, shape)]


def _topk_ref(ins, a):
    x, k, axis = ins[0], a["k"], a["axis"]
    if a["largest"]:
        # Descending without negating the key (negation overflows at INT_MIN): sort the reversed axis
        # ascending and reverse that order, which keeps ties at the lower index and NaN first, like torch.
        n = x.shape[axis]
        idx = (n - 1) - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        idx = np.argsort(x, axis=axis, kind="stable")  # stable: ties go to the lower index, like torch on CPU
    idx = np.take(idx, np.arange(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int32)]


def _topk_cost(ins, outs, a):
    n = numel(ins[0])
    return Cost(n * max(1, int(np.ceil(np.log2(max(a["k"], 2))))), bytes_of(ins) + bytes_of(outs))


def _topk_vjp(fb, op, cts):
    (x,), (g, _) = op.operands, cts
    if g is None:
        return [None]
    return [fb.scatter_add(zeros(fb, x.type), op.results[1], g, axis=op.attrs["axis"])]


register(
    OpDef(
        "topk",
        "The k largest (or smallest) values along `axis`, sorted, and their int32 indices.",
        ("x",),
        _topk_rule,
        _topk_ref,
        _topk_cost,
        {"k": AttrSpec("int"), "axis": AttrSpec("int", -1), "largest": AttrSpec("bool", True)},
        vjp=_topk_vjp,
    )
)
