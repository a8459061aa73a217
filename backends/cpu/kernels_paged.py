"""Kernels of the paged MLA latent cache (ir/ops/paged.py) on the cpu target, hand-written TIR.

- `paged_write` / `paged_write_q`: the step's tokens go to their (page, slot) in layer `layer` of the pool, token
  by token in (row, step) order, as the reference (a slot two tokens name keeps the later one); `_q` quantizes
  each token per group of D / G channels first, with quantize_ref's rounding (kernels_cache.quant_code). In place
  (the pool is the kernel's own output: relax.call_tir_inplace) or into a copy of the pool, made in parallel
  over pages first.
- `paged_latent_attention`: the inner MQA of absorbed MLA over a row's pages: q [B, H, S, D] (q_nope already
  through W_UK, then q_rot) against keys [latent | k_rot] = the pool's D channels, values = its first C; latent
  output [B, H, S, C] in float32. Work items are (b, s, group of heads) in a parallel loop of TASKS tasks (their
  buffers allocated once a task), each over its keys 0 .. start[b] + s in blocks of KB: a key's page comes from
  the block table through a (page, slot) cursor (no division per key), the block's keys are staged (decoded and
  scaled when quantized) once for the group's heads (MLA's keys are every head's), the scores are dot products in
  vector lanes, and the online softmax exponentiates a block in KB lanes with TVM's fast_exp polynomial.

Every kernel checks the rows first, as the reference: start >= 0, the positions 0 .. start + S - 1 fit in the
block table, and each page they name is one of the pool's (a runtime error otherwise).
"""

from __future__ import annotations

from tvm import tirx as tir
from tvm.script import tirx as T

from r1c.backends.cpu.kernels import KERNEL_ATTR, TASKS, lanes
from r1c.backends.cpu.kernels import fast_exp_expr as fast_exp
from r1c.backends.cpu.kernels_cache import KB, NEG_INF, decode, quant_code

WRITE, ATTENTION = "paged_write", "paged_attention"  # kernel kinds (schedule.HAND_WRITTEN leaves them as written)
HEAD_GROUP = 8  # heads per attention task at most: their query rows, states and accumulators stay in L1


@T.macro
def _check_rows(table: T.Buffer, start: T.Buffer, nb: T.int64, steps: T.int64, pages: T.int64, page: T.int64,
                width: T.int64) -> None:  # fmt: skip
    for b in range(nb):
        assert T.Cast("int64", start[b]) >= T.int64(0), "paged cache: a row has a negative start"
        assert (T.Cast("int64", start[b]) + steps + page - 1) // page <= width, (
            "paged cache: a row's positions reach past its block table"
        )
        for pg in range((T.Cast("int64", start[b]) + steps + page - 1) // page):
            assert table[b, pg] >= 0 and T.Cast("int64", table[b, pg]) < pages, (
                "paged cache: a row's block table names a page outside the pool"
            )


def paged_write(layer: int, d: int, dtype: str, idx: str, in_place: bool) -> tir.PrimFunc:
    """pool [L, P, T, d] with new [B, S, d] at row b's positions start[b] .. start[b] + S - 1 of `layer`: written
    into the pool itself (in_place: arguments pool, new, table, start) or into out, a copy of the pool."""
    vl = lanes(d)

    @T.macro
    def write(dst: T.Buffer, new: T.Buffer, table: T.Buffer, start: T.Buffer, nb: T.int64, steps: T.int64,
              page: T.int64) -> None:  # fmt: skip
        for r in range(nb * steps):  # serial, in the reference's order: a tiny copy per token
            pos: T.int64 = T.Cast("int64", start[r // steps]) + r % steps
            pg: T.int64 = T.Cast("int64", table[r // steps, pos // page])
            for e in range(d // vl):
                for lane in T.vectorized(vl):
                    dst[layer, pg, pos % page, e * vl + lane] = new[r // steps, r % steps, e * vl + lane]

    if in_place:

        @T.prim_func(private=True, s_tir=True)
        def inplace(var_pool: T.handle, var_new: T.handle, var_table: T.handle, var_start: T.handle):
            T.func_attr({"tirx.noalias": True})
            nl, pages, page, nb, steps, width = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            pool = T.match_buffer(var_pool, (nl, pages, page, d), dtype)
            new = T.match_buffer(var_new, (nb, steps, d), dtype)
            table = T.match_buffer(var_table, (nb, width), idx)
            start = T.match_buffer(var_start, (nb,), idx)
            with T.sblock("root"):
                _check_rows(table, start, nb, steps, pages, page, width)
                write(pool, new, table, start, nb, steps, page)

        return inplace.with_attr(KERNEL_ATTR, WRITE)

    @T.prim_func(private=True, s_tir=True)
    def copy(var_pool: T.handle, var_new: T.handle, var_table: T.handle, var_start: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        nl, pages, page, nb, steps, width = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pool = T.match_buffer(var_pool, (nl, pages, page, d), dtype)
        new = T.match_buffer(var_new, (nb, steps, d), dtype)
        table = T.match_buffer(var_table, (nb, width), idx)
        start = T.match_buffer(var_start, (nb,), idx)
        out = T.match_buffer(var_out, (nl, pages, page, d), dtype)
        with T.sblock("root"):
            _check_rows(table, start, nb, steps, pages, page, width)
            for p in T.parallel(nl * pages):
                for t in range(page):
                    for e in range(d // vl):
                        for lane in T.vectorized(vl):
                            out[p // pages, p % pages, t, e * vl + lane] = pool[p // pages, p % pages, t, e * vl + lane]
            write(out, new, table, start, nb, steps, page)

    return copy.with_attr(KERNEL_ATTR, WRITE)


def paged_write_q(layer: int, d: int, groups: int, code: str, top: float, idx: str, in_place: bool) -> tir.PrimFunc:
    """paged_write into codes [L, P, T, d] and scales [L, P, T, groups]: each token of new [B, S, d] (float32)
    quantized per group of d / groups channels, scale = f32(amax / top) (NaN when the group has a NaN, as np.max),
    codes by quant_code. In place (arguments codes, scales, new, table, start) or into copies (two more)."""
    gs = d // groups
    vl = lanes(gs)

    @T.macro
    def write(codes: T.Buffer, scales: T.Buffer, new: T.Buffer, table: T.Buffer, start: T.Buffer, nb: T.int64,
              steps: T.int64, page: T.int64) -> None:  # fmt: skip
        amax = T.sblock_alloc_buffer((1,), "float32", scope="local")
        for r in range(nb * steps):
            pos: T.int64 = T.Cast("int64", start[r // steps]) + r % steps
            pg: T.int64 = T.Cast("int64", table[r // steps, pos // page])
            for g in range(groups):
                amax[0] = T.float32(0)
                for c in range(gs):
                    amax[0] = T.Select(
                        T.isnan(amax[0]) or amax[0] > T.abs(new[r // steps, r % steps, g * gs + c]),
                        amax[0],
                        T.abs(new[r // steps, r % steps, g * gs + c]),
                    )
                scales[layer, pg, pos % page, g] = T.Cast("float32", T.Cast("float64", amax[0]) / T.float64(top))
                for e in range(gs // vl):
                    for lane in T.vectorized(vl):
                        codes[layer, pg, pos % page, g * gs + e * vl + lane] = quant_code(
                            new[r // steps, r % steps, g * gs + e * vl + lane],
                            scales[layer, pg, pos % page, g],
                            code,
                            top,
                        )

    if in_place:

        @T.prim_func(private=True, s_tir=True)
        def inplace(var_codes: T.handle, var_scales: T.handle, var_new: T.handle, var_table: T.handle,
                    var_start: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            nl, pages, page, nb, steps, width = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            codes = T.match_buffer(var_codes, (nl, pages, page, d), code)
            scales = T.match_buffer(var_scales, (nl, pages, page, groups), "float32")
            new = T.match_buffer(var_new, (nb, steps, d), "float32")
            table = T.match_buffer(var_table, (nb, width), idx)
            start = T.match_buffer(var_start, (nb,), idx)
            with T.sblock("root"):
                _check_rows(table, start, nb, steps, pages, page, width)
                write(codes, scales, new, table, start, nb, steps, page)

        return inplace.with_attr(KERNEL_ATTR, WRITE)

    @T.prim_func(private=True, s_tir=True)
    def copy(var_codes: T.handle, var_scales: T.handle, var_new: T.handle, var_table: T.handle, var_start: T.handle,
             var_codes_out: T.handle, var_scales_out: T.handle):  # fmt: skip
        T.func_attr({"tirx.noalias": True})
        nl, pages, page, nb, steps, width = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        codes = T.match_buffer(var_codes, (nl, pages, page, d), code)
        scales = T.match_buffer(var_scales, (nl, pages, page, groups), "float32")
        new = T.match_buffer(var_new, (nb, steps, d), "float32")
        table = T.match_buffer(var_table, (nb, width), idx)
        start = T.match_buffer(var_start, (nb,), idx)
        codes_out = T.match_buffer(var_codes_out, (nl, pages, page, d), code)
        scales_out = T.match_buffer(var_scales_out, (nl, pages, page, groups), "float32")
        with T.sblock("root"):
            _check_rows(table, start, nb, steps, pages, page, width)
            for p in T.parallel(nl * pages):
                for t in range(page):
                    for c in range(d):
                        codes_out[p // pages, p % pages, t, c] = codes[p // pages, p % pages, t, c]
                    for g in range(groups):
                        scales_out[p // pages, p % pages, t, g] = scales[p // pages, p % pages, t, g]
            write(codes_out, scales_out, new, table, start, nb, steps, page)

    return copy.with_attr(KERNEL_ATTR, WRITE)


def head_group(heads: int) -> int:
    """Heads per task of the attention kernel: they share each staged key block. At most HEAD_GROUP, and at most
    half the heads, so one query row (a decode step at batch 1) still makes two tasks."""
    return max(g for g in range(1, min(HEAD_GROUP, max(heads // 2, 1)) + 1) if heads % g == 0)


def paged_latent_attention(layer: int, heads: int, rank: int, d: int, scale: float, code: str, groups: int,
                           idx: str) -> tir.PrimFunc:  # fmt: skip
    """q [B, heads, S, d] f32 (latent-space query | rotary query), pool [L, P, T, d] of dtype `code` (float, or int8
    / fp8 codes with scales [L, P, T, groups] when groups > 0), block_table, start -> out [B, heads, S, rank] f32:
    query (b, h, s) at position start[b] + s attends to the row's positions 0 .. start[b] + s. A task runs the
    head_group(heads) heads of one query: a key block is staged once for all of them (MLA's keys are shared by
    every head)."""
    quant = groups > 0
    gs = d // max(groups, 1)
    vs, vd, vr = lanes(gs), lanes(d), lanes(rank)  # lanes of the staging (per group), of the dot, of the values
    hg = head_group(heads)
    ng = heads // hg

    @T.macro
    def attend(q: T.Buffer, pool: T.Buffer, scales: T.Buffer, table: T.Buffer, start: T.Buffer, out: T.Buffer,
               nb: T.int64, sq: T.int64, page: T.int64) -> None:  # fmt: skip
        for task in T.parallel(TASKS):
            with T.sblock("task"):  # its buffers are private to the task; allocated once per task, not per row
                T.reads(q[0:nb, 0:heads, 0:sq, 0:d])
                T.writes(out[0:nb, 0:heads, 0:sq, 0:rank])
                qr = T.sblock_alloc_buffer((hg * d,), "float32", scope="local")
                kv = T.sblock_alloc_buffer((KB * d,), "float32", scope="local")  # the block's keys
                part = T.sblock_alloc_buffer((vd,), "float32", scope="local")
                sc = T.sblock_alloc_buffer((KB,), "float32", scope="local")
                st = T.sblock_alloc_buffer((hg * 4,), "float32", scope="local")  # per head: max, sum, new max, rescale
                acc = T.sblock_alloc_buffer((hg * rank,), "float32", scope="local")
                cur = T.sblock_alloc_buffer((2,), "int64", scope="local")  # the next key's block-table index, slot
                for r in range(task * (nb * sq * ng) // TASKS, (task + 1) * (nb * sq * ng) // TASKS):
                    b: T.int64 = r // (sq * ng)
                    i: T.int64 = r // ng % sq
                    h0: T.int64 = r % ng * hg
                    n: T.int64 = T.Cast("int64", start[b]) + i + 1  # keys 0 .. n - 1 are visible
                    for hh, c in T.grid(hg, d):
                        qr[hh * d + c] = q[b, h0 + hh, i, c] * T.float32(scale)
                    for hh in range(hg):
                        st[hh * 4] = NEG_INF
                        st[hh * 4 + 1] = T.float32(0)
                    for e in range(hg * rank // vr):
                        for lane in T.vectorized(vr):
                            acc[e * vr + lane] = T.float32(0)
                    cur[0] = T.int64(0)
                    cur[1] = T.int64(0)
                    for jb in range((n + (KB - 1)) // KB):
                        for jj in range(T.min(KB, n - jb * KB)):  # stage the block's keys, decoded and scaled
                            pg: T.int64 = T.Cast("int64", table[b, cur[0]])
                            for g in range(max(groups, 1)):
                                for e in range(gs // vs):
                                    for lane in T.vectorized(vs):
                                        if quant:
                                            kv[jj * d + g * gs + e * vs + lane] = (
                                                decode(pool[layer, pg, cur[1], g * gs + e * vs + lane], code)
                                                * scales[layer, pg, cur[1], g]
                                            )
                                        else:
                                            kv[jj * d + e * vs + lane] = T.Cast(
                                                "float32", pool[layer, pg, cur[1], e * vs + lane]
                                            )
                            cur[1] = cur[1] + 1
                            if cur[1] == page:
                                cur[0] = cur[0] + 1
                                cur[1] = T.int64(0)
                        for hh in range(hg):
                            for jj in range(KB):
                                if jb * KB + jj < n:
                                    for lane in T.vectorized(vd):
                                        part[lane] = T.float32(0)
                                    for e in range(d // vd):
                                        for lane in T.vectorized(vd):
                                            part[lane] = (
                                                part[lane] + qr[hh * d + e * vd + lane] * kv[jj * d + e * vd + lane]
                                            )
                                    sc[jj] = T.float32(0)
                                    for lane in range(vd):
                                        sc[jj] = sc[jj] + part[lane]
                                else:
                                    sc[jj] = NEG_INF
                            # online softmax: the block's weights against the head's new running max, in KB lanes
                            st[hh * 4 + 2] = st[hh * 4]
                            for jj in range(KB):
                                st[hh * 4 + 2] = T.max(st[hh * 4 + 2], sc[jj])
                            st[hh * 4 + 3] = T.Select(
                                st[hh * 4] > NEG_INF, fast_exp(st[hh * 4] - st[hh * 4 + 2]), T.float32(0)
                            )
                            for lane in T.vectorized(KB):
                                sc[lane] = T.Select(
                                    sc[lane] > NEG_INF, fast_exp(sc[lane] - st[hh * 4 + 2]), T.float32(0)
                                )
                            st[hh * 4 + 1] = st[hh * 4 + 1] * st[hh * 4 + 3]
                            for jj in range(KB):
                                st[hh * 4 + 1] = st[hh * 4 + 1] + sc[jj]
                            st[hh * 4] = st[hh * 4 + 2]
                            for e in range(rank // vr):
                                for lane in T.vectorized(vr):
                                    acc[hh * rank + e * vr + lane] = acc[hh * rank + e * vr + lane] * st[hh * 4 + 3]
                            for jj in range(T.min(KB, n - jb * KB)):
                                for e in range(rank // vr):
                                    for lane in T.vectorized(vr):
                                        acc[hh * rank + e * vr + lane] = (
                                            acc[hh * rank + e * vr + lane] + sc[jj] * kv[jj * d + e * vr + lane]
                                        )
                    for hh, c in T.grid(hg, rank):
                        out[b, h0 + hh, i, c] = acc[hh * rank + c] / st[hh * 4 + 1]  # n >= 1: the sum is >= 1

    if quant:

        @T.prim_func(private=True, s_tir=True)
        def attention_q(var_q: T.handle, var_pool: T.handle, var_scales: T.handle, var_table: T.handle,
                        var_start: T.handle, var_out: T.handle):  # fmt: skip
            T.func_attr({"tirx.noalias": True})
            nl, pages, page, width = T.int64(), T.int64(), T.int64(), T.int64()
            nb, sq = T.int64(), T.int64()
            q = T.match_buffer(var_q, (nb, heads, sq, d), "float32")
            pool = T.match_buffer(var_pool, (nl, pages, page, d), code)
            scales = T.match_buffer(var_scales, (nl, pages, page, groups), "float32")
            table = T.match_buffer(var_table, (nb, width), idx)
            start = T.match_buffer(var_start, (nb,), idx)
            out = T.match_buffer(var_out, (nb, heads, sq, rank), "float32")
            with T.sblock("root"):
                _check_rows(table, start, nb, sq, pages, page, width)
                attend(q, pool, scales, table, start, out, nb, sq, page)

        return attention_q.with_attr(KERNEL_ATTR, ATTENTION)

    @T.prim_func(private=True, s_tir=True)
    def attention(var_q: T.handle, var_pool: T.handle, var_table: T.handle, var_start: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        nl, pages, page, width = T.int64(), T.int64(), T.int64(), T.int64()
        nb, sq = T.int64(), T.int64()
        q = T.match_buffer(var_q, (nb, heads, sq, d), "float32")
        pool = T.match_buffer(var_pool, (nl, pages, page, d), code)
        table = T.match_buffer(var_table, (nb, width), idx)
        start = T.match_buffer(var_start, (nb,), idx)
        out = T.match_buffer(var_out, (nb, heads, sq, rank), "float32")
        with T.sblock("root"):
            _check_rows(table, start, nb, sq, pages, page, width)
            attend(q, pool, pool, table, start, out, nb, sq, page)  # no scales: the float branch never reads them

    return attention.with_attr(KERNEL_ATTR, ATTENTION)
