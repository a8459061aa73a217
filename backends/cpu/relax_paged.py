"""Lowerings of the paged MLA latent cache ops (ir/ops/paged.py) to Relax, with their numpy references'
semantics; the kernels are in kernels_paged.py. Registered by importing this module (lower.py does).

A write updates the pool in place (relax.call_tir_inplace) when nothing reads the old pool afterwards (the
lowering's Context.dies_here): in a paged step each layer's write consumes the previous layer's pool, so every
write is in place and only the step's tokens move. Otherwise the kernel writes a copy. Attention is the absorbed
form of relax_cache.absorbed_mla around one kernel over the row's pages. B, S, P, T and M are symbolic; the
channels, heads and head dims must be static.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from r1c.backends.cpu import kernels_paged as kp
from r1c.backends.cpu.relax_cache import absorbed_mla, call_kernel, code_dtype, static_dim
from r1c.backends.cpu.relax_ops import OPAQUE, lowering, tvm_dtype
from r1c.ir.ops.quant import qmax
from r1c.ir.types import DType


def _emit_inplace(bb, func, name: str, args: list, outs: list[int], out) -> relax.Var:
    args = [bb.emit(a) if isinstance(a, relax.Call) else a for a in args]
    gv = bb.add_func(func.with_attr("op_pattern", OPAQUE), name)
    return bb.emit(relax.call_tir_inplace(gv, args, outs, out))


def _f32(x, dtype: DType):
    return x if dtype == DType.f32 else R.astype(x, "float32")


@lowering("paged_write")
def _paged_write(bb, ins, op, ctx):
    pool, _, table, _ = op.operands
    d = static_dim(pool.type.shape[3], "paged_write: the pool's channels")
    dt, idx = tvm_dtype(pool.type.dtype), tvm_dtype(table.type.dtype)
    out = ctx.tensor(op.result.type)
    if ctx.dies_here(pool):  # nothing reads the old pool: the step's tokens go into it, no copy of the pool
        return [_emit_inplace(bb, kp.paged_write(op.attrs["layer"], d, dt, idx, True), "paged_write", ins, [0], out)]
    return [call_kernel(bb, kp.paged_write(op.attrs["layer"], d, dt, idx, False), "paged_write", ins, out)]


@lowering("paged_write_q")
def _paged_write_q(bb, ins, op, ctx):
    pool, scales, new, table, _ = op.operands
    d = static_dim(pool.type.shape[3], "paged_write_q: the pool's channels")
    g = static_dim(scales.type.shape[3], "paged_write_q: the scale groups")
    code, top = code_dtype(pool.type.dtype), qmax(pool.type.dtype, 8)
    args = [ins[0], ins[1], _f32(ins[2], new.type.dtype), *ins[3:]]
    outs = [ctx.tensor(r.type, codes=True) for r in op.results]
    in_place = ctx.dies_here(pool) and ctx.dies_here(scales)
    func = kp.paged_write_q(op.attrs["layer"], d, g, code, top, tvm_dtype(table.type.dtype), in_place)
    if in_place:
        res = _emit_inplace(bb, func, "paged_write_q", args, [0, 1], outs)
    else:
        res = call_kernel(bb, func, "paged_write_q", args, outs)
    return [relax.TupleGetItem(res, 0), relax.TupleGetItem(res, 1)]


def _latent(bb, ins, op, ctx, code: str, groups: int):
    """Absorbed MLA around the paged kernel; ins are op's operands, the kernel reads all but q and the weight."""
    pool, table = op.operands[1], op.operands[-3]
    d = static_dim(pool.type.shape[3], f"{op.name}: the pool's channels")
    rank = static_dim(op.operands[-1].type.shape[1], f"{op.name}: the latent rank")
    a = op.attrs
    heads = static_dim(op.operands[0].type.shape[1], f"{op.name}: the heads")
    func = kp.paged_latent_attention(a["layer"], heads, rank, d, a["scale"], code, groups, tvm_dtype(table.type.dtype))
    latent = lambda qk, out: call_kernel(bb, func, op.name, [qk, *ins[1:-1]], out)  # noqa: E731
    return [absorbed_mla(bb, ins[0], ins[-1], op, ctx, rank, d - rank, latent)]


@lowering("paged_mla_attention")
def _paged_mla_attention(bb, ins, op, ctx):
    return _latent(bb, ins, op, ctx, tvm_dtype(op.operands[1].type.dtype), 0)


@lowering("paged_mla_attention_kvq")
def _paged_mla_attention_kvq(bb, ins, op, ctx):
    pool, scales = op.operands[1:3]
    groups = static_dim(scales.type.shape[3], "paged_mla_attention_kvq: the scale groups")
    return _latent(bb, ins, op, ctx, code_dtype(pool.type.dtype), groups)
