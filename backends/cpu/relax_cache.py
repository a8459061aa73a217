"""Lowerings of the KV-cache ops (cache_write, cached_attention) and the quantized-KV ops (quantize, dequantize,
attention_kvq, mla_attention_kvq) to Relax, with the semantics of their numpy references (ir/ops/cache.py,
ir/ops/quant.py); the kernels are in kernels_cache.py. Registered by importing this module (lower.py does).

Quantized codes are stored as the op's type says: int8 (4-bit values one per int8) or fp8e4m3 as TVM's
float8_e4m3fn. The attention kernels read codes and scales and compute in float32; only the dense attention forms
are lowered (a block map or a block-sparse layout is a clear error).
"""

from __future__ import annotations

from typing import Any

from tvm import relax
from tvm.relax import op as R

from r1c.backends.cpu import kernels_cache as kc
from r1c.backends.cpu.relax_ops import OPAQUE, batched, lowering, tvm_dtype
from r1c.ir.core import Op
from r1c.ir.dims import Dim
from r1c.ir.ops.quant import qmax, reduced_axes
from r1c.ir.types import DType

CODE_DTYPE = {DType.int8: "int8", DType.fp8e4m3: kc.FP8}  # relax_ops.tvm_dtype has no fp8: codes are mapped here


def code_dtype(dtype: DType) -> str:
    if dtype not in CODE_DTYPE:
        raise NotImplementedError(f"cpu target: quantized storage {dtype.value} is not supported")
    return CODE_DTYPE[dtype]


def static_dim(d: Dim, what: str) -> int:
    if not isinstance(d, int):
        raise NotImplementedError(f"cpu target: {what} must be static, got {d}")
    return d


def _ones(shape: tuple) -> tuple[bool, ...]:
    """A scale's broadcast dims (size 1): its kernel reads index 0 there."""
    return tuple(d == 1 for d in shape)


def call_kernel(bb: relax.BlockBuilder, func: Any, name: str, args: list, out: relax.TensorType) -> Any:
    """call_tir of a hand-written kernel, opaque to FuseOps."""
    args = [bb.emit(a) if isinstance(a, relax.Call) else a for a in args]
    gv = bb.add_func(func.with_attr("op_pattern", OPAQUE), name)
    return bb.emit(relax.call_tir(gv, args, out))


def _dense_only(op: Op, maps: list) -> None:
    if maps:
        raise NotImplementedError(f"cpu target: {op.name} with a block map (tiled attention) is not lowered")
    if op.attrs["layout_block"]:
        raise NotImplementedError(f"cpu target: {op.name} with a block-sparse layout is not lowered")


@lowering("cache_write")
def _cache_write(bb, ins, op, ctx):
    cache, _, start = op.operands
    d = static_dim(cache.type.shape[4], "cache_write: the head dim")
    layer, dt, st = op.attrs["layer"], tvm_dtype(cache.type.dtype), tvm_dtype(start.type.dtype)
    if ctx.dies_here(cache):  # nothing reads the old cache: write the step's rows into it, no copy of the cache
        args = [bb.emit(a) if isinstance(a, relax.Call) else a for a in ins]
        gv = bb.add_func(kc.cache_write_inplace(layer, d, dt, st).with_attr("op_pattern", OPAQUE), "cache_write")
        return [bb.emit(relax.call_tir_inplace(gv, args, [0], ctx.tensor(op.result.type)))]
    return [call_kernel(bb, kc.cache_write(layer, d, dt, st), "cache_write", ins, ctx.tensor(op.result.type))]


@lowering("cached_attention")
def _cached_attention(bb, ins, op, ctx):
    q, _, v, start = op.operands
    dk = static_dim(q.type.shape[3], "cached_attention: the head dim")
    dv = static_dim(v.type.shape[4], "the v head dim")
    a = op.attrs
    func = kc.cached_attention(a["layer"], dk, dv, a["scale"], tvm_dtype(q.type.dtype), tvm_dtype(start.type.dtype))
    return [call_kernel(bb, func, "cached_attention", ins, ctx.tensor(op.result.type))]


@lowering("quantize")
def _quantize(bb, ins, op, ctx):
    a = op.attrs
    rank = op.operands[0].type.rank
    axes = reduced_axes(rank, a["token_axis"] % rank, a["granularity"])
    storage, top = code_dtype(a["dtype"]), qmax(a["dtype"], a["bits"])
    # two functions, each with one output: the default schedules (dlight) reject an output that is also read
    scale = bb.emit_te(lambda x: kc.quant_scale(x, top, axes), ins[0], primfunc_name_hint="quant_scale")
    codes = bb.emit_te(lambda x, s: kc.quant_codes(x, s, storage, top), ins[0], scale, primfunc_name_hint="quantize")
    return [codes, scale]


@lowering("dequantize")
def _dequantize(bb, ins, op, ctx):
    code_dtype(op.operands[0].type.dtype)
    dt = tvm_dtype(op.attrs["dtype"])
    return [bb.emit_te(lambda q, s: kc.dequantize(q, s, dt), ins[0], ins[1], primfunc_name_hint="dequantize")]


@lowering("attention_kvq")
def _attention_kvq(bb, ins, op, ctx):
    q, kq, ks, vq, vs, *maps = op.operands
    _dense_only(op, maps)
    dk = static_dim(q.type.shape[3], "attention_kvq: the head dim")
    dv = static_dim(vq.type.shape[3], "the v head dim")
    func = kc.attention_kvq(dk, dv, op.attrs, tvm_dtype(q.type.dtype), code_dtype(kq.type.dtype),
                            _ones(ks.type.shape), _ones(vs.type.shape))  # fmt: skip
    return [call_kernel(bb, func, "attention_kvq", ins[:5], ctx.tensor(op.result.type))]


@lowering("mla_attention_kvq")
def _mla_attention_kvq(bb, ins, op, ctx):
    q, lq, ls, rq, rs, w, *maps = op.operands
    _dense_only(op, maps)
    rank, dr = static_dim(lq.type.shape[2], "the latent rank"), static_dim(rq.type.shape[3], "the rotary dim")
    func = kc.mla_latent_attention(rank, dr, op.attrs, code_dtype(lq.type.dtype), _ones(ls.type.shape),
                                   _ones(rs.type.shape))  # fmt: skip
    latent = lambda qk, out: call_kernel(bb, func, "mla_attention_kvq", [qk, *ins[1:5]], out)  # noqa: E731
    return [absorbed_mla(bb, ins[0], ins[5], op, ctx, rank, dr, latent)]


def absorbed_mla(bb, q_in: Any, w_in: Any, op: Op, ctx, rank: int, dr: int, latent: Any) -> Any:
    """Absorbed MLA, as the reference: q_nope through W_UK (a batched GEMM per head), the MQA over the latent and
    rotary key in one kernel (`latent(qk [B, H, S, rank + dr], out type)` -> latent-space output [B, H, S, rank],
    float32), then W_UV per head (a batched GEMM); op's operands 0 and -1 are q and the kv_b weight."""
    q, w = op.operands[0], op.operands[-1]
    a = op.attrs
    dn, dv = a["qk_nope_head_dim"], a["v_head_dim"]
    b, h, s, _ = ctx.shape(q)
    qf, wf = (x if v.type.dtype == DType.f32 else R.astype(x, "float32") for x, v in ((q_in, q), (w_in, w)))
    w3 = R.reshape(wf, [h, dn + dv, rank])
    w_uk = R.strided_slice(w3, axes=[1], begin=[0], end=[dn])  # [H, dn, rank]
    w_uv_t = R.permute_dims(R.strided_slice(w3, axes=[1], begin=[dn], end=[dn + dv]), [0, 2, 1])  # [H, rank, dv]
    heads_first = lambda x, d: R.reshape(R.permute_dims(x, [1, 0, 2, 3]), [h, b * s, d])  # noqa: E731
    to_bhsd = lambda x, d: R.permute_dims(R.reshape(x, [h, b, s, d]), [1, 0, 2, 3])  # noqa: E731
    q_nope = heads_first(R.strided_slice(qf, axes=[3], begin=[0], end=[dn]), dn)
    q_lat = to_bhsd(batched(bb, q_nope, w_uk, [h, b * s, rank], ctx), rank)
    qk = R.concat([q_lat, R.strided_slice(qf, axes=[3], begin=[dn], end=[dn + dr])], axis=3)
    o_lat = latent(qk, relax.TensorType([b, h, s, rank], "float32"))
    out = to_bhsd(batched(bb, heads_first(o_lat, rank), w_uv_t, [h, b * s, dv], ctx), dv)
    dt = tvm_dtype(op.result.type.dtype)
    return out if dt == "float32" else R.astype(out, dt)
