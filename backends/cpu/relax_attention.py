"""Lowerings of the sparse-attention ops: masked dense attention (window/sinks, block-sparse layouts, DSA), the
block maps of sparse-attention-tiling, and the tiled ops over them (kernels_attention.py), each with the semantics
of the op's numpy reference. Float32 only; another dtype is a NotImplementedError naming the op.

- dense: QK^T and PV through relax_ops' batched GEMM, the mask inside one softmax kernel (masked_probs);
- attention_block_map: computed per q tile in closed form from the lengths (one kernel);
- dsa_block_map / the DSA ops: an int8 selection mask [B, Sq, Skv] built from the indices, then the map (or the
  masked softmax / the flash kernel's partial tiles) reads it;
- tiled ops: the flash kernel, one task per (batch, head, q tile), visiting only the tiles its map row lists.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import relax
from tvm.relax import op as R

from r1c.backends.cpu import kernels_attention as ka
from r1c.backends.cpu import relax_ops
from r1c.backends.cpu.relax_ops import batched, emit_kernel, lowering
from r1c.ir.core import Op, Value
from r1c.ir.ops.attention_tiled import map_columns
from r1c.ir.types import DType


def _f32(op: Op, *idx: int) -> None:
    for i in idx:
        dt = op.operands[i].type.dtype
        if dt != DType.f32:
            raise NotImplementedError(f"cpu target: {op.name} is lowered for float32 only, got {dt.value}")


def _int32(op: Op, *idx: int) -> None:
    for i in idx:
        dt = op.operands[i].type.dtype
        if dt != DType.int32:
            raise NotImplementedError(f"cpu target: {op.name} needs int32 indices and block maps, got {dt.value}")


def _static(op: Op, *dims: Any) -> list[int]:
    """Heads and head dims are unrolled into the kernels: they must be static."""
    if not all(isinstance(d, int) for d in dims):
        raise NotImplementedError(f"cpu target: {op.name} needs static head counts and head dims, got {list(dims)}")
    return [int(d) for d in dims]


def _cdiv(x: Any, n: int) -> Any:
    return (x + (n - 1)) // n


def _call(bb: relax.BlockBuilder, func: Any, name: str, args: list, out: Any) -> Any:
    """call_tir of a hand-written kernel (it comes scheduled: schedule.HAND_WRITTEN)."""
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, args, out))


def _dsa_mask(bb: relax.BlockBuilder, indices: Any, idx: Value, k: Value, ctx: Any) -> Any:
    """The int8 selection mask [B, Sq, Skv] of DSA indices [B, Sq, topk] (kernels_attention.dsa_mask)."""
    b, sq, skv = ctx(idx.type.shape[0]), ctx(idx.type.shape[1]), ctx(k.type.shape[2])
    return _call(bb, ka.dsa_mask(), "dsa_mask", [_arg(bb, indices)], relax.TensorType([b, sq, skv], "int8"))


def _arg(bb: relax.BlockBuilder, x: Any) -> Any:
    return bb.emit(x) if isinstance(x, relax.Call) else x


def _dense(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any, spec: ka.MaskSpec, aux: Any) -> Any:
    """softmax(mask(scale * Q K^T)) V: QK^T and PV by relax_ops' batched GEMM, the mask in the softmax kernel."""
    _f32(op, 0, 1, 2)
    q, k, v = ins[:3]
    (b, h, sq, _), (_, hkv, skv, _) = (ctx.shape(x) for x in op.operands[:2])
    heads, _ = _static(op, h, hkv)
    if h != hkv:
        k, v = R.repeat(k, h // hkv, axis=1), R.repeat(v, h // hkv, axis=1)
    s = batched(bb, q, R.permute_dims(k, [0, 1, 3, 2]), [b * h, sq, skv], ctx)
    probs = functools.partial(ka.masked_probs, scale=float(op.attrs["scale"]), heads=heads, spec=spec)
    p = emit_kernel(bb, probs, s, aux, name="masked_attention_probs", kind="softmax")
    return batched(bb, R.reshape(p, [b, h, sq, skv]), v, [ctx(d) for d in op.result.type.shape], ctx)


# `attention` is registered again here, over relax_ops' lowering (this module imports relax_ops first, so this
# registration comes later and wins): window/sinks attention lowers through the masked softmax of this file, while
# relax_ops._attention (owned elsewhere) keeps the plain causal / non-causal case.
@lowering("attention")
def _attention(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    if not op.attrs["window"] and not op.attrs["sinks"]:
        return relax_ops._attention(bb, ins, op, ctx)
    spec = ka.MaskSpec.of(op.attrs)
    return [_dense(bb, ins, op, ctx, spec, relax.const(spec.aux()))]


@lowering("block_sparse_attention")
def _block_sparse_attention(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    spec = ka.MaskSpec.of(op.attrs)
    return [_dense(bb, ins, op, ctx, spec, relax.const(spec.aux()))]


@lowering("dsa_attention")
def _dsa_attention(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    _int32(op, 3)
    mask = _dsa_mask(bb, ins[3], op.operands[3], op.operands[1], ctx)
    return [_dense(bb, ins, op, ctx, ka.MaskSpec(dsa=True), mask)]


@lowering("attention_block_map")
def _attention_block_map(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    _f32(op, 0, 1)
    a = op.attrs
    spec = ka.MaskSpec.of(a)
    bq, bk = a["block_q"], a["block_k"]
    skv = op.operands[1].type.shape[2]
    cols = map_columns(skv, a)  # the type's bound; a symbolic one is n_k itself (a derived symbol, not in ctx)
    cols = cols if isinstance(cols, int) else _cdiv(ctx(skv), bk)
    nq = _cdiv(ctx(op.operands[0].type.shape[2]), bq)
    outs = [relax.TensorType([1, nq, cols, 2], "int32"), relax.TensorType([1, nq], "int32")]
    args = [_arg(bb, ins[0]), _arg(bb, ins[1]), relax.const(spec.aux())]
    res = _call(bb, ka.structured_block_map(spec, bq, bk), "attention_block_map", args, outs)
    return [relax.TupleGetItem(res, 0), relax.TupleGetItem(res, 1)]


@lowering("dsa_block_map")
def _dsa_block_map(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    _int32(op, 0)
    a = op.attrs
    b, sq, skv = (ctx(d) for d in (*op.operands[0].type.shape[:2], op.operands[1].type.shape[2]))
    mask = _dsa_mask(bb, ins[0], op.operands[0], op.operands[1], ctx)
    nq, nk = _cdiv(sq, a["block_q"]), _cdiv(skv, a["block_k"])
    outs = [relax.TensorType([b, nq, nk, 2], "int32"), relax.TensorType([b, nq], "int32")]
    res = _call(bb, ka.dsa_block_map(a["block_q"], a["block_k"]), "dsa_block_map", [mask], outs)
    return [relax.TupleGetItem(res, 0), relax.TupleGetItem(res, 1)]


def _tiled(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any, spec: ka.MaskSpec, aux: Any, maps: list) -> Any:
    _f32(op, 0, 1, 2)
    a = op.attrs
    (_, h, _, dk), (_, hkv, _, _), (_, _, _, dv) = (op.operands[i].type.shape for i in range(3))
    h, hkv, dk, dv = _static(op, h, hkv, dk, dv)
    kernel = ka.flash_attention(spec, h, hkv, dk, dv, float(a["scale"]), a["block_q"], a["block_k"])
    args = [_arg(bb, x) for x in (*ins[:3], *maps, aux)]
    return _call(bb, kernel, "tiled_attention", args, relax.TensorType(ctx.shape(op.result), "float32"))


@lowering("tiled_attention")
def _tiled_attention(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    _int32(op, 3, 4)
    spec = ka.MaskSpec.of(op.attrs)
    return [_tiled(bb, ins, op, ctx, spec, relax.const(spec.aux()), ins[3:5])]


@lowering("tiled_dsa_attention")
def _tiled_dsa_attention(bb: relax.BlockBuilder, ins: list, op: Op, ctx: Any) -> list:
    _int32(op, 3, 4, 5)
    mask = _dsa_mask(bb, ins[3], op.operands[3], op.operands[1], ctx)
    return [_tiled(bb, ins, op, ctx, ka.MaskSpec(dsa=True), mask, ins[4:6])]
