"""r1c ops as Relax expressions: one lowering per op name, each with the semantics of the op's numpy reference.

A lowering takes the BlockBuilder, the operands (Relax expressions), the IR op (attributes, result types) and a
`dim` function (IR dim -> PrimExpr) and returns one expression per result. Float math runs in the operands' dtype
(the reference computes in float64; tests compare within f32 tolerance). Ops without a lowering are a compile error
naming them (backends/cpu/lower.py), never a fallback.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from tvm import relax
from tvm.relax import op as R

from r1c.ir.core import Op
from r1c.ir.ops.nn import rope_inv_freq
from r1c.ir.types import DType

Lowering = Callable[[relax.BlockBuilder, list[Any], Op, Callable], list[Any]]
LOWERINGS: dict[str, Lowering] = {}

TVM_DTYPE = {
    DType.f32: "float32",
    DType.f16: "float16",
    DType.bf16: "bfloat16",
    DType.int32: "int32",
    DType.int8: "int8",
    DType.bool: "bool",
}


def tvm_dtype(dtype: DType) -> str:
    if dtype not in TVM_DTYPE:
        raise NotImplementedError(f"cpu target: dtype {dtype.value} is not supported")
    return TVM_DTYPE[dtype]


def lowering(*names: str) -> Callable[[Lowering], Lowering]:
    def register(fn: Lowering) -> Lowering:
        for n in names:
            LOWERINGS[n] = fn
        return fn

    return register


def _one(fn: Callable[..., Any]) -> Lowering:
    """A lowering of a single-result op from (bb, ins, op, dim) -> expression."""

    def wrapped(bb, ins, op, dim):
        return [fn(bb, ins, op, dim)]

    return wrapped


BINARY = {"add": R.add, "sub": R.subtract, "mul": R.multiply, "gt": R.greater, "lt": R.less, "ge": R.greater_equal,
          "le": R.less_equal, "eq": R.equal, "ne": R.not_equal, "maximum": R.maximum, "minimum": R.minimum}  # fmt: skip
UNARY = {"exp": R.exp, "neg": R.negative, "sigmoid": R.sigmoid, "silu": R.nn.silu, "sqrt": R.sqrt, "log": R.log,
         "rsqrt": R.rsqrt, "abs": R.abs, "cos": R.cos, "sin": R.sin}  # fmt: skip


for _name, _fn in BINARY.items():
    LOWERINGS[_name] = _one(lambda bb, ins, op, dim, f=_fn: f(ins[0], ins[1]))
for _name, _fn in UNARY.items():
    LOWERINGS[_name] = _one(lambda bb, ins, op, dim, f=_fn: f(ins[0]))


@lowering("div")
@_one
def _div(bb, ins, op, dim):
    if op.result.type.dtype.is_float:
        return R.divide(ins[0], ins[1])
    return R.floor_divide(ins[0], ins[1])  # integer division follows numpy (floor)


@lowering("where")
@_one
def _where(bb, ins, op, dim):
    return R.where(ins[0], ins[1], ins[2])


@lowering("swiglu")
@_one
def _swiglu(bb, ins, op, dim):
    return R.multiply(R.nn.silu(ins[0]), ins[1])


@lowering("constant")
@_one
def _constant(bb, ins, op, dim):
    t = op.result.type
    value = np.full([int(d) for d in t.shape], op.attrs["value"], dtype=tvm_dtype(t.dtype))
    return relax.const(value, tvm_dtype(t.dtype))


@lowering("cast")
@_one
def _cast(bb, ins, op, dim):
    return R.astype(ins[0], tvm_dtype(op.attrs["dtype"]))


@lowering("linear")
@_one
def _linear(bb, ins, op, dim):
    return R.matmul(ins[0], R.permute_dims(ins[1], [1, 0]))


@lowering("matmul")
@_one
def _matmul(bb, ins, op, dim):
    return R.matmul(ins[0], ins[1])


@lowering("rmsnorm")
@_one
def _rmsnorm(bb, ins, op, dim):
    return R.nn.rms_norm(ins[0], ins[1], axes=[-1], epsilon=op.attrs["eps"])


@lowering("softmax")
@_one
def _softmax(bb, ins, op, dim):
    return R.nn.softmax(ins[0], axis=op.attrs["axis"])


@lowering("reduce_sum", "reduce_max")
@_one
def _reduce(bb, ins, op, dim):
    fn = R.sum if op.name == "reduce_sum" else R.max
    rank = op.operands[0].type.rank
    return fn(ins[0], axis=[a % rank for a in op.attrs["axes"]], keepdims=op.attrs["keepdims"])


@lowering("reshape")
@_one
def _reshape(bb, ins, op, dim):
    return R.reshape(ins[0], [dim(d) for d in op.attrs["shape"]])


@lowering("transpose")
@_one
def _transpose(bb, ins, op, dim):
    return R.permute_dims(ins[0], list(op.attrs["perm"]))


@lowering("broadcast_to")
@_one
def _broadcast_to(bb, ins, op, dim):
    return R.broadcast_to(ins[0], [dim(d) for d in op.attrs["shape"]])


@lowering("slice")
@_one
def _slice(bb, ins, op, dim):
    a = op.attrs
    axis = a["axis"] % op.operands[0].type.rank
    return R.strided_slice(ins[0], axes=[axis], begin=[a["start"]], end=[a["stop"]], strides=[a["step"]])


@lowering("concat")
@_one
def _concat(bb, ins, op, dim):
    return R.concat(ins, axis=op.attrs["axis"] % op.result.type.rank)


@lowering("embedding")
@_one
def _embedding(bb, ins, op, dim):
    return R.take(ins[0], ins[1], axis=0)


@lowering("take")
@_one
def _take(bb, ins, op, dim):
    return R.take(ins[0], ins[1], axis=op.attrs["axis"])


@lowering("gather")
@_one
def _gather(bb, ins, op, dim):
    return R.gather_elements(ins[0], ins[1], axis=op.attrs["axis"] % op.result.type.rank)


@lowering("one_hot")
@_one
def _one_hot(bb, ins, op, dim):
    dt = tvm_dtype(op.attrs["dtype"]) if op.attrs["dtype"].is_float else "float32"
    hot = R.one_hot(ins[0], relax.prim_value(1.0, dt), relax.prim_value(0.0, dt), depth=op.attrs["depth"], axis=-1)
    return R.astype(hot, tvm_dtype(op.attrs["dtype"]))


@lowering("iota")
@_one
def _iota(bb, ins, op, dim):
    t = op.result.type
    axis = op.attrs["axis"] % t.rank
    n = dim(t.shape[axis])
    idx = R.arange(0, n, 1, tvm_dtype(op.attrs["dtype"]))
    shape = [n if i == axis else 1 for i in range(t.rank)]
    return R.broadcast_to(R.reshape(idx, shape), [dim(d) for d in t.shape])


@lowering("topk")
def _topk(bb, ins, op, dim):
    a = op.attrs
    out = bb.emit(R.topk(ins[0], k=a["k"], axis=a["axis"], ret_type="both", largest=a["largest"], dtype="int32"))
    return [relax.TupleGetItem(out, 0), relax.TupleGetItem(out, 1)]


@lowering("rope")
@_one
def _rope(bb, ins, op, dim):
    x, pos = ins
    d = op.operands[0].type.shape[3]
    inv, scale = rope_inv_freq(d, op.attrs)
    dt = tvm_dtype(op.result.type.dtype)
    # angles in float32 as the reference (and HF) compute them, [B, S, 1, D/2]
    angles = R.multiply(R.expand_dims(R.astype(pos, "float32"), [2, 3]), relax.const(inv.astype(np.float32)))
    cos = R.astype(R.multiply(R.cos(angles), relax.const(np.float32(scale))), dt)
    sin = R.astype(R.multiply(R.sin(angles), relax.const(np.float32(scale))), dt)
    if op.attrs["interleaved"]:
        x1 = R.strided_slice(x, axes=[3], begin=[0], end=[d], strides=[2])
        x2 = R.strided_slice(x, axes=[3], begin=[1], end=[d], strides=[2])
    else:
        x1 = R.strided_slice(x, axes=[3], begin=[0], end=[d // 2])
        x2 = R.strided_slice(x, axes=[3], begin=[d // 2], end=[d])
    lo = R.subtract(R.multiply(x1, cos), R.multiply(x2, sin))
    hi = R.add(R.multiply(x2, cos), R.multiply(x1, sin))
    return R.concat([lo, hi], axis=3)


@lowering("attention")
@_one
def _attention(bb, ins, op, dim):
    q, k, v = ins
    a = op.attrs
    if a["window"] or a["sinks"]:
        raise NotImplementedError("cpu target: attention with window or sinks is not lowered yet")
    h, hkv = op.operands[0].type.shape[1], op.operands[1].type.shape[1]
    if h != hkv:
        k, v = R.repeat(k, h // hkv, axis=1), R.repeat(v, h // hkv, axis=1)
    s = R.multiply(R.matmul(q, R.permute_dims(k, [0, 1, 3, 2])), relax.const(np.float32(a["scale"])))
    s = R.astype(s, tvm_dtype(op.result.type.dtype))
    if a["causal"]:
        sq, skv = dim(op.operands[0].type.shape[2]), dim(op.operands[1].type.shape[2])
        qpos = R.arange(skv - sq, skv, 1, "int64")  # the queries are the newest tokens
        kpos = R.arange(0, skv, 1, "int64")
        visible = R.less_equal(R.expand_dims(kpos, [0]), R.expand_dims(qpos, [1]))  # [Sq, Skv]
        s = R.where(visible, s, relax.const(-np.inf, tvm_dtype(op.result.type.dtype)))
    return R.matmul(R.nn.softmax(s, axis=-1), v)


@lowering("moe_experts")
@_one
def _moe_experts(bb, ins, op, dim):
    """Every expert on every token, weighted by the routing weights scattered to [T, E]: exact, and E/k times the
    FLOPs of the routed tokens only (a grouped lowering is the next step, docs/cpu.md)."""
    x, ids, weights, w_gate, w_up, w_down = ins
    e = op.operands[3].type.shape[0]
    dt = tvm_dtype(op.operands[2].type.dtype)
    hot = R.one_hot(ids, relax.prim_value(1.0, dt), relax.prim_value(0.0, dt), depth=e, axis=-1)  # [T, k, E]
    dense = R.sum(R.multiply(hot, R.expand_dims(weights, [2])), axis=[1])  # [T, E]
    xe = R.expand_dims(x, [0])  # [1, T, D]
    g = R.matmul(xe, R.permute_dims(w_gate, [0, 2, 1]))  # [E, T, F]
    u = R.matmul(xe, R.permute_dims(w_up, [0, 2, 1]))
    y = R.matmul(R.multiply(R.nn.silu(g), u), R.permute_dims(w_down, [0, 2, 1]))  # [E, T, D]
    return R.sum(R.multiply(y, R.expand_dims(R.permute_dims(dense, [1, 0]), [2])), axis=[0])
