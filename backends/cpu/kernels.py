"""The compute kernels the cpu lowering emits for the hot ops: GEMMs as TE (which the default schedule in
schedule.py tiles and which MetaSchedule can tune) and, for MoE, hand-written TIR that routes tokens to experts and
runs one grouped GEMM over the routed rows only.

Register tiles are MI rows x a panel of columns (MOE_MI x a wider panel for the experts, whose row groups are
small: fewer padding rows); weights of `linear` and of the experts are stored in panels, [..., N/panel, K, panel]
(pack_panels), so a tile streams one contiguous panel instead of one cache line per weight row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import te
from tvm import tirx as tir
from tvm.script import tirx as T

MI = 8  # rows per register tile
TASKS = 16  # parallel tasks of a row-wise kernel: a few per thread, so uneven rows still balance
PANEL = 32  # columns per weight panel
MOE_MI, EXPERT_PANEL = 4, 64  # the experts' tiles: measured 1.2x faster than 8 x 32 on V2-Lite's routed GEMMs
VEC = 16  # f32 lanes of one AVX-512 register (NEON gets four registers per vector op)

ACC_BLOCK, OUT_BLOCK, PAD_BLOCK = "r1c_acc", "r1c_out", "r1c_pad"  # the block names schedule.py tiles
KERNEL_ATTR = "r1c_kernel"


def lanes(n: int) -> int:
    """The widest vector (at most one register of f32, VEC lanes) that divides n: loops split by it need no tail."""
    return next(w for w in (VEC, 8, 4, 2, 1) if n % w == 0)


def panel_width(n: int) -> int:
    return PANEL if n >= PANEL else VEC


def expert_panel_width(n: int) -> int:
    return EXPERT_PANEL if n % EXPERT_PANEL == 0 else panel_width(n)


def panel_for(op_name: str, n: int) -> int:
    """The panel width the GEMM kernel of `op_name` reads an n-row weight in (packing at load must agree)."""
    return expert_panel_width(n) if op_name == "moe_experts" else panel_width(n)


def pack_panels_shape(shape: list[int], p: int) -> list[int]:
    *lead, n, k = shape
    return [*lead, -(-n // p), k, p]


def pack_panels(w: np.ndarray, p: int) -> np.ndarray:
    """[..., N, K] -> [..., ceil(N/p), K, p], zero-padded: the layout dense_packed and grouped_matmul read."""
    *lead, n, k = w.shape
    np_ = -(-n // p)
    padded = np.zeros((*lead, np_ * p, k), w.dtype)
    padded[..., :n, :] = w
    return np.ascontiguousarray(np.swapaxes(padded.reshape(*lead, np_, p, k), -1, -2))


def _ceil_to(x: Any, m: int) -> Any:
    return (x + (m - 1)) // m * m


def _static(n: Any) -> int | None:
    return int(n) if isinstance(n, (int, tir.IntImm)) else None


def _clamped(i: Any, n: Any, tile: int) -> Any:
    """Index i of a tile loop padded to whole tiles of an n-long axis: clamped to n - 1 unless n is a static multiple
    of the tile (a clamp in the vectorized axis turns every load into a gather)."""
    s = _static(n)
    return i if s is not None and s % tile == 0 else te.min(i, n - 1)


def dense_packed(x: te.Tensor, wp: te.Tensor, n: int) -> te.Tensor:
    """x [M, K] @ W.T, W [n, K] given as panels wp [ceil(n/p), K, p]. Rows are computed in whole tiles, the last
    tile re-reading row M-1, so the tile loop has no predicate; only the copy-out is guarded."""
    m, kdim = x.shape
    np_, _, p = wp.shape
    k = te.reduce_axis((0, kdim), name="k")
    acc = te.compute(
        (_ceil_to(m, MI), np_ * p),
        lambda i, j: te.sum(x[_clamped(i, m, MI), k] * wp[j // p, k, j % p], axis=k),
        name=ACC_BLOCK,
    )
    return te.compute((m, n), lambda i, j: acc[i, j], name=OUT_BLOCK)


def batched_matmul(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """a [B, M, K] @ b [B, K, N] (attention's QK^T and PV) with M padded to whole tiles by clamped reads of a's rows
    and N by a zero-padded copy of b when N is not a known multiple of the tile."""
    bsz, m, kdim = a.shape
    n = b.shape[2]
    p = VEC if _static(n) is not None and _static(n) < PANEL else PANEL
    if _static(n) is None or _static(n) % p:  # a column tile past n: read a zero-padded copy (a clamp would gather)
        b = te.compute(
            (bsz, kdim, _ceil_to(n, p)),
            lambda z, kk, j: tir.if_then_else(j < n, b[z, kk, te.min(j, n - 1)], tir.const(0, b.dtype)),
            name=PAD_BLOCK,
        )
    k = te.reduce_axis((0, kdim), name="k")
    acc = te.compute(
        (bsz, _ceil_to(m, MI), _ceil_to(n, p)),
        lambda z, i, j: te.sum(a[z, _clamped(i, m, MI), k] * b[z, k, j], axis=k),
        name=ACC_BLOCK,
    )
    return te.compute((bsz, m, n), lambda z, i, j: acc[z, i, j], name=OUT_BLOCK)


def routed_rows(tokens: Any, k: int, experts: int) -> Any:
    """Rows of the routed layout: every expert's rows padded to whole tiles, at most E*(MOE_MI-1) more than T*k."""
    return _ceil_to(tokens * k + experts * (MOE_MI - 1), MOE_MI)


def moe_route(experts: int, k: int) -> tir.PrimFunc:
    """ids [T, k] -> row_token [P] (the token of each routed row; padding rows read token 0), tile_expert [P/mi],
    slot [T, k] (the routed row of each (token, choice)), used [1] (tiles in use). A counting sort: rows of one
    expert are contiguous and in token order. Serial: it is O(T*k + E) integer work."""
    e_, mi = experts, MOE_MI

    @T.prim_func(private=True, s_tir=True)
    def route(var_ids: T.handle, var_rows: T.handle, var_tiles: T.handle, var_slot: T.handle, var_used: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (n, k), "int32")
        row_token = T.match_buffer(var_rows, ((n * k + e_ * (mi - 1) + (mi - 1)) // mi * mi,), "int32")
        tile_expert = T.match_buffer(var_tiles, ((n * k + e_ * (mi - 1) + (mi - 1)) // mi,), "int32")
        slot = T.match_buffer(var_slot, (n, k), "int32")
        used = T.match_buffer(var_used, (1,), "int32")
        with T.sblock("root"):
            count = T.sblock_alloc_buffer((e_,), "int32")
            fill = T.sblock_alloc_buffer((e_,), "int32")
            for e in range(e_):
                count[e] = 0
            for t, j in T.grid(n, k):
                count[ids[t, j]] = count[ids[t, j]] + 1
            for r in range((n * k + e_ * (mi - 1) + (mi - 1)) // mi * mi):
                row_token[r] = 0
            for r in range((n * k + e_ * (mi - 1) + (mi - 1)) // mi):
                tile_expert[r] = 0
            used[0] = 0
            for e in range(e_):
                fill[e] = used[0] * mi
                for t in range((count[e] + (mi - 1)) // mi):
                    tile_expert[used[0] + t] = e
                used[0] = used[0] + (count[e] + (mi - 1)) // mi
            for t, j in T.grid(n, k):
                row_token[fill[ids[t, j]]] = T.Cast("int32", t)
                slot[t, j] = fill[ids[t, j]]
                fill[ids[t, j]] = fill[ids[t, j]] + 1

    return route.with_attr(KERNEL_ATTR, "moe_route")


def grouped_matmul(experts: int, kdim: int, n: int) -> tir.PrimFunc:
    """x [P, K] (routed rows) times the experts' W.T, W [E, n, K] given as panels [E, N/p, K, p] -> [P, N/p*p]
    (columns past n are zero): each tile of MOE_MI rows uses the expert tile_expert[tile]; only the `used` tiles are
    computed (rows of the others stay unwritten, and nothing reads them). Threads split the column panels."""
    p = panel_for("moe_experts", n)
    np_, vec, mi = -(-n // p), min(VEC, p), MOE_MI

    @T.prim_func(private=True, s_tir=True)
    def grouped(var_x: T.handle, var_w: T.handle, var_tiles: T.handle, var_used: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, kdim), "float32")
        w = T.match_buffer(var_w, (experts, np_, kdim, p), "float32")
        tile_expert = T.match_buffer(var_tiles, (rows // mi,), "int32")
        used = T.match_buffer(var_used, (1,), "int32")
        y = T.match_buffer(var_y, (rows, np_ * p), "float32")
        with T.sblock("root"):
            for jo in T.parallel(np_):
                for io in range(T.Cast("int64", used[0])):
                    with T.sblock("tile"):  # opaque: its registers are private to the iteration
                        acc = T.sblock_alloc_buffer((mi, p), "float32", scope="local")
                        for ii in T.unroll(mi):
                            for jv in T.unroll(p // vec):
                                for jl in T.vectorized(vec):
                                    acc[ii, jv * vec + jl] = T.float32(0)
                        for kk in range(kdim):
                            for ii in T.unroll(mi):
                                for jv in T.unroll(p // vec):
                                    for jl in T.vectorized(vec):
                                        acc[ii, jv * vec + jl] = (
                                            acc[ii, jv * vec + jl]
                                            + x[io * mi + ii, kk] * w[tile_expert[io], jo, kk, jv * vec + jl]
                                        )
                        for ii in T.unroll(mi):
                            for jv in T.unroll(p // vec):
                                for jl in T.vectorized(vec):
                                    y[io * mi + ii, jo * p + jv * vec + jl] = acc[ii, jv * vec + jl]

    return grouped.with_attr(KERNEL_ATTR, "grouped_matmul")


def attention_probs(s: te.Tensor, scale: float, causal: bool, dtype: str) -> te.Tensor:
    """softmax(scale * s) over the last axis of scores s [Z, Sq, Skv], causal (queries are the newest Sq of Skv
    keys) or not, in one kernel: scale, mask, max, exp (TVM's vectorizable fast_exp), sum, normalize."""
    from tvm import topi

    z, sq, skv = s.shape
    neg_inf = tir.const(-np.inf, dtype)

    def val(b: Any, i: Any, j: Any) -> Any:
        x = (s[b, i, j] * tir.const(scale, s.dtype)).astype(dtype)
        return tir.Select(j <= i + (skv - sq), x, neg_inf) if causal else x

    k = te.reduce_axis((0, skv), name="k")
    top = te.compute((z, sq), lambda b, i: te.max(val(b, i, k), axis=k), name="row_max")
    ex = topi.fast_exp(te.compute((z, sq, skv), lambda b, i, j: val(b, i, j) - top[b, i], name="centered"))
    k2 = te.reduce_axis((0, skv), name="k2")
    total = te.compute((z, sq), lambda b, i: te.sum(ex[b, i, k2], axis=k2), name="row_sum")
    return te.compute((z, sq, skv), lambda b, i, j: ex[b, i, j] / total[b, i], name="probs")


def rope_table(pos: te.Tensor, inv_freq: te.Tensor, scale: float) -> tuple[te.Tensor, te.Tensor]:
    """cos and sin [B, S, D/2] of pos * inv_freq (float32 angles, as the reference), times the YaRN scale: one
    small kernel, so the rotation that reads them does not recompute them for every head."""
    b, s = pos.shape
    c = tir.const(float(np.float32(scale)), "float32")
    angle = lambda i, j, d: pos[i, j].astype("float32") * inv_freq[d]  # noqa: E731
    cos = te.compute((b, s, inv_freq.shape[0]), lambda i, j, d: te.cos(angle(i, j, d)) * c, name="rope_cos")
    sin = te.compute((b, s, inv_freq.shape[0]), lambda i, j, d: te.sin(angle(i, j, d)) * c, name="rope_sin")
    return cos, sin


def rope_rotate(x: te.Tensor, cos: te.Tensor, sin: te.Tensor, interleaved: bool) -> te.Tensor:
    """x [B, S, H, D] rotated by the tables [B, S, D/2], in the reference's output order: the rotated first
    halves of the pairs, then the second halves (pairs are (2j, 2j+1) when interleaved, (j, j+D/2) if not).
    One expression per element, so TVM fuses it with the concat and transpose around it."""
    half = x.shape[3] // 2

    def out(b: Any, s: Any, h: Any, d: Any) -> Any:
        j = tir.Select(d < half, d, d - half)
        a, c = (x[b, s, h, 2 * j], x[b, s, h, 2 * j + 1]) if interleaved else (x[b, s, h, j], x[b, s, h, j + half])
        lo = a * cos[b, s, j] - c * sin[b, s, j]
        hi = c * cos[b, s, j] + a * sin[b, s, j]
        return tir.Select(d < half, lo, hi)

    return te.compute(x.shape, out, name="rope")


def fast_exp(x: te.Tensor) -> te.Tensor:
    """exp through TVM's fast_exp: range reduction and a degree-7 polynomial, ~1e-7 relative error, vectorizable
    (arguments are clamped to +-88.38, so exp never overflows to inf)."""
    from tvm import topi

    return topi.fast_exp(x)


def sigmoid(x: te.Tensor) -> te.Tensor:
    neg = te.compute(x.shape, lambda *i: -x(*i), name="neg")
    e = fast_exp(neg)
    return te.compute(x.shape, lambda *i: tir.const(1.0, x.dtype) / (tir.const(1.0, x.dtype) + e(*i)), name="sigmoid")


def silu(x: te.Tensor) -> te.Tensor:
    s = sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="silu")


LOG2E, LN2 = 1.4426950216293335, 0.69314718246459961
EXP_POLY = (
    0.00019875691214110702,
    0.0013981999363750219,
    0.008333452045917511,
    0.041665796190500259,
    0.1666666567325592,
)


def fast_exp_expr(x: Any) -> Any:
    """TVM's fast_exp (topi) as a scalar expression, for hand-written TIR: 2^n times a degree-7 polynomial of the
    remainder; the max with x keeps exp(x) >= x and flushes arguments below -88.38 to 0."""
    xc = tir.max(tir.min(x, tir.const(88.376266479492188, "float32")), tir.const(-88.376258850097656, "float32"))
    n = tir.floor(xc * tir.const(LOG2E, "float32") + tir.const(0.5, "float32"))
    r = xc - n * tir.const(LN2, "float32")
    p = tir.const(EXP_POLY[0], "float32")
    for c in EXP_POLY[1:]:
        p = p * r + tir.const(c, "float32")
    p = (p * r + tir.const(0.5, "float32")) * r * r + r + tir.const(1.0, "float32")
    two_n = tir.reinterpret("float32", tir.shift_left((n + tir.const(127.0, "float32")).astype("int32"), 23))
    return tir.max(two_n * p, x)


def attention_softmax(scale: float, causal: bool) -> tir.PrimFunc:
    """softmax(scale * s) over the last axis of f32 scores s [Z, Sq, Skv], causal (query i, the newest Sq of Skv
    keys, sees keys j <= i + Skv - Sq; a row that sees none is zeros, as in the reference) or not. One parallel loop
    over rows. A row's max and sum run in VEC lanes
    over whole vectors (masked lanes by select), so only a row end past the last whole vector of Skv is scalar; a
    causal row computes its visible keys only and zero-fills the rest."""
    v = VEC
    neg_inf, zero = tir.const(-np.inf, "float32"), tir.const(0.0, "float32")

    @T.prim_func(private=True, s_tir=True)
    def softmax(var_s: T.handle, var_p: T.handle):
        T.func_attr({"tirx.noalias": True})
        z, sq, skv = T.int64(), T.int64(), T.int64()
        s = T.match_buffer(var_s, (z, sq, skv), "float32")
        p = T.match_buffer(var_p, (z, sq, skv), "float32")
        with T.sblock("root"):
            for task in T.parallel(TASKS):
                with T.sblock("task"):  # its registers are private to the task; allocated once per task, not per row
                    T.reads(s[0:z, 0:sq, 0:skv])
                    T.writes(p[0:z, 0:sq, 0:skv])
                    lanes = T.sblock_alloc_buffer((v,), "float32", scope="local")
                    top = T.sblock_alloc_buffer((2,), "float32", scope="local")  # the row's max, then 1 / sum
                    for r in range(task * (z * sq) // TASKS, (task + 1) * (z * sq) // TASKS):
                        b: T.int64 = r // sq
                        i: T.int64 = r % sq
                        n: T.int64 = T.max(T.min(i + (skv - sq) + 1, skv), 0) if causal else skv  # visible: j < n
                        nv: T.int64 = T.min((n + (v - 1)) // v, skv // v)  # whole vectors covering them, in bounds
                        for lane in T.vectorized(v):
                            lanes[lane] = neg_inf
                        for c in range(nv):
                            for lane in T.vectorized(v):
                                lanes[lane] = T.max(
                                    lanes[lane],
                                    T.Select(c * v + lane < n, s[b, i, c * v + lane] * T.float32(scale), neg_inf),
                                )
                        for j in range(n - T.min(nv * v, n)):
                            lanes[0] = T.max(lanes[0], s[b, i, nv * v + j] * T.float32(scale))
                        for half in T.unroll(4):  # a tree over the lanes: 4 dependent steps, not 15
                            for lane in T.vectorized(v // 2):
                                lanes[lane] = T.max(lanes[lane], lanes[lane + T.shift_right(v // 2, half)])
                        top[0] = lanes[0]
                        for lane in T.vectorized(v):
                            lanes[lane] = zero
                        for c in range(nv):
                            for lane in T.vectorized(v):
                                p[b, i, c * v + lane] = T.Select(
                                    c * v + lane < n,
                                    fast_exp_expr(s[b, i, c * v + lane] * T.float32(scale) - top[0]),
                                    zero,
                                )
                                lanes[lane] = lanes[lane] + p[b, i, c * v + lane]
                        for j in range(n - T.min(nv * v, n)):
                            p[b, i, nv * v + j] = fast_exp_expr(s[b, i, nv * v + j] * T.float32(scale) - top[0])
                            lanes[0] = lanes[0] + p[b, i, nv * v + j]
                        for half in T.unroll(4):
                            for lane in T.vectorized(v // 2):
                                lanes[lane] = lanes[lane] + lanes[lane + T.shift_right(v // 2, half)]
                        top[1] = T.float32(1) / lanes[0]
                        for c in range(nv):
                            for lane in T.vectorized(v):
                                p[b, i, c * v + lane] = p[b, i, c * v + lane] * top[1]
                        for j in range(n - T.min(nv * v, n)):
                            p[b, i, nv * v + j] = p[b, i, nv * v + j] * top[1]
                        for c in range(skv // v - nv):  # masked whole vectors, then the masked row end
                            for lane in T.vectorized(v):
                                p[b, i, (nv + c) * v + lane] = zero
                        for j in range(skv - T.max(skv // v * v, n)):
                            p[b, i, T.max(skv // v * v, n) + j] = zero

    return softmax.with_attr(KERNEL_ATTR, "attention_softmax")


SMALL_TOPK = 8  # k up to which top-k is k selection passes over the row, not TVM's sort


def small_topk(n: int, k: int, largest: bool, dtype: str) -> tir.PrimFunc:
    """Top-k of each row of x [rows, n] by k selection passes (O(n k), no sort: MoE routing picks k <= 8 of a few
    hundred experts or groups): values [rows, k] and int32 indices in the reference's order, ties to the lower
    index and NaN first when largest (last when smallest), like numpy's stable argsort and torch."""
    is_float = dtype.startswith("float") or dtype.startswith("bfloat")

    def nan(x: Any) -> Any:
        return tir.isnan(x) if is_float else tir.const(False, "bool")

    def before(a: Any, ai: Any, b: Any, bi: Any) -> Any:
        """Element (a, ai) comes before (b, bi) in the output order."""
        an, bn = nan(a), nan(b)
        better = a > b if largest else a < b
        tie_or_nan = tir.Or(tir.And(an, bn), tir.And(tir.Not(tir.Or(an, bn)), a == b))
        nan_first = an if largest else bn
        one_nan = an.astype("int32") != bn.astype("int32")
        return tir.Select(one_nan, nan_first, tir.Select(tie_or_nan, ai < bi, better))

    @T.prim_func(private=True, s_tir=True)
    def topk(var_x: T.handle, var_v: T.handle, var_i: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, n), dtype)
        val = T.match_buffer(var_v, (rows, k), dtype)
        idx = T.match_buffer(var_i, (rows, k), "int32")
        with T.sblock("root"):
            for r in range(rows):
                with T.sblock("row"):
                    best = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    for t in range(k):
                        best[0] = -1
                        for j in range(n):
                            # candidates come after the previous pick in the output order; keep the first of them
                            if t == 0 or before(x[r, idx[r, t - 1]], idx[r, t - 1], x[r, j], T.int32(j)):
                                if best[0] < 0 or before(x[r, j], T.int32(j), x[r, best[0]], best[0]):
                                    best[0] = T.int32(j)
                        idx[r, t] = best[0]
                        val[r, t] = x[r, best[0]]

    return topk.with_attr(KERNEL_ATTR, "small_topk")
