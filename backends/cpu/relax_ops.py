"""r1c ops as Relax expressions: one lowering per op name, each with the semantics of the op's numpy reference.

A lowering takes the BlockBuilder, the operands (Relax expressions), the IR op (attributes, result types) and a
`dim` function (IR dim -> PrimExpr) and returns one expression per result. Float math runs in the operands' dtype
(the reference computes in float64; tests compare within f32 tolerance). Ops without a lowering are a compile error
naming them (backends/cpu/lower.py), never a fallback.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from r1c.backends.cpu import kernels
from r1c.ir import dims
from r1c.ir.core import Op
from r1c.ir.ops.nn import rope_inv_freq
from r1c.ir.types import DType

OPAQUE = 8  # TVM's kOpaque op pattern: FuseOps fuses nothing into it
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
UNARY = {"neg": R.negative, "sqrt": R.sqrt, "log": R.log,
         "rsqrt": R.rsqrt, "abs": R.abs, "cos": R.cos, "sin": R.sin}  # fmt: skip


for _name, _fn in BINARY.items():
    LOWERINGS[_name] = _one(lambda bb, ins, op, dim, f=_fn: f(ins[0], ins[1]))
for _name, _fn in UNARY.items():
    LOWERINGS[_name] = _one(lambda bb, ins, op, dim, f=_fn: f(ins[0]))


def _f32(op: Op) -> bool:
    return op.result.type.dtype == DType.f32


# exp, sigmoid and silu in float32 through TVM's fast_exp (a polynomial that vectorizes; LLVM calls libm's expf
# once per lane for TIR's exp). Other dtypes keep TVM's ops.
@lowering("exp")
@_one
def _exp(bb, ins, op, dim):
    return bb.call_te(kernels.fast_exp, ins[0], primfunc_name_hint="exp") if _f32(op) else R.exp(ins[0])


@lowering("sigmoid")
@_one
def _sigmoid(bb, ins, op, dim):
    return bb.call_te(kernels.sigmoid, ins[0], primfunc_name_hint="sigmoid") if _f32(op) else R.sigmoid(ins[0])


def silu(bb, x: Any, op: Op) -> Any:
    return bb.call_te(kernels.silu, x, primfunc_name_hint="silu") if _f32(op) else R.nn.silu(x)


@lowering("silu")
@_one
def _silu(bb, ins, op, dim):
    return silu(bb, ins[0], op)


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
    return R.multiply(silu(bb, ins[0], op), ins[1])


@lowering("constant")
@_one
def _constant(bb, ins, op, dim):
    t = op.result.type
    value = np.full([int(d) for d in t.shape], op.attrs["value"], dtype=tvm_dtype(t.dtype))
    return relax.const(value, tvm_dtype(t.dtype))


@lowering("cast")
@_one
def _cast(bb, ins, op, dim):
    if DType.fp8e4m3 in (op.operands[0].type.dtype, op.attrs["dtype"]):  # TVM 0.27's fp8 conversions are wrong
        raise NotImplementedError("cpu target: cast to or from fp8e4m3 is not supported (use dequantize)")
    return R.astype(ins[0], tvm_dtype(op.attrs["dtype"]))


@lowering("linear")
@_one
def _linear(bb, ins, op, ctx):
    x, w = ins
    *lead, kdim = op.operands[0].type.shape
    n = op.operands[1].type.shape[0]
    rows = ctx(dims.mul(*lead)) if lead else 1
    panels = ctx.panels(w, kernels.panel_for("linear", int(n)))
    y = emit_kernel(bb, kernels.dense_packed, reshape(bb, x, [rows, ctx(kdim)]), panels, int(n), name="dense")
    return R.reshape(y, [ctx(d) for d in op.result.type.shape])


@lowering("matmul")
@_one
def _matmul(bb, ins, op, ctx):
    a, b = (v.type.shape for v in op.operands)
    if len(a) != len(b) or a[:-2] != b[:-2] or len(a) < 2:  # broadcasting batches: TVM's matmul
        return R.matmul(ins[0], ins[1])
    return batched(bb, ins[0], ins[1], [ctx(d) for d in op.result.type.shape], ctx)


def batched(bb, a, b, out_shape: list, ctx) -> Any:
    """a [..., M, K] @ b [..., K, N] with equal batch dims, through the tiled batched GEMM."""
    a, b = (bb.emit(x) if isinstance(x, relax.Call) else x for x in (a, b))
    sa, sb = (list(x.ty.shape) for x in (a, b))
    batch = 1
    for d in sa[:-2]:
        batch = batch * d
    a, b = (x if len(s) == 3 else reshape(bb, x, [batch, *s[-2:]]) for x, s in ((a, sa), (b, sb)))
    y = emit_kernel(bb, kernels.batched_matmul, a, b, name="batched_matmul")
    return y if len(out_shape) == 3 else R.reshape(y, out_shape)


def emit_kernel(bb, fn: Callable, *args, name: str, kind: str = "gemm") -> Any:
    """emit_te for a kernels.py kernel, marked so FuseOps leaves it whole and schedule.py finds it."""
    args = tuple(bb.emit(a) if isinstance(a, relax.Call) else a for a in args)
    out = bb.emit_te(fn, *args, primfunc_name_hint=name)
    gv = bb.lookup_binding(out).args[0]
    func = bb.get()[gv]
    if kernels.KERNEL_ATTR not in (func.attrs or {}):
        bb.update_func(gv, func.with_attrs({kernels.KERNEL_ATTR: kind, "op_pattern": OPAQUE}))
    return out


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
    return reshape(bb, ins[0], [dim(d) for d in op.attrs["shape"]])


def reshape(bb: relax.BlockBuilder, x: Any, shape: list) -> Any:
    """R.reshape of x, looking through the reshapes that produced x: FuseOps would fuse a chain of them into a copy
    kernel, while one reshape stays a view (RewriteDataflowReshape)."""
    while True:
        bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else x
        if not (isinstance(bound, relax.Call) and bound.op == _RESHAPE):
            return R.reshape(x, shape)
        x = bound.args[0]


_RESHAPE = tvm.ir.Op.get("relax.reshape")


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
    t = op.operands[0].type
    n = t.shape[-1]
    if a["axis"] % t.rank == t.rank - 1 and a["k"] <= kernels.SMALL_TOPK and isinstance(n, int):
        dt = tvm_dtype(t.dtype)
        rows = dim(dims.mul(*t.shape[:-1])) if t.rank > 1 else 1
        gv = bb.add_func(kernels.small_topk(n, a["k"], bool(a["largest"]), dt), "small_topk")
        types = [relax.TensorType([rows, a["k"]], dt), relax.TensorType([rows, a["k"]], "int32")]
        out = bb.emit(relax.call_tir(gv, [reshape(bb, ins[0], [rows, n])], types))
        shape = [dim(d) for d in op.results[0].type.shape]
        return [R.reshape(relax.TupleGetItem(out, i), shape) for i in (0, 1)]
    out = bb.emit(R.topk(ins[0], k=a["k"], axis=a["axis"], ret_type="both", largest=a["largest"], dtype="int32"))
    return [relax.TupleGetItem(out, 0), relax.TupleGetItem(out, 1)]


@lowering("rope")
@_one
def _rope(bb, ins, op, dim):
    x, pos = ins
    d = op.operands[0].type.shape[3]
    inv, scale = rope_inv_freq(d, op.attrs)
    dt = tvm_dtype(op.result.type.dtype)
    table = emit_kernel(bb, kernels.rope_table, pos, relax.const(inv.astype(np.float32)), float(scale),
                        name="rope_table", kind="table")  # fmt: skip
    cos, sin = (bb.emit(R.astype(relax.TupleGetItem(table, i), dt)) for i in (0, 1))
    return bb.call_te(kernels.rope_rotate, x, cos, sin, bool(op.attrs["interleaved"]), primfunc_name_hint="rope")


@lowering("attention")
@_one
def _attention(bb, ins, op, ctx):
    q, k, v = ins
    a = op.attrs
    if a["window"] or a["sinks"]:
        raise NotImplementedError("cpu target: attention with window or sinks is not lowered yet")
    (b, h, sq, _), (_, hkv, skv, _) = (ctx.shape(x) for x in op.operands[:2])
    if h != hkv:
        k, v = R.repeat(k, h // hkv, axis=1), R.repeat(v, h // hkv, axis=1)
    s = bb.emit(batched(bb, q, R.permute_dims(k, [0, 1, 3, 2]), [b * h, sq, skv], ctx))
    if op.result.type.dtype == DType.f32:
        softmax = bb.add_func(kernels.attention_softmax(float(a["scale"]), bool(a["causal"])), "attention_softmax")
        p = bb.emit(relax.call_tir(softmax, [s], relax.TensorType([b * h, sq, skv], "float32")))
    else:
        dt = tvm_dtype(op.result.type.dtype)
        p = emit_kernel(bb, kernels.attention_probs, s, float(a["scale"]), bool(a["causal"]), dt,
                        name="attention_probs", kind="softmax")  # fmt: skip
    return batched(bb, p, v, [ctx(d) for d in op.result.type.shape], ctx)


@lowering("moe_experts")
@_one
def _moe_experts(bb, ins, op, ctx):
    """Routed: a counting sort puts each expert's tokens in whole tiles of consecutive rows, grouped GEMMs run
    gate, up and down over those rows only, and each token sums its k rows weighted by the routing weights."""
    x, ids, weights, w_gate, w_up, w_down = ins
    if op.operands[0].type.dtype != DType.f32:
        raise NotImplementedError("cpu target: moe_experts is lowered for float32 only")
    tokens, k = ctx(op.operands[1].type.shape[0]), int(op.operands[1].type.shape[1])
    e, f, d = (int(n) for n in op.operands[3].type.shape)
    rows = kernels.routed_rows(tokens, k, e)
    i32 = lambda *shape: relax.TensorType(list(shape), "int32")  # noqa: E731
    route = bb.add_func(kernels.moe_route(e, k), "moe_route")
    routed = bb.emit(relax.call_tir(route, [ids], [i32(rows), i32(rows // kernels.MOE_MI), i32(tokens, k), i32(1)]))
    row_token, tiles, slot, used = (bb.emit(relax.TupleGetItem(routed, i)) for i in range(4))
    xs = bb.emit(R.take(x, row_token, axis=0))  # [P, D]

    def grouped(inp, w, kdim, n):
        gv = bb.add_func(kernels.grouped_matmul(e, kdim, n), "grouped_matmul")
        p = kernels.panel_for("moe_experts", n)
        width = kernels.pack_panels_shape([n, kdim], p)[0] * p
        y = bb.emit(
            relax.call_tir(gv, [inp, ctx.panels(w, p), tiles, used], relax.TensorType([rows, width], "float32"))
        )
        return y if width == n else bb.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))

    h = bb.emit(R.multiply(silu(bb, grouped(xs, w_gate, d, f), op), grouped(xs, w_up, d, f)))
    y = grouped(h, w_down, f, d)  # [P, D]
    ys = R.reshape(R.take(y, R.reshape(slot, [tokens * k]), axis=0), [tokens, k, d])
    return R.sum(R.multiply(ys, R.expand_dims(weights, [2])), axis=[1])
