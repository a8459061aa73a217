"""Data movement: reshape, transpose, concat, slice, broadcast, gather/take, one-hot."""

from __future__ import annotations

import numpy as np

from r1c.ir import dims
from r1c.ir.core import DimList
from r1c.ir.ops._util import axis_of, require_int, same_dim, same_dtype
from r1c.ir.ops.grad_util import is_float, no_grad, unbroadcast, zeros
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register, traffic_cost
from r1c.ir.types import DType, TensorType


def _reshape_rule(ins, a):
    (x,) = ins
    target = list(a["shape"])
    if target.count(-1) > 1:
        raise OpError(f"reshape: at most one -1 in {target}")
    if -1 in target:
        known = dims.mul(*(d for d in target if d != -1)) if len(target) > 1 else 1
        try:
            target[target.index(-1)] = dims.div(x.numel(), known)
        except dims.DimError as e:
            raise OpError(f"reshape: cannot infer -1 in {target} from {x}: {e}") from None
    new_numel = dims.mul(*target) if target else 1
    if new_numel != x.numel():
        raise OpError(f"reshape: {x} has {x.numel()} elements, target {list(a['shape'])} has {new_numel}")
    return [x.with_shape(tuple(target))]


def _float_vjp(rule):
    """Wrap a rule of a data-movement op: integer operands get no gradient, a None cotangent gives None."""

    def vjp(fb, op, cts):
        if cts[0] is None or not is_float(op.operands[0]):
            return [None] * len(op.operands)
        return rule(fb, op, cts[0])

    return vjp


@_float_vjp
def _reshape_vjp(fb, op, g):
    return [fb.reshape(g, shape=DimList(op.operands[0].type.shape))]


register(
    OpDef(
        "reshape",
        "Same elements, new shape (row-major); one -1 is inferred.",
        ("x",),
        _reshape_rule,
        lambda ins, a: [ins[0].reshape(a["shape"])],
        lambda i, o, a: Cost(0, 0),
        {"shape": AttrSpec("dims")},
        vjp=_reshape_vjp,
    )
)


def _transpose_rule(ins, a):
    (x,) = ins
    perm = a["perm"]
    if sorted(p % x.rank if -x.rank <= p < x.rank else -1 for p in perm) != list(range(x.rank)):
        raise OpError(f"transpose: perm {list(perm)} is not a permutation of {x.rank} axes")
    return [x.with_shape(tuple(x.shape[p] for p in perm))]


@_float_vjp
def _transpose_vjp(fb, op, g):
    perm = [p % g.type.rank for p in op.attrs["perm"]]
    return [fb.transpose(g, perm=tuple(perm.index(i) for i in range(len(perm))))]


register(
    OpDef(
        "transpose",
        "Permute axes: result axis i is operand axis perm[i].",
        ("x",),
        _transpose_rule,
        lambda ins, a: [np.transpose(ins[0], a["perm"])],
        traffic_cost,
        {"perm": AttrSpec("ints")},
        vjp=_transpose_vjp,
    )
)


def _concat_rule(ins, a):
    dtype = same_dtype("concat", ins)
    ax = axis_of(a["axis"], ins[0].rank, "concat")
    for t in ins[1:]:
        if t.rank != ins[0].rank:
            raise OpError(f"concat: ranks differ ({ins[0]} vs {t})")
        for i in range(t.rank):
            if i != ax:
                same_dim("concat", ins[0].shape[i], t.shape[i], f"axis {i}")
    total = dims.normalize(ins[0].shape[ax]) if len(ins) == 1 else _add_dims([t.shape[ax] for t in ins])
    return [TensorType(dtype, tuple(total if i == ax else d for i, d in enumerate(ins[0].shape)))]


def _add_dims(ds):
    if not all(isinstance(d, int) for d in ds):
        raise OpError(f"concat: sizes along the axis must be static to add them, got {ds}")
    return sum(ds)


@_float_vjp
def _concat_vjp(fb, op, g):
    axis, start, out = op.attrs["axis"], 0, []
    for x in op.operands:
        size = x.type.shape[axis]
        out.append(fb.slice(g, axis=axis, start=start, stop=start + size))
        start += size
    return out


register(
    OpDef(
        "concat",
        "Join operands along `axis`.",
        ("*xs",),
        _concat_rule,
        lambda ins, a: [np.concatenate(ins, axis=a["axis"])],
        traffic_cost,
        {"axis": AttrSpec("int")},
        vjp=_concat_vjp,
    )
)


def _slice_rule(ins, a):
    (x,) = ins
    ax = axis_of(a["axis"], x.rank, "slice")
    size, start, stop, step = x.shape[ax], a["start"], a["stop"], a["step"]
    if step < 1:
        raise OpError(f"slice: step must be >= 1, got {step}")
    if not isinstance(size, int):
        if start < 0 or stop < 0:
            raise OpError(f"slice: negative bounds on symbolic axis of size {size}")
        n = (stop - start + step - 1) // step
    else:
        n = len(range(*slice(start, stop, step).indices(size)))
        if not 0 <= start < size and not (start == stop == size):
            raise OpError(f"slice: start {start} out of range for axis {a['axis']} of size {size}")
    if n <= 0:
        raise OpError(f"slice: [{start}:{stop}:{step}] is empty on axis of size {size}")
    return [x.with_shape(tuple(n if i == ax else d for i, d in enumerate(x.shape)))]


def _slice_ref(ins, a):
    x = ins[0]
    idx = [slice(None)] * x.ndim
    idx[a["axis"]] = slice(a["start"], a["stop"], a["step"])
    return [x[tuple(idx)]]


@_float_vjp
def _slice_vjp(fb, op, g):
    x = op.operands[0]
    return [fb.slice_scatter(zeros(fb, x.type), g, **op.attrs)]


register(
    OpDef(
        "slice",
        "Elements start:stop:step along `axis` (static bounds).",
        ("x",),
        _slice_rule,
        _slice_ref,
        traffic_cost,
        {"axis": AttrSpec("int"), "start": AttrSpec("int"), "stop": AttrSpec("int"), "step": AttrSpec("int", 1)},
        vjp=_slice_vjp,
    )
)


def _broadcast_rule(ins, a):
    (x,) = ins
    target = tuple(dims.normalize(d) for d in a["shape"])
    if len(target) < x.rank:
        raise OpError(f"broadcast_to: target {list(target)} has lower rank than {x}")
    for d, t in zip(reversed(x.shape), reversed(target)):
        if d != 1 and d != t:
            raise OpError(f"broadcast_to: {x} does not broadcast to {list(target)}")
    return [x.with_shape(target)]


def _broadcast_ref(ins, a):
    x = ins[0]
    return [np.broadcast_to(x.reshape((1,) * (len(a["shape"]) - x.ndim) + x.shape), a["shape"])]


@_float_vjp
def _broadcast_vjp(fb, op, g):
    return [unbroadcast(fb, g, op.operands[0].type)]


register(
    OpDef(
        "broadcast_to",
        "Broadcast to `shape` (numpy rules).",
        ("x",),
        _broadcast_rule,
        _broadcast_ref,
        traffic_cost,
        {"shape": AttrSpec("dims")},
        vjp=_broadcast_vjp,
    )
)


def _gather_rule(ins, a):
    x, idx = ins
    require_int("gather", idx)
    ax = axis_of(a["axis"], x.rank, "gather")
    if idx.rank != x.rank:
        raise OpError(f"gather: indices {idx} must have the rank of {x}")
    for i in range(x.rank):
        if i != ax:
            same_dim("gather", x.shape[i], idx.shape[i], f"axis {i}")
    return [x.with_shape(idx.shape)]


def _check_bounds(idx: np.ndarray, size: int, op: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise OpError(f"{op}: index out of range [0, {size}): min {idx.min()}, max {idx.max()}")


def _gather_ref(ins, a):
    x, idx = ins
    _check_bounds(idx, x.shape[a["axis"]], "gather")
    return [np.take_along_axis(x, idx.astype(np.int64), axis=a["axis"])]


@_float_vjp
def _gather_vjp(fb, op, g):
    x, idx = op.operands
    return [fb.scatter_add(zeros(fb, x.type), idx, g, axis=op.attrs["axis"]), None]


register(
    OpDef(
        "gather",
        "out[..i..] = x[..idx[..i..]..] along `axis` (take_along_axis).",
        ("x", "indices"),
        _gather_rule,
        _gather_ref,
        traffic_cost,
        {"axis": AttrSpec("int")},
        vjp=_gather_vjp,
    )
)


def _take_rule(ins, a):
    x, idx = ins
    require_int("take", idx)
    ax = axis_of(a["axis"], x.rank, "take")
    return [x.with_shape(x.shape[:ax] + idx.shape + x.shape[ax + 1 :])]


def _take_ref(ins, a):
    x, idx = ins
    _check_bounds(idx, x.shape[a["axis"]], "take")
    return [np.take(x, idx.astype(np.int64), axis=a["axis"])]


@_float_vjp
def _take_vjp(fb, op, g):
    x, idx = op.operands
    return [fb.index_add(zeros(fb, x.type), idx, g, axis=op.attrs["axis"]), None]


register(
    OpDef(
        "take",
        "Select slices of x along `axis` by an index tensor of any rank (numpy.take).",
        ("x", "indices"),
        _take_rule,
        _take_ref,
        traffic_cost,
        {"axis": AttrSpec("int")},
        vjp=_take_vjp,
    )
)


def _one_hot_rule(ins, a):
    (idx,) = ins
    require_int("one_hot", idx)
    if a["depth"] < 1:
        raise OpError(f"one_hot: depth must be >= 1, got {a['depth']}")
    return [TensorType(a["dtype"], idx.shape + (a["depth"],))]


register(
    OpDef(
        "one_hot",
        "out[..., j] = (idx[...] == j) as `dtype`.",
        ("indices",),
        _one_hot_rule,
        lambda ins, a: [(ins[0][..., None] == np.arange(a["depth"])).astype(np.float32)],
        lambda i, o, a: Cost(0, bytes_of(i) + bytes_of(o)),
        {"depth": AttrSpec("int"), "dtype": AttrSpec("dtype", DType.f32)},
        vjp=no_grad,
    )
)
