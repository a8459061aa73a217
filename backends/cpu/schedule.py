"""Default schedules for the cpu target: what every PrimFunc the tuning database does not cover gets.

- The GEMM kernels of kernels.py (blocks r1c_acc/r1c_out): MI x panel register tiles, vectorized over the panel,
  rows unrolled, threads over column panels (and the batch).
- Reductions and GEMVs: TVM's dlight CPU rules.
- Everything else: the outermost data-parallel loops of each loop nest run on the threads, when the nest is
  large enough to pay for the fork.
A function a schedule primitive rejects keeps TVM's plain loops for that nest: slower, never different.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir
from tvm import tirx as tir
from tvm.s_tir import dlight as dl

from r1c.backends.cpu.kernels import ACC_BLOCK, KERNEL_ATTR, MI, OUT_BLOCK, PAD_BLOCK, PANEL, VEC

PARALLEL_MIN = 4096  # iterations of a loop nest below which threads cost more than they save
SYMBOLIC_GUESS = 64  # a symbolic extent counts as this (a sequence or batch of modest size)
SMALL_WORK = 32768  # iterations in all below which a function runs on one thread
GEMM_PARALLEL_MIN = 1 << 18  # multiply-adds below which a GEMM runs on one thread (~5 us: a fork costs ~2 us)
SCHEDULED = "tir.is_scheduled"
HAND_WRITTEN = (  # TIR that comes scheduled as written
    *("moe_route", "grouped_matmul", "attention_softmax", "small_topk"),  # kernels.py
    *("moe_permute", "moe_rows", "moe_gemm", "moe_wgrad"),  # kernels_moe.py
    *("attention_block_map", "dsa_mask", "dsa_block_map", "flash_attention"),  # kernels_attention.py
    *("cache_write", "kv_attention"),  # kernels_cache.py
    *("paged_write", "paged_attention"),  # kernels_paged.py
)


def schedule_gemm(func: tir.PrimFunc) -> tir.PrimFunc:
    """MI x panel accumulators in registers over the whole K loop; threads over (batch, column panel, row tile),
    row tiles innermost so the tiles a thread runs share their weight panel (a panel is read from memory once);
    a GEMM too small to pay for the fork stays on one thread."""
    s = s_tir.Schedule(func)
    out, acc = s.get_sblock(OUT_BLOCK), s.get_sblock(ACC_BLOCK)
    *batch, i, j = s.get_loops(out)
    macs = _iterations(s, [*batch, i, j]) * _iterations(s, s.get_loops(acc)[-1:])
    p = _panel(s, acc)
    io, ii = s.split(i, [None, MI])
    jo, ji = s.split(j, [None, p])
    s.reorder(*batch, jo, io, ii, ji)
    # Row tiles join the threaded loop only when their count is static: fused with a symbolic extent, the index
    # math divides by it and the accumulator is no longer compacted to one register tile.
    static_rows = isinstance(s.get(io).extent, tir.IntImm)
    tasks = s.fuse(*batch, jo, io) if static_rows else s.fuse(*batch, jo) if batch else jo
    if macs >= GEMM_PARALLEL_MIN:
        s.parallel(tasks)
    s.compute_at(acc, tasks if static_rows else io)
    s.set_scope(acc, 0, "local")
    *_, ci, cj, ck = s.get_loops(acc)
    s.reorder(ck, ci, cj)
    lanes_outer, lanes = s.split(cj, [None, min(VEC, p)])
    s.vectorize(lanes)
    s.unroll(lanes_outer)
    s.unroll(ci)
    s.decompose_reduction(acc, ck)
    try:  # batched_matmul's zero-padded copy of b: one vectorized pass, threaded with the GEMM when that is
        pad = s.get_sblock(PAD_BLOCK)
    except s_tir.ScheduleError:
        return s.mod["main"].with_attr(SCHEDULED, True)
    *rows, inner = s.get_loops(pad)
    _, lanes = s.split(inner, [None, min(VEC, p)])
    s.vectorize(lanes)
    if macs >= GEMM_PARALLEL_MIN:
        s.parallel(s.fuse(*rows))
    return s.mod["main"].with_attr(SCHEDULED, True)


def _panel(s: s_tir.Schedule, acc: Any) -> int:
    """The column tile: the packed panel width, read off the acc block's extent along j (a multiple of it)."""
    extent = s.get(s.get_loops(acc)[-2]).extent
    return PANEL if isinstance(extent, tir.IntImm) and int(extent) % PANEL == 0 else VEC


def _spatial(s: s_tir.Schedule, block: Any) -> bool:
    return all(iv.iter_type == tir.IterVar.DataPar for iv in s.get(block).iter_vars)


def inline_injective(s: s_tir.Schedule) -> None:
    """Fold every producer nest of an all-data-parallel function into its consumers: one loop nest instead of one
    per op, with no intermediate buffers (each was its own parallel region and a round trip through memory; the
    reshape index chains that inlining leaves are folded by TVM's simplifier once loop bounds are known)."""
    blocks = s.get_child_blocks(s.get_sblock("root"))
    if not all(_spatial(s, b) for b in blocks):
        return
    for block in blocks[:-1]:
        if _inlining_blows_up(s, block):
            continue
        try:
            s.compute_inline(block)
        except s_tir.ScheduleError:  # e.g. a block that writes an output buffer: stays its own nest
            pass


INLINE_TEXT_MAX = 8000  # characters of expression text an inlined producer may add to one consumer


def _inlining_blows_up(s: s_tir.Schedule, block: Any) -> bool:
    """Inlining copies the producer's expression into every read of it: fast_exp reads its argument ten times, so a
    chain such as sigmoid(exp(x)) inlined whole grows by 10x per exp (a small elementwise test took 90 s to build).
    A producer that is large and read several times by a consumer stays its own nest."""
    producer = s.get(block)
    size = len(str(getattr(producer.body, "value", producer.body)))  # the expression it stores
    name = producer.writes[0].source.name + "["  # the buffer it writes, as the consumers' text reads it
    for consumer in s.get_consumers(block):
        reads = str(s.get(consumer).body).count(name)
        if reads > 1 and size * reads > INLINE_TEXT_MAX:
            return True
    return False


def schedule_rows(func: tir.PrimFunc) -> tir.PrimFunc | None:
    """Row-wise functions (softmax, norms: reductions over the last axis and elementwise work around them): one
    parallel loop over the rows of the output, every other block computed inside it on row-sized buffers that stay
    in L1, vectorized where their inner extent allows. None when the function does not have that shape."""
    s = s_tir.Schedule(func)
    if not _has_root(s):
        return None
    blocks = s.get_child_blocks(s.get_sblock("root"))
    if len(blocks) < 2 or all(_spatial(s, b) for b in blocks) or not _spatial(s, blocks[-1]):
        return None
    try:
        for block in blocks[:-1]:  # elementwise producers of a single consumer fold into it
            if _spatial(s, block) and len(s.get_consumers(block)) == 1 and not _inlining_blows_up(s, block):
                try:
                    s.compute_inline(block)
                except s_tir.ScheduleError:
                    pass
        blocks = s.get_child_blocks(s.get_sblock("root"))
        loops = s.get_loops(blocks[-1])
        if len(loops) < 2:
            return None
        row = s.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks[:-1]):
            s.compute_at(block, row, preserve_unit_loops=False)
        for block in s.get_child_blocks(row):  # each on row-sized data now: its inner loop in vector lanes
            if _spatial(s, block):
                _vectorize_last(s, block)
        if _iterations(s, [row]) * 16 >= PARALLEL_MIN:
            s.parallel(row)
    except s_tir.ScheduleError:
        return None
    return s.mod["main"].with_attr(SCHEDULED, True)


def parallelize(func: tir.PrimFunc) -> tir.PrimFunc:
    """Each loop nest (after folding the producers of an elementwise chain into its last op): its innermost loop
    vectorized where it can be, its other leading data-parallel loops fused into one loop that runs on the
    threads."""
    s = s_tir.Schedule(func)
    if _has_root(s):
        inline_injective(s)
    for block in s.get_child_blocks(s.get_sblock("root")) if _has_root(s) else []:  # one per loop nest
        loops = s.get_loops(block)
        if not loops or _iterations(s, loops) < PARALLEL_MIN:
            continue
        spatial = 0
        for iv in s.get(block).iter_vars:
            if iv.iter_type != tir.IterVar.DataPar:
                break
            spatial += 1
        _vectorize_inner(s, block, spatial, len(loops))
        loops = s.get_loops(block)
        try:
            s.parallel(s.fuse(*loops[: max(1, min(spatial, len(loops) - 1))]) if len(loops) > 1 else loops[0])
        except s_tir.ScheduleError:  # not a plain data-parallel nest: it stays serial
            continue
    return s.mod["main"].with_attr(SCHEDULED, True)


def _vectorize_inner(s: s_tir.Schedule, block: Any, spatial: int, depth: int) -> None:
    """The innermost loop of an all-data-parallel nest (spatial iter vars == loop depth) in vector lanes."""
    if spatial == depth:
        _vectorize_last(s, block)


def _vectorize_last(s: s_tir.Schedule, block: Any) -> None:
    """The block's innermost loop in vector lanes, when its static extent is a multiple of 8 (LLVM does not
    vectorize TVM's int64 index arithmetic by itself; measured 1.25x on r1-tiny)."""
    inner = s.get_loops(block)[-1]
    extent = s.get(inner).extent
    if not isinstance(extent, tir.IntImm) or int(extent) % 8:
        return
    try:
        _, lanes = s.split(inner, [None, 16 if int(extent) % 16 == 0 else 8])
        s.vectorize(lanes)
    except s_tir.ScheduleError:  # a nest the vectorizer rejects keeps its scalar loop
        pass


def _has_root(s: s_tir.Schedule) -> bool:
    try:
        s.get_sblock("root")
        return True
    except s_tir.ScheduleError:  # hand-written TIR without blocks: left as written
        return False


def _iterations(s: s_tir.Schedule, loops: list) -> float:
    n = 1.0
    for loop in loops:
        extent = s.get(loop).extent
        n *= int(extent) if isinstance(extent, tir.IntImm) else SYMBOLIC_GUESS
    return n


def schedule_default(func: tir.PrimFunc, target: tvm.target.Target) -> tir.PrimFunc:
    """The default schedule of one unscheduled PrimFunc (hand-written kernels are returned as written)."""
    kind = (func.attrs or {}).get(KERNEL_ATTR)
    if kind == "gemm":
        return schedule_gemm(func)
    if kind in HAND_WRITTEN:
        return func
    rows = schedule_rows(func)
    if rows is not None:
        return rows
    if _work(func) < SMALL_WORK:  # dlight would put threads on it; forking costs more than the work
        return parallelize(func)
    with target:
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(tvm.IRModule({"main": func}))
    return mod["main"] if not _unscheduled(mod["main"]) else parallelize(func)


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every PrimFunc not yet scheduled (a tuning database applied first marks its own)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tir.PrimFunc) and _unscheduled(func):
            mod[gv] = schedule_default(func, target)
    return mod


def _work(func: tir.PrimFunc) -> float:
    """Loop iterations of all the function's loop nests (symbolic extents count SYMBOLIC_GUESS)."""
    s = s_tir.Schedule(func)
    if not _has_root(s):
        return float("inf")
    return sum(_iterations(s, s.get_loops(b)) for b in s.get_child_blocks(s.get_sblock("root")))


def _unscheduled(func: tir.PrimFunc) -> bool:
    return not (func.attrs and func.attrs.get(SCHEDULED))
