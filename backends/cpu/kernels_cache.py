"""Kernels of the KV-cache and quantized-KV ops (ir/ops/cache.py, ir/ops/quant.py) on the cpu target.

- `cache_write`: hand-written TIR, one pass that copies the cache and puts the step's rows at each row's start
  (the op is functional: lowerings see one op, not whether the old cache has later readers, so no in-place write).
- `cached_attention`, `attention_kvq`, `mla_attention_kvq` (latent part): hand-written TIR, one query row per
  iteration of a parallel loop, an online softmax over blocks of KB keys, reading only the keys the row can see
  (a cache row's first start + i + 1 slots), in float32. Quantized K/V are read as codes and scaled in registers:
  no dequantized copy exists.
- `quantize` / `dequantize`: TE, so any rank and token axis; the default schedules thread them.

Storage: int8 codes (4-bit values one per int8, in [-7, 7], as the IR defines them); fp8e4m3 as TVM's
`float8_e4m3fn` (one byte), converted by bit manipulation here, because TVM's own LLVM casts to and from it flush
subnormals and turn 0 into 2^-7 (measured on 0.27). Rounding follows the reference exactly: x / scale in float64,
rint for int8, and for fp8 the float32 value rounded to 3 mantissa bits (ties to even, subnormals below 2^-6).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import te
from tvm import tirx as tir
from tvm.script import tirx as T

from r1c.backends.cpu.kernels import KERNEL_ATTR, lanes

KB = 16  # keys per online-softmax block: one rescale of the accumulator per block, not per key
FP8 = "float8_e4m3fn"
NEG_INF = tir.const(-np.inf, "float32")


# ---- fp8e4m3 codes <-> float32, as bit manipulation ----


def _let(dtype: str, value: Any, body: Any) -> Any:
    """body(v) with v bound to value once (a Let), so a value used several times is computed once."""
    v = tir.Var("v", dtype)
    return tir.Let(v, value, body(v))


def _u32(n: int) -> Any:
    return tir.const(n, "uint32")


def fp8_decode(x: Any) -> Any:
    """float32 value of an e4m3fn code: (8 + m) * 2^(e - 10), subnormal m * 2^-9, 0x7f/0xff NaN."""

    def value(c: Any) -> Any:
        e, m = (c >> _u32(3)) & _u32(15), c & _u32(7)
        normal = tir.reinterpret("float32", ((e + _u32(120)) << _u32(23)) | (m << _u32(20)))
        mag = tir.Select(e == _u32(0), m.astype("float32") * tir.const(2.0**-9, "float32"), normal)
        mag = tir.Select(tir.all(e == _u32(15), m == _u32(7)), tir.const(np.nan, "float32"), mag)
        return tir.Select(c >= _u32(128), -mag, mag)

    return _let("uint32", tir.reinterpret("uint8", x).astype("uint32"), value)


def fp8_round(y: Any) -> Any:
    """float32 y (|y| <= 448) rounded to e4m3 as ir.types.round_to does: step 2^(max(exp, -6) - 3), ties to even."""
    e = ((tir.reinterpret("uint32", y) >> _u32(23)) & _u32(255)).astype("int32") - 127
    step = tir.reinterpret("float32", ((tir.max(e, -6) - 3 + 127) << 23).astype("uint32"))
    return _let("float32", step, lambda st: tir.nearbyint(y / st) * st)  # a division by a power of two: exact


def fp8_encode(r: Any) -> Any:
    """The e4m3fn code of a float32 value that is exactly representable (fp8_round's result)."""

    def code(bits: Any) -> Any:
        mag = tir.reinterpret("float32", bits & _u32(0x7FFFFFFF))
        sub = (mag * tir.const(512.0, "float32")).astype("uint32")  # m of m * 2^-9 (8 at 2^-6: e=1, m=0)
        normal = ((((bits >> _u32(23)) & _u32(255)) - _u32(120)) << _u32(3)) | ((bits >> _u32(20)) & _u32(7))
        c = tir.Select(mag < tir.const(2.0**-6, "float32"), sub, normal) | ((bits >> _u32(31)) << _u32(7))
        return tir.reinterpret(FP8, c.astype("uint8"))

    return _let("uint32", tir.reinterpret("uint32", r), code)


def decode(x: Any, code: str) -> Any:
    """A stored code (dtype `code`) as float32, before its scale."""
    return fp8_decode(x) if code == FP8 else x.astype("float32")


# ---- quantize / dequantize (TE) ----


def quant_scale(x: te.Tensor, top: float, axes: tuple[int, ...]) -> te.Tensor:
    """scale = f32(amax / top) per group (the axes reduced; 1 there), NaN where the group has a NaN (np.max's)."""
    rank = len(x.shape)
    red = [te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes]

    def group(idx: tuple) -> tuple:
        it = iter(red)
        return tuple(next(it) if i in axes else idx[i] for i in range(rank))

    nan_max = te.comm_reducer(
        lambda a, b: tir.Select(tir.any(tir.isnan(a), a > b), a, b), lambda t: tir.const(0, t), name="nan_max"
    )
    sshape = [1 if i in axes else x.shape[i] for i in range(rank)]
    amax = te.compute(sshape, lambda *i: nan_max(te.abs(x[group(i)].astype("float32")), axis=red), name="amax")
    # f64 then f32, as the reference (the same as an f32 divide: both operands are f32)
    return te.compute(
        sshape, lambda *i: (amax[i].astype("float64") / tir.const(top, "float64")).astype("float32"), name="scale"
    )


def quant_codes(x: te.Tensor, scale: te.Tensor, storage: str, top: float) -> te.Tensor:
    """The codes of ir.ops.quant.quantize_ref: y = x / scale in float64 (0 where scale is not > 0 or y is NaN),
    clipped to +-top, then rint (int8) or e4m3 rounding of float32(y) (fp8)."""
    ones = [isinstance(d, tir.IntImm) and int(d) == 1 for d in scale.shape]

    def code(*i: Any) -> Any:
        return quant_code(x[i], scale[tuple(0 if one else x for one, x in zip(ones, i))], storage, top)

    return te.compute(x.shape, code, name="quantize")


def quant_code(x: Any, scale: Any, storage: str, top: float) -> Any:
    """The code of one value x against its float32 scale, as quantize_ref (see quant_codes)."""
    s = scale.astype("float64")
    y = tir.Select(s > 0, x.astype("float64") / s, tir.const(0, "float64"))
    top64 = tir.const(top, "float64")
    clipped = _let("float64", y, lambda v: tir.Select(tir.isnan(v), tir.const(0, "float64"),
                                                      tir.max(tir.min(v, top64), -top64)))  # fmt: skip
    if storage == FP8:
        return _let("float32", clipped.astype("float32"), lambda v: _let("float32", fp8_round(v), fp8_encode))
    return tir.nearbyint(clipped).astype(storage)


def dequantize(q: te.Tensor, scale: te.Tensor, out_dtype: str) -> te.Tensor:
    """q * scale (scale broadcast over its dims of 1) in float32, then out_dtype: the f32 product of two f32-exact
    factors is the reference's f64 product rounded once."""
    ones = [isinstance(d, tir.IntImm) and int(d) == 1 for d in scale.shape]

    def value(*i: Any) -> Any:
        s = scale[tuple(0 if one else x for one, x in zip(ones, i))]
        return (decode(q[i], str(q.dtype)) * s).astype(out_dtype)

    return te.compute(q.shape, value, name="dequantize")


# ---- cache_write ----


def _starts_check(op: str) -> Any:
    """A macro asserting every row's step fits in the cache's slots (the reference's error), named for `op`."""
    message = f"{op}: a row's start plus the step's tokens is outside the cache's slots"

    @T.macro
    def check(start: T.Buffer, nb: T.int64, steps: T.int64, slots: T.int64) -> None:
        for b in range(nb):
            assert T.Cast("int64", start[b]) >= T.int64(0) and T.Cast("int64", start[b]) + steps <= slots, message

    return check


def cache_write(layer: int, d: int, dtype: str, start_dtype: str) -> tir.PrimFunc:
    """out = cache with new [B, Hkv, S, d] at slots start[b] .. start[b] + S - 1 of `layer`: one pass over the cache,
    threads over (layer, row, head); a step outside the slots is a runtime error, as in the reference."""
    vl = lanes(d)
    check_starts = _starts_check("cache_write")

    @T.prim_func(private=True, s_tir=True)
    def write(var_cache: T.handle, var_new: T.handle, var_start: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        nl = T.int64()
        nb = T.int64()
        nh = T.int64()
        slots = T.int64()
        steps = T.int64()
        cache = T.match_buffer(var_cache, (nl, nb, nh, slots, d), dtype)
        new = T.match_buffer(var_new, (nb, nh, steps, d), dtype)
        start = T.match_buffer(var_start, (nb,), start_dtype)
        out = T.match_buffer(var_out, (nl, nb, nh, slots, d), dtype)
        with T.sblock("root"):
            check_starts(start, nb, steps, slots)
            for r in T.parallel(nl * nb * nh):
                for c in range(slots):
                    if (
                        r // (nb * nh) == layer
                        and c >= T.Cast("int64", start[r // nh % nb])
                        and c < T.Cast("int64", start[r // nh % nb]) + steps
                    ):
                        for e in range(d // vl):
                            for lane in T.vectorized(vl):
                                out[r // (nb * nh), r // nh % nb, r % nh, c, e * vl + lane] = new[
                                    r // nh % nb, r % nh, c - T.Cast("int64", start[r // nh % nb]), e * vl + lane
                                ]
                    else:
                        for e in range(d // vl):
                            for lane in T.vectorized(vl):
                                out[r // (nb * nh), r // nh % nb, r % nh, c, e * vl + lane] = cache[
                                    r // (nb * nh), r // nh % nb, r % nh, c, e * vl + lane
                                ]

    return write.with_attr(KERNEL_ATTR, "cache_write")


def cache_write_inplace(layer: int, d: int, dtype: str, start_dtype: str) -> tir.PrimFunc:
    """cache_write into the cache itself (relax.call_tir_inplace, when nothing reads the old cache afterwards):
    only the step's rows of `layer` are written, O(B * Hkv * S * d) instead of a pass over every layer's slots."""
    vl = lanes(d)
    check_starts = _starts_check("cache_write")

    @T.prim_func(private=True, s_tir=True)
    def write(var_cache: T.handle, var_new: T.handle, var_start: T.handle):
        T.func_attr({"tirx.noalias": True})
        nl = T.int64()
        nb = T.int64()
        nh = T.int64()
        slots = T.int64()
        steps = T.int64()
        cache = T.match_buffer(var_cache, (nl, nb, nh, slots, d), dtype)
        new = T.match_buffer(var_new, (nb, nh, steps, d), dtype)
        start = T.match_buffer(var_start, (nb,), start_dtype)
        with T.sblock("root"):
            check_starts(start, nb, steps, slots)
            for r in T.parallel(nb * nh):
                for c in range(steps):
                    for e in range(d // vl):
                        for lane in T.vectorized(vl):
                            cache[layer, r // nh, r % nh, T.Cast("int64", start[r // nh]) + c, e * vl + lane] = new[
                                r // nh, r % nh, c, e * vl + lane
                            ]

    return write.with_attr(KERNEL_ATTR, "cache_write")


# ---- attention over a cache / quantized K and V ----


@T.macro
def _softmax_block(sc: T.Buffer, st: T.Buffer, acc: T.Buffer, dv: T.int64, vl: T.int64) -> None:
    """Online softmax: the block's scores sc (-inf where masked) become weights against the new running max st[0];
    the running sum st[1] and the accumulator acc are rescaled to it."""
    st[2] = st[0]
    for jj in range(KB):
        st[2] = T.max(st[2], sc[jj])
    if st[2] > NEG_INF:  # else every key so far is masked: nothing to add, and -inf - -inf would be NaN
        st[3] = T.exp(st[0] - st[2])
        st[1] = st[1] * st[3]
        for e in range(dv // vl):
            for lane in T.vectorized(vl):
                acc[e * vl + lane] = acc[e * vl + lane] * st[3]
        for jj in range(KB):
            sc[jj] = T.exp(sc[jj] - st[2])
            st[1] = st[1] + sc[jj]
        st[0] = st[2]
    else:
        for jj in range(KB):
            sc[jj] = T.float32(0)


@T.macro
def _row_init(st: T.Buffer, acc: T.Buffer, dv: T.int64, vl: T.int64) -> None:
    st[0] = NEG_INF
    st[1] = T.float32(0)
    for e in range(dv // vl):
        for lane in T.vectorized(vl):
            acc[e * vl + lane] = T.float32(0)


def _seen(qpos: Any, skv: Any, causal: bool) -> Any:
    """Keys 0 .. n-1 can be visible to a query at absolute position qpos (none past it when causal)."""
    return tir.max(tir.min(qpos + 1, skv), tir.const(0, "int64")) if causal else skv


def _mask(attrs: dict) -> tuple[float, bool, int, int]:
    return float(attrs["scale"]), bool(attrs["causal"]), int(attrs["window"]), int(attrs["sinks"])


def _visible(j: Any, qpos: Any, causal: bool, window: int, sinks: int) -> Any:
    """attention_mask of ir/ops/attention.py for key j and a query at absolute position qpos."""
    if not causal:
        return tir.const(True, "bool")
    if not window:
        return j <= qpos
    return tir.all(j <= qpos, tir.any(j > qpos - window, j < sinks))


def cached_attention(layer: int, dk: int, dv: int, scale: float, dtype: str, start_dtype: str) -> tir.PrimFunc:
    """out [B, H, S, dv]: row (b, h, i) attends to slots 0 .. start[b] + i of layer `layer` of the cache."""
    vk, vv = lanes(dk), lanes(dv)
    check_starts = _starts_check("cached_attention")

    @T.prim_func(private=True, s_tir=True)
    def attend(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_start: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        nl = T.int64()
        nb = T.int64()
        nh = T.int64()
        nkv = T.int64()
        sq = T.int64()
        slots = T.int64()
        q = T.match_buffer(var_q, (nb, nh, sq, dk), dtype)
        k = T.match_buffer(var_k, (nl, nb, nkv, slots, dk), dtype)
        v = T.match_buffer(var_v, (nl, nb, nkv, slots, dv), dtype)
        start = T.match_buffer(var_start, (nb,), start_dtype)
        out = T.match_buffer(var_out, (nb, nh, sq, dv), dtype)
        with T.sblock("root"):
            check_starts(start, nb, sq, slots)
            for r in T.parallel(nb * nh * sq):
                b = r // (nh * sq)
                h = r // sq % nh
                hk = h // (nh // nkv)
                n = T.Cast("int64", start[b]) + r % sq + 1  # the row's visible slots
                with T.sblock("row"):  # opaque: its buffers are private to the iteration
                    qr = T.sblock_alloc_buffer((dk,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((vk,), "float32", scope="local")
                    sc = T.sblock_alloc_buffer((KB,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((dv,), "float32", scope="local")
                    for d in range(dk):
                        qr[d] = T.Cast("float32", q[b, h, r % sq, d]) * T.float32(scale)
                    _row_init(st, acc, dv, vv)
                    for jb in range((n + (KB - 1)) // KB):
                        for jj in range(KB):
                            if jb * KB + jj < n:
                                for lane in T.vectorized(vk):
                                    part[lane] = T.float32(0)
                                for e in range(dk // vk):
                                    for lane in T.vectorized(vk):
                                        part[lane] = part[lane] + qr[e * vk + lane] * T.Cast(
                                            "float32", k[layer, b, hk, jb * KB + jj, e * vk + lane]
                                        )
                                sc[jj] = T.float32(0)
                                for lane in range(vk):
                                    sc[jj] = sc[jj] + part[lane]
                            else:
                                sc[jj] = NEG_INF
                        _softmax_block(sc, st, acc, dv, vv)
                        for jj in range(KB):
                            if jb * KB + jj < n:
                                for e in range(dv // vv):
                                    for lane in T.vectorized(vv):
                                        acc[e * vv + lane] = acc[e * vv + lane] + sc[jj] * T.Cast(
                                            "float32", v[layer, b, hk, jb * KB + jj, e * vv + lane]
                                        )
                    for d in range(dv):
                        out[b, h, r % sq, d] = T.Cast(dtype, T.if_then_else(st[1] > 0, acc[d] / st[1], T.float32(0)))

    return attend.with_attr(KERNEL_ATTR, "kv_attention")


def _at(ones: tuple[bool, ...], *idx: Any) -> tuple:
    """A scale's index: 0 on its broadcast (size-1) dims."""
    return tuple(0 if one else i for one, i in zip(ones, idx))


def attention_kvq(dk: int, dv: int, attrs: dict, dtype: str, kcode: str, k_ones: tuple, v_ones: tuple) -> tir.PrimFunc:
    """attention(q, k_q * k_scale, v_q * v_scale) with the mask of `attrs` (causal aligned to the end of the keys,
    window, sinks): codes and scales read per key, the product formed in registers."""
    vk, vv = lanes(dk), lanes(dv)
    scale, causal, window, sinks = _mask(attrs)

    @T.prim_func(private=True, s_tir=True)
    def attend(
        var_q: T.handle, var_kq: T.handle, var_ks: T.handle, var_vq: T.handle, var_vs: T.handle, var_out: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        nb = T.int64()
        nh = T.int64()
        nkv = T.int64()
        sq = T.int64()
        skv = T.int64()
        k0 = T.int64()
        k1 = T.int64()
        k2 = T.int64()
        k3 = T.int64()
        v0 = T.int64()
        v1 = T.int64()
        v2 = T.int64()
        v3 = T.int64()
        q = T.match_buffer(var_q, (nb, nh, sq, dk), dtype)
        kq = T.match_buffer(var_kq, (nb, nkv, skv, dk), kcode)
        ks = T.match_buffer(var_ks, (k0, k1, k2, k3), "float32")
        vq = T.match_buffer(var_vq, (nb, nkv, skv, dv), kcode)
        vs = T.match_buffer(var_vs, (v0, v1, v2, v3), "float32")
        out = T.match_buffer(var_out, (nb, nh, sq, dv), dtype)
        with T.sblock("root"):
            for r in T.parallel(nb * nh * sq):
                b = r // (nh * sq)
                h = r // sq % nh
                hk = h // (nh // nkv)
                qpos = r % sq + skv - sq  # the queries are the newest sq of the skv keys
                n = _seen(qpos, skv, causal)
                with T.sblock("row"):
                    qr = T.sblock_alloc_buffer((dk,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((vk,), "float32", scope="local")
                    sc = T.sblock_alloc_buffer((KB,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((dv,), "float32", scope="local")
                    for d in range(dk):
                        qr[d] = T.Cast("float32", q[b, h, r % sq, d]) * T.float32(scale)
                    _row_init(st, acc, dv, vv)
                    for jb in range((n + (KB - 1)) // KB):
                        for jj in range(KB):
                            if jb * KB + jj < n and _visible(jb * KB + jj, qpos, causal, window, sinks):
                                for lane in T.vectorized(vk):
                                    part[lane] = T.float32(0)
                                for e in range(dk // vk):
                                    for lane in T.vectorized(vk):
                                        part[lane] = (
                                            part[lane]
                                            + qr[e * vk + lane]
                                            * decode(kq[b, hk, jb * KB + jj, e * vk + lane], kcode)
                                            * ks[_at(k_ones, b, hk, jb * KB + jj, e * vk + lane)]
                                        )
                                sc[jj] = T.float32(0)
                                for lane in range(vk):
                                    sc[jj] = sc[jj] + part[lane]
                            else:
                                sc[jj] = NEG_INF
                        _softmax_block(sc, st, acc, dv, vv)
                        for jj in range(KB):
                            if jb * KB + jj < n:
                                for e in range(dv // vv):
                                    for lane in T.vectorized(vv):
                                        acc[e * vv + lane] = (
                                            acc[e * vv + lane]
                                            + sc[jj]
                                            * decode(vq[b, hk, jb * KB + jj, e * vv + lane], kcode)
                                            * vs[_at(v_ones, b, hk, jb * KB + jj, e * vv + lane)]
                                        )
                    for d in range(dv):
                        out[b, h, r % sq, d] = T.Cast(dtype, T.if_then_else(st[1] > 0, acc[d] / st[1], T.float32(0)))

    return attend.with_attr(KERNEL_ATTR, "kv_attention")


def mla_latent_attention(rank: int, dr: int, attrs: dict, kcode: str, l_ones: tuple, r_ones: tuple) -> tir.PrimFunc:
    """The inner MQA of absorbed MLA: q [B, H, Sq, rank + dr] (q_nope already through W_UK) against keys
    [latent | k_rot] and values latent, read as codes [B, Skv, rank] and [B, Skv, 1, dr] with their scales -> the
    attention output in latent space [B, H, Sq, rank], float32."""
    vc, vr = lanes(rank), lanes(dr)
    scale, causal, window, sinks = _mask(attrs)

    @T.prim_func(private=True, s_tir=True)
    def attend(
        var_q: T.handle, var_lq: T.handle, var_ls: T.handle, var_rq: T.handle, var_rs: T.handle, var_out: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        nb = T.int64()
        nh = T.int64()
        sq = T.int64()
        skv = T.int64()
        l0 = T.int64()
        l1 = T.int64()
        l2 = T.int64()
        r0 = T.int64()
        r1 = T.int64()
        r3 = T.int64()
        q = T.match_buffer(var_q, (nb, nh, sq, rank + dr), "float32")
        lq = T.match_buffer(var_lq, (nb, skv, rank), kcode)
        ls = T.match_buffer(var_ls, (l0, l1, l2), "float32")
        rq = T.match_buffer(var_rq, (nb, skv, 1, dr), kcode)
        rs = T.match_buffer(var_rs, (r0, r1, 1, r3), "float32")
        out = T.match_buffer(var_out, (nb, nh, sq, rank), "float32")
        with T.sblock("root"):
            for r in T.parallel(nb * nh * sq):
                b = r // (nh * sq)
                qpos = r % sq + skv - sq
                n = _seen(qpos, skv, causal)
                with T.sblock("row"):
                    qr = T.sblock_alloc_buffer((rank + dr,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((vc,), "float32", scope="local")
                    prt = T.sblock_alloc_buffer((vr,), "float32", scope="local")
                    sc = T.sblock_alloc_buffer((KB,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((rank,), "float32", scope="local")
                    for d in range(rank + dr):
                        qr[d] = q[b, r // sq % nh, r % sq, d] * T.float32(scale)
                    _row_init(st, acc, rank, vc)
                    for jb in range((n + (KB - 1)) // KB):
                        for jj in range(KB):
                            if jb * KB + jj < n and _visible(jb * KB + jj, qpos, causal, window, sinks):
                                for lane in T.vectorized(vc):
                                    part[lane] = T.float32(0)
                                for e in range(rank // vc):
                                    for lane in T.vectorized(vc):
                                        part[lane] = (
                                            part[lane]
                                            + qr[e * vc + lane]
                                            * decode(lq[b, jb * KB + jj, e * vc + lane], kcode)
                                            * ls[_at(l_ones, b, jb * KB + jj, e * vc + lane)]
                                        )
                                for lane in T.vectorized(vr):
                                    prt[lane] = T.float32(0)
                                for e in range(dr // vr):
                                    for lane in T.vectorized(vr):
                                        prt[lane] = (
                                            prt[lane]
                                            + qr[rank + e * vr + lane]
                                            * decode(rq[b, jb * KB + jj, 0, e * vr + lane], kcode)
                                            * rs[_at(r_ones, b, jb * KB + jj, 0, e * vr + lane)]
                                        )
                                sc[jj] = T.float32(0)
                                for lane in range(vc):
                                    sc[jj] = sc[jj] + part[lane]
                                for lane in range(vr):
                                    sc[jj] = sc[jj] + prt[lane]
                            else:
                                sc[jj] = NEG_INF
                        _softmax_block(sc, st, acc, rank, vc)
                        for jj in range(KB):
                            if jb * KB + jj < n:
                                for e in range(rank // vc):
                                    for lane in T.vectorized(vc):
                                        acc[e * vc + lane] = (
                                            acc[e * vc + lane]
                                            + sc[jj]
                                            * decode(lq[b, jb * KB + jj, e * vc + lane], kcode)
                                            * ls[_at(l_ones, b, jb * KB + jj, e * vc + lane)]
                                        )
                    for d in range(rank):
                        out[b, r // sq % nh, r % sq, d] = T.if_then_else(st[1] > 0, acc[d] / st[1], T.float32(0))

    return attend.with_attr(KERNEL_ATTR, "kv_attention")
