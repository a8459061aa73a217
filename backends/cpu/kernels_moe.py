"""Hand-written TIR for the expert-fusion ops (ir/ops/moe_fused.py) on the cpu target.

- `permute_route`: the counting sort of the (token, slot) pairs by expert with the capacity limit (serial,
  O(T*K + E) integer work), giving group_offsets, row_of and the token of every row.
- `copy_rows` / `scatter_add_rows` / `unpermute`: row movement between token and row space, as parallel loops
  vectorized along D. The scatter adds (row_of may repeat a row), so its threads split columns, not rows.
- `grouped_gemm`: out[r] = x[r] @ w[i]^T over each group's contiguous rows, weights read in their natural [E, N, K]
  layout (the fused gate+up weight is a concat in the graph, so no packed copy exists): register tiles of
  GEMM_MI rows x GEMM_NJ columns x one vector of K, threads over column blocks within a group.
- `grouped_wgrad`: out[i] = dy[rows]^T x[rows], tiles of GEMM_MI columns of dy x a few vectors of x's columns.

Every kernel checks its index operands (assert: a runtime error, as the reference raises) before using them, and
has symbolic row counts: one build serves every token count. They are marked with KERNEL_ATTR so the default
schedules leave them as written (schedule.HAND_WRITTEN).
"""

from __future__ import annotations

from tvm import tirx as tir
from tvm.script import tirx as T

from r1c.backends.cpu.kernels import KERNEL_ATTR, lanes

GEMM_MI, GEMM_NJ = 4, 4  # 16 vector accumulators + 4 + 4 operand vectors: fits AVX-512's 32 registers
GEMM_CHUNK = 64  # columns per thread task: their weight rows stay in L2 while a group's row tiles pass
GEMM_KBLOCK = 512  # K per block: a row tile's x block (4 x 2 KB) and the chunk's partial sums (16 KB) stay in L1
WGRAD_MI = 4  # dy columns per wgrad tile; x's columns go in up to 4 vectors


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def permute_route(experts: int, k: int, shared: int, capacity_factor: float, id_dtype: str) -> tir.PrimFunc:
    """ids [T, k] -> group_offsets [E+1], row_of [T, k] (-1: dropped), row_token [T*k] (-1: padding row).

    Pairs are visited in (token, slot) order, so each expert's rows are in that order (the reference's stable
    argsort) and its first `cap` pairs are the kept ones. cap is computed in float64 in the reference's order of
    operations, so the cut is the same; shared experts (the last `shared` ids) never drop."""
    routed = experts - shared
    capped = routed if capacity_factor > 0 else 0  # experts below this id keep at most cap pairs

    @T.prim_func(private=True, s_tir=True)
    def route(var_ids: T.handle, var_off: T.handle, var_row_of: T.handle, var_row_token: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (n, k), id_dtype)
        off = T.match_buffer(var_off, (experts + 1,), "int32")
        row_of = T.match_buffer(var_row_of, (n, k), "int32")
        row_token = T.match_buffer(var_row_token, (n * k,), "int32")
        with T.sblock("root"):
            count = T.sblock_alloc_buffer((experts,), "int32")
            fill = T.sblock_alloc_buffer((experts,), "int32")
            for e in range(experts):
                count[e] = 0
            for t, j in T.grid(n, k):
                assert T.Cast("int64", ids[t, j]) >= T.int64(0) and T.Cast("int64", ids[t, j]) < T.int64(experts), (
                    "moe_permute: expert id out of range"
                )
                count[ids[t, j]] = count[ids[t, j]] + 1
            cap = T.Cast(
                "int64",
                T.ceil(
                    T.float64(capacity_factor)
                    * T.Cast("float64", n)
                    * T.float64(k - shared)
                    / T.float64(max(routed, 1))
                ),
            )
            off[0] = 0
            for e in range(experts):
                off[e + 1] = off[e] + T.if_then_else(
                    e < capped, T.Cast("int32", T.min(T.Cast("int64", count[e]), cap)), count[e]
                )
                fill[e] = off[e]
            for t, j in T.grid(n, k):
                if fill[ids[t, j]] < off[ids[t, j] + 1]:
                    row_of[t, j] = fill[ids[t, j]]
                    row_token[fill[ids[t, j]]] = T.Cast("int32", t)
                    fill[ids[t, j]] = fill[ids[t, j]] + 1
                else:
                    row_of[t, j] = -1
            for r in range(T.Cast("int64", off[experts]), n * k):
                row_token[r] = -1

    return route.with_attr(KERNEL_ATTR, "moe_permute")


def copy_rows(d: int, dtype: str, idx_dtype: str) -> tir.PrimFunc:
    """out[r] = src[idx[r]], 0 where idx[r] is -1: the tokens' rows of moe_permute (idx: row_token) and
    moe_gather_rows (idx: row_of, flattened)."""
    vl = lanes(d)

    @T.prim_func(private=True, s_tir=True)
    def gather(var_src: T.handle, var_idx: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        rows = T.int64()
        src = T.match_buffer(var_src, (m, d), dtype)
        idx = T.match_buffer(var_idx, (rows,), idx_dtype)
        out = T.match_buffer(var_out, (rows, d), dtype)
        with T.sblock("root"):
            for r in range(rows):
                assert T.Cast("int64", idx[r]) >= T.int64(-1) and T.Cast("int64", idx[r]) < m, (
                    "moe_gather_rows: row_of out of range"
                )
            for r in T.parallel(rows):
                for c in range(d // vl):
                    for lane in T.vectorized(vl):
                        out[r, c * vl + lane] = T.if_then_else(
                            idx[r] >= 0,
                            src[T.max(T.Cast("int64", idx[r]), T.int64(0)), c * vl + lane],
                            T.Cast(dtype, 0),
                        )

    return gather.with_attr(KERNEL_ATTR, "moe_rows")


def scatter_add_rows(d: int, idx_dtype: str) -> tir.PrimFunc:
    """out [R, d] = 0; out[idx[q]] += src[q] for idx[q] >= 0 (moe_scatter_rows; R = the number of pairs). A row
    may be named twice, so threads split the columns: every thread owns its columns of every row."""
    vl = lanes(d)

    @T.prim_func(private=True, s_tir=True)
    def scatter(var_src: T.handle, var_idx: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        src = T.match_buffer(var_src, (rows, d), "float32")
        idx = T.match_buffer(var_idx, (rows,), idx_dtype)
        out = T.match_buffer(var_out, (rows, d), "float32")
        with T.sblock("root"):
            for r in range(rows):
                assert T.Cast("int64", idx[r]) >= T.int64(-1) and T.Cast("int64", idx[r]) < rows, (
                    "moe_scatter_rows: row_of out of range"
                )
            for c in T.parallel(d // vl):
                for r in range(rows):
                    for lane in T.vectorized(vl):
                        out[r, c * vl + lane] = T.float32(0)
                for q in range(rows):
                    if idx[q] >= 0:
                        for lane in T.vectorized(vl):
                            out[idx[q], c * vl + lane] = out[idx[q], c * vl + lane] + src[q, c * vl + lane]

    return scatter.with_attr(KERNEL_ATTR, "moe_rows")


def unpermute(d: int, k: int, idx_dtype: str) -> tir.PrimFunc:
    """out[t] = sum_j w[t, j] * y[row_of[t, j]], pairs with row_of -1 skipped: threads over tokens."""
    vl = lanes(d)

    @T.prim_func(private=True, s_tir=True)
    def combine(var_y: T.handle, var_row_of: T.handle, var_w: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        n = T.int64()
        y = T.match_buffer(var_y, (rows, d), "float32")
        row_of = T.match_buffer(var_row_of, (n, k), idx_dtype)
        w = T.match_buffer(var_w, (n, k), "float32")
        out = T.match_buffer(var_out, (n, d), "float32")
        with T.sblock("root"):
            for t, j in T.grid(n, k):
                assert T.Cast("int64", row_of[t, j]) >= T.int64(-1) and T.Cast("int64", row_of[t, j]) < rows, (
                    "moe_unpermute: row_of out of range"
                )
            for t in T.parallel(n):
                for c in range(d // vl):
                    for lane in T.vectorized(vl):
                        out[t, c * vl + lane] = T.float32(0)
                for j in range(k):
                    if row_of[t, j] >= 0:
                        for c in range(d // vl):
                            for lane in T.vectorized(vl):
                                out[t, c * vl + lane] = out[t, c * vl + lane] + w[t, j] * y[row_of[t, j], c * vl + lane]

    return combine.with_attr(KERNEL_ATTR, "moe_rows")


def _offsets_asserts(n_off: int, name: str):  # noqa: ANN202 (a TVMScript macro)
    bounds, order = f"{name}: group_offsets out of [0, rows]", f"{name}: group_offsets must be non-decreasing"

    @T.macro
    def check(off: T.Buffer, rows: T.int64) -> None:
        assert T.Cast("int64", off[0]) >= T.int64(0) and T.Cast("int64", off[n_off - 1]) <= rows, bounds
        for g in range(n_off - 1):
            assert off[g] <= off[g + 1], order

    return check


def grouped_gemm(groups: int, first: int, n: int, kdim: int, n_off: int, off_dtype: str) -> tir.PrimFunc:
    """y [R, n]: rows of group first+i (i < groups) times w[i]^T, w [groups, n, kdim] as stored; every other row 0.

    The dot-product form: each GEMM_MI x GEMM_NJ tile keeps one vector of partial sums along K per output, so
    weights are read in rows (no packing, no gathers) and summed across lanes once per tile. Groups run one after
    the other; threads split a group's columns in chunks of GEMM_CHUNK. Within a chunk, row tiles are outermost:
    a tile's rows (4 x K) stay in L1 while the chunk's weight rows (GEMM_CHUNK x K: 512 KB at K=2048) stream from
    L2, and from memory only once per group (measured 1.7x over column blocks outermost, which re-read x from L2)."""
    mi, nj, vl = GEMM_MI, GEMM_NJ, lanes(kdim)
    cw = min(GEMM_CHUNK, _ceil_div(n, nj) * nj)
    chunks, kc, vn = _ceil_div(n, cw), kdim // vl, lanes(n)
    kg = max(g for g in range(1, kc + 1) if kc % g == 0 and g * vl <= GEMM_KBLOCK)  # vectors of K per block
    check = _offsets_asserts(n_off, "grouped_matmul")

    @T.prim_func(private=True, s_tir=True)
    def gemm(var_x: T.handle, var_w: T.handle, var_off: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, kdim), "float32")
        w = T.match_buffer(var_w, (groups, n, kdim), "float32")
        off = T.match_buffer(var_off, (n_off,), off_dtype)
        y = T.match_buffer(var_y, (rows, n), "float32")
        with T.sblock("root"):
            check(off, rows)
            for r in T.parallel(rows):  # rows of no group here (padding, other dispatches) are 0
                if r < T.Cast("int64", off[first]) or r >= T.Cast("int64", off[first + groups]):
                    for c in range(n // vn):
                        for lane in T.vectorized(vn):
                            y[r, c * vn + lane] = T.float32(0)
            for i in range(groups):
                lo = T.Cast("int64", off[first + i])
                hi = T.Cast("int64", off[first + i + 1])
                if lo < hi:
                    for jc in T.parallel(chunks):
                        for io in range((hi - lo + (mi - 1)) // mi):
                            with T.sblock("rows"):  # the chunk's partial sums for one row tile, in L1
                                part = T.sblock_alloc_buffer((cw // nj, mi, nj, vl), "float32", scope="local")
                                for jb, ii, jj in T.grid(cw // nj, mi, nj):
                                    for lane in T.vectorized(vl):
                                        part[jb, ii, jj, lane] = T.float32(0)
                                for kb in range(kc // kg):
                                    for jb in range(cw // nj):
                                        if jc * cw + jb * nj < n:
                                            with T.sblock("tile"):  # opaque: its registers are its own
                                                acc = T.sblock_alloc_buffer((mi, nj, vl), "float32", scope="local")
                                                for ii in T.unroll(mi):
                                                    for jj in T.unroll(nj):
                                                        for lane in T.vectorized(vl):
                                                            acc[ii, jj, lane] = part[jb, ii, jj, lane]
                                                for kk in range(kg):
                                                    for ii in T.unroll(mi):
                                                        for jj in T.unroll(nj):
                                                            for lane in T.vectorized(vl):
                                                                acc[ii, jj, lane] = (
                                                                    acc[ii, jj, lane]
                                                                    + x[
                                                                        T.min(lo + io * mi + ii, hi - 1),
                                                                        (kb * kg + kk) * vl + lane,
                                                                    ]
                                                                    * w[
                                                                        i,
                                                                        T.min(jc * cw + jb * nj + jj, n - 1),
                                                                        (kb * kg + kk) * vl + lane,
                                                                    ]
                                                                )
                                                for ii in T.unroll(mi):
                                                    for jj in T.unroll(nj):
                                                        for lane in T.vectorized(vl):
                                                            part[jb, ii, jj, lane] = acc[ii, jj, lane]
                                for jb, ii, jj in T.grid(cw // nj, mi, nj):
                                    if lo + io * mi + ii < hi and jc * cw + jb * nj + jj < n:
                                        y[lo + io * mi + ii, jc * cw + jb * nj + jj] = T.float32(0)
                                        for lane in range(vl):
                                            y[lo + io * mi + ii, jc * cw + jb * nj + jj] = (
                                                y[lo + io * mi + ii, jc * cw + jb * nj + jj] + part[jb, ii, jj, lane]
                                            )

    return gemm.with_attr(KERNEL_ATTR, "moe_gemm")


def grouped_wgrad(groups: int, first: int, n: int, d: int, n_off: int, off_dtype: str) -> tir.PrimFunc:
    """out [groups, n, d]: out[i] = dy[rows of group first+i]^T @ x[those rows] (0 for an empty group). Tiles of
    WGRAD_MI columns of dy (broadcast) x up to 4 vectors of x's columns, summed over the group's rows; threads
    over dy's column blocks."""
    mi, vl = WGRAD_MI, lanes(d)
    nv = next(v for v in (4, 2, 1) if (d // vl) % v == 0)
    pd, nb = vl * nv, _ceil_div(n, mi)
    check = _offsets_asserts(n_off, "grouped_matmul_wgrad")

    @T.prim_func(private=True, s_tir=True)
    def wgrad(var_dy: T.handle, var_x: T.handle, var_off: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        dy = T.match_buffer(var_dy, (rows, n), "float32")
        x = T.match_buffer(var_x, (rows, d), "float32")
        off = T.match_buffer(var_off, (n_off,), off_dtype)
        out = T.match_buffer(var_out, (groups, n, d), "float32")
        with T.sblock("root"):
            check(off, rows)
            for i in range(groups):
                for jb in T.parallel(nb):
                    for dc in range(d // pd):
                        with T.sblock("tile"):
                            acc = T.sblock_alloc_buffer((mi, pd), "float32", scope="local")
                            for ii in T.unroll(mi):
                                for v in T.unroll(nv):
                                    for lane in T.vectorized(vl):
                                        acc[ii, v * vl + lane] = T.float32(0)
                            for r in range(T.Cast("int64", off[first + i]), T.Cast("int64", off[first + i + 1])):
                                for ii in T.unroll(mi):
                                    for v in T.unroll(nv):
                                        for lane in T.vectorized(vl):
                                            acc[ii, v * vl + lane] = (
                                                acc[ii, v * vl + lane]
                                                + dy[r, T.min(jb * mi + ii, n - 1)] * x[r, dc * pd + v * vl + lane]
                                            )
                            for ii in T.unroll(mi):
                                if jb * mi + ii < n:
                                    for v in T.unroll(nv):
                                        for lane in T.vectorized(vl):
                                            out[i, jb * mi + ii, dc * pd + v * vl + lane] = acc[ii, v * vl + lane]

    return wgrad.with_attr(KERNEL_ATTR, "moe_wgrad")
