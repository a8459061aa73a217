"""Kernels of the sparse-attention lowerings (relax_attention.py): block maps, the DSA selection mask, a
flash-attention kernel driven by a block map, and the masked softmax of the dense masked ops.

Masks follow ir/ops/attention.py and attention_tiled.py: query i sits at absolute position p = i + Skv - Sq (the
queries are the newest keys); causal shows keys j <= p; a window keeps j > p - window, plus the first `sinks` keys;
a block-sparse layout keeps only its (q_block, k_block) pairs; DSA keeps the selected keys (a mask [B, Sq, Skv]
built once from the indices). `aux` is an int8 tensor: the layout table [1, LQ, LK] (a dummy [1, 1, 1] without a
layout) or the DSA mask.

The flash kernel runs one task per (batch, head, q tile), on the threads; each task visits only the k tiles its
block-map row lists: S = Q K^T in register tiles (K tile transposed once, vectorized over keys), the element mask
on PARTIAL tiles only, an online softmax (vectorized fast exp), then P V in register tiles (vectorized over Dv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import te
from tvm import tirx as tir
from tvm.script import tirx as T

from r1c.backends.cpu.kernels import KERNEL_ATTR, lanes
from r1c.backends.cpu.kernels import fast_exp_expr as fast_exp
from r1c.ir.ops.attention_tiled import FULL, PARTIAL

NEG_INF = float("-inf")
# The kernel kinds of this file (schedule.HAND_WRITTEN leaves them as written).
BLOCK_MAP, DSA_MASK, DSA_BLOCK_MAP, FLASH = "attention_block_map", "dsa_mask", "dsa_block_map", "flash_attention"


@dataclass(frozen=True)
class MaskSpec:
    """The element mask of one op: structured (causal/window/sinks/layout) or the DSA selection."""

    causal: bool = True
    window: int = 0
    sinks: int = 0
    layout_block: int = 0
    layout: tuple[int, ...] = ()
    dsa: bool = False

    @staticmethod
    def of(a: dict, dsa: bool = False) -> "MaskSpec":
        if dsa:
            return MaskSpec(causal=True, dsa=True)
        return MaskSpec(a["causal"], a["window"], a["sinks"], a.get("layout_block", 0), tuple(a.get("layout", ())))

    def aux(self) -> np.ndarray:
        """The int8 layout table [1, LQ, LK] (blocks past it see nothing), or a dummy [1, 1, 1] without one."""
        if not self.layout_block:
            return np.ones((1, 1, 1), np.int8)
        pairs = np.asarray(self.layout, np.int64).reshape(-1, 2)
        table = np.zeros((1, *(pairs.max(axis=0) + 1)), np.int8)
        table[0, pairs[:, 0], pairs[:, 1]] = 1
        return table


def _i64(x: Any) -> Any:
    return tir.Cast("int64", x) if hasattr(x, "dtype") and x.dtype != "int64" else x


def visible(spec: MaskSpec, aux: Any, bi: Any, i: Any, j: Any, sq: Any, skv: Any) -> Any:
    """Whether query i (0-based among Sq) sees key j, for j < Skv (keys past the end are hidden). Guarded loads
    (if_then_else, not Select) so that no out-of-range element of aux is read."""
    i, j = _i64(i), _i64(j)
    inside = tir.all(j < skv, i < sq)
    if spec.dsa:
        return tir.if_then_else(inside, aux[bi, tir.min(i, sq - 1), tir.min(j, skv - 1)] != tir.const(0, "int8"),
                                tir.const(False))  # fmt: skip
    conds = [j < skv]
    p = i + skv - sq
    if spec.causal:
        conds.append(j <= p)
    if spec.causal and spec.window:
        conds.append(tir.Or(j > p - spec.window, j < spec.sinks))
    if spec.layout_block:
        lb = spec.layout_block
        on = tir.all(i // lb < aux.shape[1], j // lb < aux.shape[2])
        conds.append(tir.if_then_else(on, aux[0, i // lb, j // lb] != tir.const(0, "int8"), tir.const(False)))
    return tir.all(*conds)


def _rows(n: int) -> int:
    """Rows per register tile: 4 when they divide the tile."""
    return next(r for r in (4, 2, 1) if n % r == 0)


# ---- block maps -------------------------------------------------------------------------------------------------


def _inter(a: Any, b: Any, c: Any, d: Any) -> Any:
    """|[a, b) & [c, d)|."""
    return tir.max(tir.min(b, d) - tir.max(a, c), tir.const(0, "int64"))


def _row_count(spec: MaskSpec, p: Any, a: Any, b: Any) -> Any:
    """Keys in [a, b) (inside [0, Skv)) that the query at absolute position p sees (no layout): the causal keys
    are [0, p], a window's [p - window + 1, p] plus the sinks [0, sinks)."""
    if not spec.causal:
        return tir.max(b - a, tir.const(0, "int64"))
    if not spec.window:
        return _inter(a, b, tir.const(0, "int64"), p + 1)
    lo = tir.max(p - spec.window + 1, tir.const(0, "int64"))
    sink_hi = tir.min(tir.const(spec.sinks, "int64"), p + 1)
    return _inter(a, b, lo, p + 1) + _inter(a, b, tir.const(0, "int64"), sink_hi) - _inter(a, b, lo, sink_hi)


def structured_block_map(spec: MaskSpec, bq: int, bk: int) -> tir.PrimFunc:
    """q [B, H, Sq, D], k [B, Hkv, Skv, D] (read for their lengths), aux -> block_map [1, n_q, C, 2], counts
    [1, n_q]: per q tile, the k tiles with a visible element in ascending order, FULL when every element (padding
    counts as hidden) is visible. Counted per query row in closed form: O(Sq * n_k), not O(Sq * Skv). C is the
    type's bound (map_columns), which a valid mask never exceeds; writes past it are dropped all the same."""
    lb = spec.layout_block
    segments = -(-bk // lb) + 1 if lb else 1  # layout blocks one k tile can cross

    def row_count(aux: Any, i: Any, k0: Any, k1: Any, sq: Any, skv: Any) -> Any:
        p = i + skv - sq
        if not lb:
            return _row_count(spec, p, k0, k1)
        total = tir.const(0, "int64")
        for g in range(segments):
            blk = k0 // lb + g
            a, b = tir.max(k0, blk * lb), tir.min(k1, (blk + 1) * lb)
            on = tir.all(i // lb < aux.shape[1], blk < aux.shape[2])
            on = tir.if_then_else(on, aux[0, tir.min(i // lb, aux.shape[1] - 1), tir.min(blk, aux.shape[2] - 1)],
                                  tir.const(0, "int8"))  # fmt: skip
            total = total + tir.Select(on != tir.const(0, "int8"), _row_count(spec, p, a, b), tir.const(0, "int64"))
        return total

    @T.prim_func(private=True, s_tir=True)
    def block_map(var_q: T.handle, var_k: T.handle, var_aux: T.handle, var_map: T.handle, var_counts: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, h, sq, dq = T.int64(), T.int64(), T.int64(), T.int64()
        bk_, hkv, skv, dk = T.int64(), T.int64(), T.int64(), T.int64()
        a0, a1, a2, nq, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        _q = T.match_buffer(var_q, (b, h, sq, dq), "float32")  # read for its length only
        _k = T.match_buffer(var_k, (bk_, hkv, skv, dk), "float32")
        aux = T.match_buffer(var_aux, (a0, a1, a2), "int8")
        bmap = T.match_buffer(var_map, (1, nq, cols, 2), "int32")
        counts = T.match_buffer(var_counts, (1, nq), "int32")
        with T.sblock("root"):
            for t in T.parallel(nq):
                with T.sblock("row"):
                    used = T.sblock_alloc_buffer((1,), "int64", scope="local")
                    seen = T.sblock_alloc_buffer((1,), "int64", scope="local")
                    used[0] = T.int64(0)
                    for kt in range((skv + (bk - 1)) // bk):
                        seen[0] = T.int64(0)
                        for ii in range(bq):
                            if t * bq + ii < sq:
                                seen[0] = seen[0] + row_count(aux, t * bq + ii, kt * bk, T.min(kt * bk + bk, skv),
                                                              sq, skv)  # fmt: skip
                        if seen[0] > T.int64(0):
                            if used[0] < cols:
                                bmap[0, t, used[0], 0] = T.Cast("int32", kt)
                                bmap[0, t, used[0], 1] = T.Select(seen[0] == T.int64(bq * bk), FULL, PARTIAL)
                            used[0] = used[0] + T.int64(1)
                    counts[0, t] = T.Cast("int32", T.min(used[0], cols))
                    for c in range(T.min(used[0], cols), cols):
                        bmap[0, t, c, 0] = -1
                        bmap[0, t, c, 1] = 0

    return block_map.with_attr(KERNEL_ATTR, BLOCK_MAP)


def dsa_mask() -> tir.PrimFunc:
    """indices int32 [B, Sq, topk] (-1 = none) -> int8 mask [B, Sq, Skv] of the selected keys the causal mask also
    shows (duplicates select once). An index outside [-1, Skv) is a runtime error, as in the reference."""

    @T.prim_func(private=True, s_tir=True)
    def mask(var_idx: T.handle, var_mask: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, sq, topk, skv = T.int64(), T.int64(), T.int64(), T.int64()
        idx = T.match_buffer(var_idx, (b, sq, topk), "int32")
        out = T.match_buffer(var_mask, (b, sq, skv), "int8")
        with T.sblock("root"):
            for bi, i, j in T.grid(b, sq, topk):
                assert idx[bi, i, j] >= -1 and T.Cast("int64", idx[bi, i, j]) < skv, (
                    "cpu target: a DSA index is out of range for the keys (-1 means no selection)"
                )
            for row in T.parallel(b * sq):
                for j in range(skv):
                    out[row // sq, row % sq, j] = T.int8(0)
                for j in range(topk):
                    if idx[row // sq, row % sq, j] >= 0 and T.Cast("int64", idx[row // sq, row % sq, j]) <= (
                        row % sq + skv - sq
                    ):
                        out[row // sq, row % sq, idx[row // sq, row % sq, j]] = T.int8(1)

    return mask.with_attr(KERNEL_ATTR, DSA_MASK)


def dsa_block_map(bq: int, bk: int) -> tir.PrimFunc:
    """The DSA mask [B, Sq, Skv] -> block_map [B, n_q, n_k, 2], counts [B, n_q]: one row per (batch, q tile), each
    k tile counted from the mask (the selection has no closed form)."""

    @T.prim_func(private=True, s_tir=True)
    def block_map(var_mask: T.handle, var_map: T.handle, var_counts: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, sq, skv, nq, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        mask = T.match_buffer(var_mask, (b, sq, skv), "int8")
        bmap = T.match_buffer(var_map, (b, nq, cols, 2), "int32")
        counts = T.match_buffer(var_counts, (b, nq), "int32")
        with T.sblock("root"):
            for row in T.parallel(b * nq):
                with T.sblock("row"):
                    used = T.sblock_alloc_buffer((1,), "int64", scope="local")
                    seen = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    used[0] = T.int64(0)
                    for kt in range((skv + (bk - 1)) // bk):
                        seen[0] = 0
                        for ii, jj in T.grid(bq, bk):
                            if (row % nq) * bq + ii < sq and kt * bk + jj < skv:
                                seen[0] = seen[0] + T.Cast("int32", mask[row // nq, (row % nq) * bq + ii, kt * bk + jj])
                        if seen[0] > 0:
                            if used[0] < cols:
                                bmap[row // nq, row % nq, used[0], 0] = T.Cast("int32", kt)
                                bmap[row // nq, row % nq, used[0], 1] = T.Select(seen[0] == bq * bk, FULL, PARTIAL)
                            used[0] = used[0] + T.int64(1)
                    counts[row // nq, row % nq] = T.Cast("int32", T.min(used[0], cols))
                    for c in range(T.min(used[0], cols), cols):
                        bmap[row // nq, row % nq, c, 0] = -1
                        bmap[row // nq, row % nq, c, 1] = 0

    return block_map.with_attr(KERNEL_ATTR, DSA_BLOCK_MAP)


# ---- the flash kernel -------------------------------------------------------------------------------------------


def flash_attention(
    spec: MaskSpec, heads: int, kv_heads: int, dk: int, dv: int, scale: float, bq: int, bk: int
) -> tir.PrimFunc:
    """q [B, H, Sq, Dk], k [B, Hkv, Skv, Dk], v [B, Hkv, Skv, Dv], block_map [Bm, n_q, C, 2], counts [Bm, n_q],
    aux -> out [B, H, Sq, Dv], float32. Per (batch, head, q tile): the listed k tiles only, in map order, with an
    online softmax; the element mask on PARTIAL tiles only (FULL tiles hide just the keys past the end, as the
    reference's slices do). A q row that sees nothing gives zeros. Entries whose k tile is outside [0, n_k) are
    skipped (nothing is read past the keys), and any kind other than FULL is masked (the reference rejects it)."""
    rep, ri, vq, vd = heads // kv_heads, _rows(bq), lanes(bk), lanes(dv)
    dvb = next(c for c in (4 * vd, 2 * vd, vd) if dv % c == 0)  # Dv columns per register tile
    neg_inf, zero = tir.const(NEG_INF, "float32"), tir.const(0.0, "float32")

    @T.prim_func(private=True, s_tir=True)
    def flash(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_map: T.handle, var_counts: T.handle,
              var_aux: T.handle, var_o: T.handle):  # fmt: skip
        T.func_attr({"tirx.noalias": True})
        b, sq, skv, bm, nq, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        a0, a1, a2 = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (b, heads, sq, dk), "float32")
        k = T.match_buffer(var_k, (b, kv_heads, skv, dk), "float32")
        v = T.match_buffer(var_v, (b, kv_heads, skv, dv), "float32")
        bmap = T.match_buffer(var_map, (bm, nq, cols, 2), "int32")
        counts = T.match_buffer(var_counts, (bm, nq), "int32")
        aux = T.match_buffer(var_aux, (a0, a1, a2), "int8")
        o = T.match_buffer(var_o, (b, heads, sq, dv), "float32")
        with T.sblock("root"):
            for task in T.parallel(b * heads * nq):
                with T.sblock("task"):  # opaque: its buffers are private to the task
                    T.reads()  # declared empty: it reads through let-bound indices
                    T.writes()
                    qs = T.sblock_alloc_buffer((bq, dk), "float32", scope="local")
                    kt_ = T.sblock_alloc_buffer((dk, bk), "float32", scope="local")
                    s = T.sblock_alloc_buffer((bq, bk), "float32", scope="local")
                    acc = T.sblock_alloc_buffer((bq, dv), "float32", scope="local")
                    m = T.sblock_alloc_buffer((bq,), "float32", scope="local")
                    lsum = T.sblock_alloc_buffer((bq,), "float32", scope="local")
                    red = T.sblock_alloc_buffer((2,), "float32", scope="local")
                    bi = task // (heads * nq)
                    hi = task // nq % heads
                    t = task % nq
                    mb = T.Select(bm == T.int64(1), T.int64(0), bi)
                    for ii, d in T.grid(bq, dk):  # the q tile, pre-scaled; rows past Sq re-read the last row
                        qs[ii, d] = q[bi, hi, T.min(t * bq + ii, sq - 1), d] * T.float32(scale)
                    for ii in range(bq):
                        m[ii] = neg_inf
                        lsum[ii] = zero
                    for ii, d in T.grid(bq, dv):
                        acc[ii, d] = zero
                    for c in range(T.Cast("int64", T.min(T.max(counts[mb, t], 0), T.Cast("int32", cols)))):
                        kt = T.Cast("int64", bmap[mb, t, c, 0])
                        if kt >= T.int64(0) and kt * bk < skv:
                            for jj, d in T.grid(bk, dk):  # the k tile transposed: key lanes contiguous
                                kt_[d, jj] = k[bi, hi // rep, T.min(kt * bk + jj, skv - 1), d]
                            for io in range(bq // ri):
                                with T.sblock("qk"):
                                    T.reads()  # declared empty: it reads through let-bound indices
                                    T.writes()
                                    reg = T.sblock_alloc_buffer((ri, bk), "float32", scope="local")
                                    for ii in T.unroll(ri):
                                        for jv in T.unroll(bk // vq):
                                            for jl in T.vectorized(vq):
                                                reg[ii, jv * vq + jl] = zero
                                    for d in range(dk):
                                        for ii in T.unroll(ri):
                                            for jv in T.unroll(bk // vq):
                                                for jl in T.vectorized(vq):
                                                    reg[ii, jv * vq + jl] = reg[ii, jv * vq + jl] + (
                                                        qs[io * ri + ii, d] * kt_[d, jv * vq + jl]
                                                    )
                                    if bmap[mb, t, c, 1] == FULL:  # no element mask, only the end of the keys
                                        for ii in T.unroll(ri):
                                            for jv in T.unroll(bk // vq):
                                                for jl in T.vectorized(vq):
                                                    s[io * ri + ii, jv * vq + jl] = T.Select(
                                                        kt * bk + jv * vq + jl < skv, reg[ii, jv * vq + jl], neg_inf
                                                    )
                                    else:
                                        for ii in T.unroll(ri):
                                            for jv in T.unroll(bk // vq):
                                                for jl in T.vectorized(vq):
                                                    s[io * ri + ii, jv * vq + jl] = T.Select(
                                                        visible(spec, aux, bi, t * bq + io * ri + ii,
                                                                kt * bk + jv * vq + jl, sq, skv),
                                                        reg[ii, jv * vq + jl],
                                                        neg_inf,
                                                    )  # fmt: skip
                            for ii in range(bq):  # online softmax: rescale what the row has so far
                                red[0] = m[ii]
                                for jj in range(bk):
                                    red[0] = T.max(red[0], s[ii, jj])
                                msafe = T.Select(red[0] == neg_inf, zero, red[0])
                                alpha = T.Select(m[ii] == neg_inf, zero, fast_exp(m[ii] - msafe))
                                for jv in range(bk // vq):
                                    for jl in T.vectorized(vq):
                                        s[ii, jv * vq + jl] = T.Select(
                                            s[ii, jv * vq + jl] == neg_inf, zero, fast_exp(s[ii, jv * vq + jl] - msafe)
                                        )
                                red[1] = zero
                                for jj in range(bk):
                                    red[1] = red[1] + s[ii, jj]
                                lsum[ii] = lsum[ii] * alpha + red[1]
                                m[ii] = red[0]
                                for dvo in range(dv // vd):
                                    for dl in T.vectorized(vd):
                                        acc[ii, dvo * vd + dl] = acc[ii, dvo * vd + dl] * alpha
                            for io, dvo in T.grid(bq // ri, dv // dvb):
                                with T.sblock("pv"):
                                    T.reads()  # declared empty: it reads through let-bound indices
                                    T.writes()
                                    reg = T.sblock_alloc_buffer((ri, dvb), "float32", scope="local")
                                    for ii in T.unroll(ri):
                                        for dv_ in T.unroll(dvb // vd):
                                            for dl in T.vectorized(vd):
                                                reg[ii, dv_ * vd + dl] = acc[io * ri + ii, dvo * dvb + dv_ * vd + dl]
                                    for jj in range(bk):
                                        for ii in T.unroll(ri):
                                            for dv_ in T.unroll(dvb // vd):
                                                for dl in T.vectorized(vd):
                                                    reg[ii, dv_ * vd + dl] = reg[ii, dv_ * vd + dl] + s[
                                                        io * ri + ii, jj
                                                    ] * v[bi, hi // rep, T.min(kt * bk + jj, skv - 1),
                                                          dvo * dvb + dv_ * vd + dl]  # fmt: skip
                                    for ii in T.unroll(ri):
                                        for dv_ in T.unroll(dvb // vd):
                                            for dl in T.vectorized(vd):
                                                acc[io * ri + ii, dvo * dvb + dv_ * vd + dl] = reg[ii, dv_ * vd + dl]
                    for ii in range(bq):
                        if t * bq + ii < sq:
                            for dvo in range(dv // vd):
                                for dl in T.vectorized(vd):
                                    o[bi, hi, t * bq + ii, dvo * vd + dl] = T.Select(
                                        lsum[ii] > zero, acc[ii, dvo * vd + dl] / lsum[ii], zero
                                    )

    return flash.with_attr(KERNEL_ATTR, FLASH)


# ---- dense masked softmax ---------------------------------------------------------------------------------------


def masked_probs(s: te.Tensor, aux: te.Tensor, scale: float, heads: int, spec: MaskSpec) -> te.Tensor:
    """softmax(scale * s) over the last axis of scores s [B*H, Sq, Skv] under the mask (the DSA mask is per batch
    row: z // heads), in one kernel; a row that sees nothing gives zeros, as the reference."""
    z, sq, skv = s.shape
    neg_inf, zero = tir.const(NEG_INF, "float32"), tir.const(0.0, "float32")

    def val(b: Any, i: Any, j: Any) -> Any:
        return tir.Select(visible(spec, aux, b // heads, i, j, sq, skv), s[b, i, j] * tir.const(scale, "float32"),
                          neg_inf)  # fmt: skip

    k = te.reduce_axis((0, skv), name="k")
    top = te.compute((z, sq), lambda b, i: te.max(val(b, i, k), axis=k), name="row_max")
    safe = te.compute((z, sq), lambda b, i: tir.Select(top[b, i] == neg_inf, zero, top[b, i]), name="row_safe")
    ex = te.compute(
        (z, sq, skv),
        lambda b, i, j: tir.Select(val(b, i, j) == neg_inf, zero, fast_exp(val(b, i, j) - safe[b, i])),
        name="masked_exp",
    )
    k2 = te.reduce_axis((0, skv), name="k2")
    total = te.compute((z, sq), lambda b, i: te.sum(ex[b, i, k2], axis=k2), name="row_sum")
    return te.compute(
        (z, sq, skv), lambda b, i, j: tir.Select(total[b, i] > zero, ex[b, i, j] / total[b, i], zero), name="probs"
    )
