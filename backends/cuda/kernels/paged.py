"""Launchers of the paged MLA cache ops (ir/ops/paged.py): `paged_write`, `paged_write_q`, `paged_mla_attention`,
`paged_mla_attention_kvq`.

Writes go into the pool tensor they are given and return it (as `cache_write`: the lowering marks them in place
when nothing reads the old pool later; the runtime otherwise hands them a copy). `paged_write_q` quantizes each
new token per group of D / G channels with kv_quant.py's numerics (the reference's, bit for bit) and writes codes
and scales.

Attention is FlashMLA's absorbed decode over the block table: q_nope goes through W_UK into latent space (one
cuBLAS bmm, as mla_decode.py), then one Triton kernel streams each row's pages: a tile of BLOCK_N positions finds
its pages in the block table (a position's page is block_table[b, p // T], its slot p % T, so tiles need not align
with pages), scores all H * S query rows of the row against latent | rope at once (the latent head is shared by
every query head: one read of a tile serves all heads), keeps an online softmax in fp32 and accumulates the same
latent tile as the value. Quantized pools are dequantized in registers: codes times their token's group scale.
The keys split into chunks over programs (split-KV, flash-decoding) whose partials decode_attention's merge kernel
combines; the chunking is fixed by the block table's capacity M * T, not by the fill level, so it is known on the
host without reading `start` and a CUDA graph captured once serves every step. W_UV maps the latent output back
per head (cuBLAS). S > 1 (prefill, speculative verify) is causal: query s of row b sits at start[b] + s.

Bounds: in eager runs the launchers read start and the block table once on the host and reject a step that leaves
its block table or names a page outside the pool (the reference's errors). Inside a CUDA graph capture nothing is
read on the host; the kernels then drop writes to, and ignore keys in, pages outside 0 .. P - 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels import kv_quant
from r1c.backends.cuda.kernels.decode_attention import (
    CODES,
    FLOATS,
    INTERPRET,
    LOG2E,
    DecodeKernelError,
    load_codes,
    merge,
    partials,
    pick_splits,
    softmax_step,
    split_chunk,
    store_partial,
)
from r1c.backends.cuda.launchers import launcher
from r1c.ir.ops.paged import slots
from r1c.ir.ops.quant import qmax
from r1c.ir.registry import OpError
from r1c.ir.types import DType

MAX_ROWS_PER_TILE = 64
MAX_LATENT = 1024
_QDTYPE = {torch.int8: DType.int8, torch.float8_e4m3fn: DType.fp8e4m3}


# ---- host-side checks --------------------------------------------------------------------------------------------


def check_step(op: str, table: torch.Tensor, start: torch.Tensor, batch: int, steps: int, pages: int, page: int):
    """The reference's checks (ir/ops/paged.slots) on the host, in eager runs only (see the module docstring)."""
    for what, t, rank in (("block_table", table, 2), ("start", start, 1)):
        if t.dtype != torch.int32 or t.dim() != rank or t.shape[0] != batch:
            raise DecodeKernelError(f"{op}: {what} must be int32 with {batch} rows, got {t.dtype} {tuple(t.shape)}")
    if start.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    try:
        slots(op, table.cpu().numpy(), start.cpu().numpy(), steps, pages, page)
    except OpError as e:
        raise DecodeKernelError(str(e)) from None


def check_pool(op: str, pool: torch.Tensor, layer: int, kinds: tuple[torch.dtype, ...]) -> None:
    if pool.dtype not in kinds or pool.dim() != 4 or not pool.is_contiguous():
        kinds_s = ", ".join(map(str, kinds))
        raise DecodeKernelError(f"{op}: the pool must be a contiguous [L, P, T, D] tensor of {kinds_s}, got "
                                f"{pool.dtype} {tuple(pool.shape)}")  # fmt: skip
    if not 0 <= layer < pool.shape[0]:
        raise DecodeKernelError(f"{op}: layer {layer} is out of range for a pool of {pool.shape[0]} layers")


def check_scales(op: str, pool: torch.Tensor, scales: torch.Tensor) -> None:
    """A quantized pool's scales: f32 [L, P, T, G], G dividing the pool's channels."""
    g = scales.shape[-1] if scales.dim() == 4 else 0
    if scales.dtype != torch.float32 or tuple(scales.shape[:3]) != tuple(pool.shape[:3]) or not g or pool.shape[3] % g:
        raise DecodeKernelError(f"{op}: scales must be f32 [L, P, T, G] with G dividing {pool.shape[3]}, got "
                                f"{scales.dtype} {tuple(scales.shape)} for a pool {tuple(pool.shape)}")  # fmt: skip
    if not scales.is_contiguous():
        raise DecodeKernelError(f"{op}: scales must be contiguous")


# ---- writes ------------------------------------------------------------------------------------------------------


@triton.jit
def _write_kernel(
    POOL, SCALES, NEW, TABLE, START, S, M, P, T, snb, sns, stb, spp, spt, ssp, sst,
    D: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    """Row b's tokens s of this block: position start[b] + s goes to page table[b, pos // T], slot pos % T. The
    token's D channels are viewed as [G, W] (W = D / G; a float pool takes G = 1): per group one scale when QUANT."""
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    pos = tl.load(START + b) + s
    tok_ok = (s < S) & (pos >= 0) & (pos < M * T)
    page = tl.load(TABLE + b * stb + pos // T, mask=tok_ok, other=-1)
    tok_ok = tok_ok & (page >= 0) & (page < P)  # a bad page (only possible in graph replays) drops the write
    W: tl.constexpr = D // G
    grp = tl.arange(0, BLOCK_G)
    w = tl.arange(0, BLOCK_W)
    ch = grp[:, None] * W + w[None, :]  # [BLOCK_G, BLOCK_W]
    ch_ok = (grp[:, None] < G) & (w[None, :] < W)
    m = tok_ok[:, None, None] & ch_ok[None, :, :]
    x = tl.load(NEW + b * snb + s[:, None, None] * sns + ch[None, :, :], mask=m, other=0.0)
    row = page.to(tl.int64) * spp + (pos % T) * spt
    if QUANT:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), 2)
        nan_seen = tl.max((xf != xf).to(tl.int32), 2) > 0
        scale = kv_quant._group_scale(amax, nan_seen, QMAX)
        codes = kv_quant._quant_values(x, scale[:, :, None], QMAX, IS_FP8)
        tl.store(POOL + row[:, None, None] + ch[None, :, :], codes, mask=m)
        srow = page.to(tl.int64) * ssp + (pos % T) * sst
        tl.store(SCALES + srow[:, None] + grp[None, :], scale, mask=tok_ok[:, None] & (grp[None, :] < G))
    else:
        tl.store(POOL + row[:, None, None] + ch[None, :, :], x.to(POOL.dtype.element_ty), mask=m)


def _write(op: str, pool: torch.Tensor, scales: torch.Tensor | None, new: torch.Tensor, table: torch.Tensor,
           start: torch.Tensor, layer: int) -> None:  # fmt: skip
    _, pages, page, d = pool.shape
    if new.dim() != 3 or new.shape[2] != d or new.dtype not in FLOATS:
        raise DecodeKernelError(f"{op}: new must be float [B, S, {d}], got {new.dtype} {tuple(new.shape)}")
    if scales is None and new.dtype != pool.dtype:
        raise DecodeKernelError(f"{op}: new {new.dtype} must have the pool's dtype {pool.dtype}")
    bsz, steps = new.shape[:2]
    check_step(op, table, start, bsz, steps, pages, page)
    if not bsz * steps:
        return
    groups = 1 if scales is None else scales.shape[3]
    width = d // groups
    new = new if new.stride(-1) == 1 else new.contiguous()
    table = table if table.stride(-1) == 1 else table.contiguous()
    dst = pool[layer]
    sdst = dst if scales is None else scales[layer]
    block_g, block_w = triton.next_power_of_2(groups), triton.next_power_of_2(width)
    block_s = max(1, min(triton.next_power_of_2(steps), 4096 // (block_g * block_w)))
    quant = scales is not None
    _write_kernel[(bsz, triton.cdiv(steps, block_s))](
        dst, sdst, new, table, start, steps, table.shape[1], pages, page, new.stride(0), new.stride(1),
        table.stride(0), dst.stride(0), dst.stride(1), sdst.stride(0), sdst.stride(1),
        D=d, G=groups, BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_W=block_w, QUANT=quant,
        QMAX=qmax(_QDTYPE[pool.dtype], 8) if quant else 1.0, IS_FP8=pool.dtype == torch.float8_e4m3fn,
        num_warps=8 if quant else 4,
    )  # fmt: skip


@launcher("paged_write")
def paged_write(pool: torch.Tensor, new: torch.Tensor, table: torch.Tensor, start: torch.Tensor, *, layer: int):
    """Writes `new` into layer `layer` of `pool` (in place) and returns the pool; see the module docstring."""
    check_pool("paged_write", pool, layer, FLOATS)
    _write("paged_write", pool, None, new, table, start, layer)
    return pool


@launcher("paged_write_q")
def paged_write_q(pool: torch.Tensor, scales: torch.Tensor, new: torch.Tensor, table: torch.Tensor,
                  start: torch.Tensor, *, layer: int):  # fmt: skip
    """Quantizes `new` per token and group into the codes and scales (both in place); returns (pool, scales)."""
    check_pool("paged_write_q", pool, layer, CODES)
    check_scales("paged_write_q", pool, scales)
    _write("paged_write_q", pool, scales, new, table, start, layer)
    return pool, scales


# ---- attention ---------------------------------------------------------------------------------------------------


@triton.jit
def _dequant(codes, sbase, ok, offs, FIRST: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
             W: tl.constexpr, BLOCK_N: tl.constexpr, RESHAPE: tl.constexpr):  # fmt: skip
    """codes [BLOCK_N, BLOCK] of channels FIRST + offs, times their token's group scale (f32). RESHAPE (the
    channels are whole groups, counts powers of two): one scale load per (token, group), broadcast over the group
    through a [N, groups, W] view; otherwise each element loads its group's scale (an L1 hit)."""
    x = codes.to(tl.float32)
    if RESHAPE:
        GN: tl.constexpr = BLOCK // W
        gi = tl.arange(0, GN)
        sc = tl.load(sbase[:, None] + FIRST // W + gi[None, :], mask=ok[:, None], other=0.0)
        x = tl.reshape(tl.reshape(x, [BLOCK_N, GN, W]) * sc[:, :, None], [BLOCK_N, BLOCK])
    else:
        x = x * tl.load(sbase[:, None] + (FIRST + offs[None, :]) // W, mask=ok[:, None] & (offs[None, :] < WIDTH),
                        other=0.0)  # fmt: skip
    return x


@triton.jit
def _paged_tile(
    acc, m_i, l_i, q_lat, q_rope, n0, POOL, SCALES, tbl, spp, spt, ssp, sst, P, T,
    offs_n, offs_c, offs_r, qpos, hi, qk_scale,
    C: tl.constexpr, DR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, W: tl.constexpr, LAT_RESHAPE: tl.constexpr, ROT_RESHAPE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    kn = n0 + offs_n
    page = tl.load(tbl + kn // T, mask=kn < hi, other=-1)
    ok = (kn < hi) & (page >= 0) & (page < P)
    row = page.to(tl.int64) * spp + (kn % T) * spt
    if QUANT:
        srow = SCALES + page.to(tl.int64) * ssp + (kn % T) * sst
        lat = _dequant(load_codes(POOL + row[:, None] + offs_c[None, :], ok, offs_c, C), srow, ok, offs_c, 0, C,
                       BLOCK_C, W, BLOCK_N, LAT_RESHAPE)  # fmt: skip
        rot = _dequant(load_codes(POOL + row[:, None] + C + offs_r[None, :], ok, offs_r, DR), srow, ok, offs_r, C,
                       DR, BLOCK_DR, W, BLOCK_N, ROT_RESHAPE)  # fmt: skip
    else:
        lat = tl.load(POOL + row[:, None] + offs_c[None, :], mask=ok[:, None] & (offs_c[None, :] < C), other=0.0)
        rot = tl.load(POOL + row[:, None] + C + offs_r[None, :], mask=ok[:, None] & (offs_r[None, :] < DR), other=0.0)
    # masked keys and padded channels hold undefined codes (no fp8 `other` in the interpreter) and the latent is
    # also V, where 0 * NaN is NaN: zero them
    lat = tl.where(ok[:, None] & (offs_c[None, :] < C), lat.to(q_lat.dtype), 0.0)
    rot = tl.where(ok[:, None] & (offs_r[None, :] < DR), rot.to(q_rope.dtype), 0.0)
    s = tl.dot(q_lat, tl.trans(lat), input_precision=PREC) + tl.dot(q_rope, tl.trans(rot), input_precision=PREC)
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # keys of bad pages (graph replays only) are invisible
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i, kn, qpos, hi, 0, 0, True, False)
    acc = tl.dot(p.to(q_lat.dtype), lat, acc * alpha[:, None], input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _paged_mla_kernel(
    QL, QR, POOL, SCALES, TABLE, START, OUT, MP, LP, AP,
    sqlb, sqlh, sqls, sqrb, sqrh, sqrs, spp, spt, ssp, sst, stb, sob, soh, sos,
    H, SQ, P, T, CHUNK, NSPLIT, qk_scale,
    C: tl.constexpr, DR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, W: tl.constexpr,
    LAT_RESHAPE: tl.constexpr, ROT_RESHAPE: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Program (row b, tile of BLOCK_M query rows, split): rows r = query r // H of head r % H, keys of positions
    split * CHUNK .. up to the row's fill start[b] + SQ (and causally up to the tile's last query)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    nrows = H * SQ
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < nrows
    i = rows // H
    h = rows % H
    skv = tl.load(START + b) + SQ
    qpos = i + skv - SQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_DR)
    q_lat = tl.load(QL + b * sqlb + h[:, None] * sqlh + i[:, None] * sqls + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0)  # fmt: skip
    q_rope = tl.load(QR + b * sqrb + h[:, None] * sqrh + i[:, None] * sqrs + offs_r[None, :],
                     mask=row_ok[:, None] & (offs_r[None, :] < DR), other=0.0)  # fmt: skip
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, skv - SQ + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // H, SQ - 1) + 1)
    tbl = TABLE + b * stb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    if INTERPRET:  # no range() of a run-time scalar in the interpreter
        n0 = lo
        while n0 < hi:
            acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q_lat, q_rope, n0, POOL, SCALES, tbl, spp, spt, ssp, sst, P,
                                        T, offs_n, offs_c, offs_r, qpos, hi, qk_scale, C, DR, BLOCK_C, BLOCK_DR,
                                        BLOCK_N, QUANT, W, LAT_RESHAPE, ROT_RESHAPE, PREC)  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q_lat, q_rope, n0, POOL, SCALES, tbl, spp, spt, ssp, sst, P,
                                        T, offs_n, offs_c, offs_r, qpos, hi, qk_scale, C, DR, BLOCK_C, BLOCK_DR,
                                        BLOCK_N, QUANT, W, LAT_RESHAPE, ROT_RESHAPE, PREC)  # fmt: skip
    store_partial(acc, m_i, l_i, OUT, MP, LP, AP, b * sob + h * soh + i * sos, b * nrows + rows, split, NSPLIT,
                  row_ok, offs_c, C, DIRECT)  # fmt: skip


def _whole_groups(first: int, width: int, block: int, w: int) -> bool:
    """Whether channels first .. first + width - 1 are whole groups of w in a power-of-two count (and unpadded)."""
    return width == block and first % w == 0 and width % w == 0 and (width // w) & (width // w - 1) == 0


def paged_latent_attention(
    q_lat: torch.Tensor, q_rope: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor | None, table: torch.Tensor,
    start: torch.Tensor, *, scale: float, splits: int | None = None, block_m: int | None = None,
    block_n: int | None = None, num_warps: int = 8, num_stages: int = 2,
) -> torch.Tensor:  # fmt: skip
    """The kernel part over one layer's pool [P, T, C + dr] (scales [P, T, G] for codes): o_lat [B, H, S, C] =
    softmax(q_lat latent^T + q_rope rope^T) latent, in q_lat's dtype. Tuning knobs for the benchmark. Defaults, from
    sm_90 builds (bench/sm90_aot.py's compile_only) and the H200 sweep in bench/results/decode_paged_cuda.json:
    8 warps (4 spill the 16 x 512 decode accumulator); 64 keys a tile for one tile of rows (decode: 1.1-1.3x faster
    than 32), 32 for more rows or when scales are gathered per element (64 needs 342 KB of shared memory there); f32
    (a correctness mode) takes 16 x 16 tiles to fit shared memory. Splits as decode_attention's pick_splits, but
    down to one tile of keys a split when there are fewer than 16 programs (B=1 at 576 keys: 22 -> 14 us)."""
    bsz, h, sq, c = q_lat.shape
    pages, page, d = pool.shape
    dr = d - c
    nrows = h * sq
    f32 = q_lat.dtype == torch.float32
    block_m = block_m or (16 if f32 else min(MAX_ROWS_PER_TILE, max(16, triton.next_power_of_2(nrows))))
    block_c, block_dr = triton.next_power_of_2(c), max(16, triton.next_power_of_2(dr))
    w = d // scales.shape[-1] if scales is not None else 1
    lat_whole, rot_whole = _whole_groups(0, c, block_c, w), _whole_groups(c, dr, block_dr, w)
    gather = scales is not None and not (lat_whole and rot_whole)
    block_n = block_n or (16 if f32 else 64 if block_m <= 16 and not gather else 32)
    if block_n < 16:
        raise DecodeKernelError(f"paged attention: block_n must be at least 16 (tensor-core dots), got {block_n}")
    tiles = triton.cdiv(nrows, block_m)
    capacity = table.shape[1] * page  # the chunking must not depend on start (see the module docstring)
    splits = splits or pick_splits(bsz * tiles, capacity, q_lat.device, block_n if bsz * tiles < 16 else 256)
    chunk, splits = split_chunk(capacity, splits, block_n)
    o_lat = torch.empty((bsz, h, sq, c), dtype=q_lat.dtype, device=q_lat.device)
    mp, lp, ap = partials(bsz * nrows, splits, c, q_lat.device)
    sc = pool if scales is None else scales
    _paged_mla_kernel[(bsz, tiles, splits)](
        q_lat, q_rope, pool, sc, table, start, o_lat, mp, lp, ap,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        pool.stride(0), pool.stride(1), sc.stride(0), sc.stride(1), table.stride(0),
        o_lat.stride(0), o_lat.stride(1), o_lat.stride(2),
        h, sq, pages, page, chunk, splits, scale * LOG2E,
        C=c, DR=dr, BLOCK_C=block_c, BLOCK_DR=block_dr, BLOCK_M=block_m, BLOCK_N=block_n,
        QUANT=scales is not None, W=w, LAT_RESHAPE=lat_whole, ROT_RESHAPE=rot_whole,
        PREC="ieee" if f32 else "tf32",
        DIRECT=splits == 1, INTERPRET=INTERPRET, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        merge(mp, lp, ap, o_lat, nrows, bsz, 1, h, sq, splits)
    return o_lat


def _attention(op: str, q, pool, scales, table, start, w, layer, scale, dn, dv, **tuning) -> torch.Tensor:
    if q.dtype not in FLOATS or w.dtype != q.dtype or q.dim() != 4 or w.dim() != 2:
        raise DecodeKernelError(f"{op}: q [B, H, S, dn+dr] and the kv_b weight must share a float dtype, got "
                                f"{q.dtype} {tuple(q.shape)}, {w.dtype} {tuple(w.shape)}")  # fmt: skip
    bsz, h, sq, dk = q.shape
    c = w.shape[1]
    _, pages, page, d = pool.shape
    if d != c + dk - dn or w.shape[0] != h * (dn + dv):
        raise DecodeKernelError(f"{op}: pool channels {d}, q {tuple(q.shape)} and kv_b weight {tuple(w.shape)} do not "
                                f"fit qk_nope_head_dim={dn}, v_head_dim={dv}")  # fmt: skip
    if c > MAX_LATENT or dk - dn > 256:
        raise DecodeKernelError(f"{op}: latent rank up to {MAX_LATENT} and rotary dim up to 256, got {c}, {dk - dn}")
    check_step(op, table, start, bsz, sq, pages, page)
    wv = w.view(h, dn + dv, c)
    q_lat = torch.einsum("bhsd,hdc->bhsc", q[..., :dn], wv[:, :dn])  # W_UK absorption (cuBLAS, see docstring)
    table = table if table.stride(-1) == 1 else table.contiguous()
    o_lat = paged_latent_attention(q_lat, q[..., dn:], pool[layer], None if scales is None else scales[layer],
                                   table, start, scale=scale, **tuning)  # fmt: skip
    return torch.einsum("bhsc,hec->bhse", o_lat, wv[:, dn:])  # W_UV after the softmax (cuBLAS)


@launcher("paged_mla_attention")
def paged_mla_attention(q, pool, table, start, kv_b_weight, *, layer, scale, qk_nope_head_dim, v_head_dim, **tuning):
    check_pool("paged_mla_attention", pool, layer, (q.dtype,))
    return _attention("paged_mla_attention", q, pool, None, table, start, kv_b_weight, layer, scale,
                      qk_nope_head_dim, v_head_dim, **tuning)  # fmt: skip


@launcher("paged_mla_attention_kvq")
def paged_mla_attention_kvq(q, pool, scales, table, start, kv_b_weight, *, layer, scale, qk_nope_head_dim,
                            v_head_dim, **tuning):  # fmt: skip
    op = "paged_mla_attention_kvq"
    check_pool(op, pool, layer, CODES)
    check_scales(op, pool, scales)
    return _attention(op, q, pool, scales, table, start, kv_b_weight, layer, scale, qk_nope_head_dim, v_head_dim,
                      **tuning)  # fmt: skip


__all__ = ["paged_latent_attention"]
