"""Block-sparse flash attention, forward: `attention_block_map`, `tiled_attention`, `attention` and
`block_sparse_attention` on one Triton kernel (importing this module also registers the backward's launcher).

Block maps (see docs/passes.md, sparse-attention-tiling) depend only on static lengths and mask attributes, so they
are built on the host with numpy, once per (lengths, mask, tiling, device), and cached as device tensors; the
`attention_block_map` launcher returns that cached map. The kernel runs one program per (batch*head, q tile),
loops over the q tile's map row, and applies the element mask (causal/window/sinks/layout/sequence ends) only on
PARTIAL tiles; FULL tiles skip the mask math (one loop that branches on each tile's kind; with a map from
`split_block_map`, which lists each row's FULL tiles first, two loops without a branch). Online softmax in fp32,
in the log2 domain (log2(e) folded into the scale). Head dims are padded to a power of two inside the kernel
(masked loads), so D=24 or D=192 work.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from r1c.backends.cuda.launchers import launcher
from r1c.ir.ops.attention_tiled import FULL, PARTIAL, cdiv, map_columns

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # padded: q/k/v tiles of BLOCK x 256 are the most a program holds
_MASK_CHUNK = 1 << 22  # elements of element mask built at once on the host
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels loop with `while` there (see _fwd_kernel)
# Default for tma=None. Measured on the H200 (bench/attention_cuda_notes.md): descriptors for k/v change the forward
# by 0.4-1.3%, inside the spread of one configuration timed twice, and add host work to every launch: off.
USE_TMA = False


class AttentionKernelError(ValueError):
    """An input the flash-attention kernels do not handle (dtype, head dim, tile size, device)."""


# ---- block maps (host, cached) ----------------------------------------------------------------------------------


def mask_key(a: dict) -> tuple:
    """The hashable mask attributes (causal, window, sinks, layout_block, layout) of an op's complete attrs."""
    return (
        bool(a.get("causal", True)),
        int(a.get("window", 0)),
        int(a.get("sinks", 0)),
        int(a.get("layout_block", 0)),
        tuple(a.get("layout", ())),
    )


def _layout_blocks(sq: int, skv: int, mask: tuple) -> np.ndarray | None:
    """Bitmap [ceil(sq/lb), ceil(skv/lb)] of the layout's (q_block, k_block) pairs, None without a layout."""
    _, _, _, lb, layout = mask
    if not lb:
        return None
    pairs = np.asarray(layout, dtype=np.int64).reshape(-1, 2)
    blocks = np.zeros((cdiv(sq, lb), cdiv(skv, lb)), dtype=bool)
    inside = (pairs[:, 0] < blocks.shape[0]) & (pairs[:, 1] < blocks.shape[1])
    blocks[pairs[inside, 0], pairs[inside, 1]] = True
    return blocks


def _tile_any_all(sq: int, skv: int, mask: tuple, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """(visible, full) [n_q, n_k]: a tile has some / only visible elements (padding counts as hidden). The element
    mask is built a few q tiles at a time, so long sequences need no sq x skv array."""
    causal, window, sinks, lb, _ = mask
    blocks = _layout_blocks(sq, skv, mask)
    nq, nk = cdiv(sq, bq), cdiv(skv, bk)
    visible, full = np.zeros((nq, nk), dtype=bool), np.zeros((nq, nk), dtype=bool)
    j = np.arange(nk * bk)[None, :]
    step = max(1, _MASK_CHUNK // max(1, nk * bk * bq))
    for t0 in range(0, nq, step):
        t1 = min(nq, t0 + step)
        i = np.arange(t0 * bq, t1 * bq)[:, None]
        vis = (i < sq) & (j < skv)
        if causal:
            qpos = i + (skv - sq)  # queries are the newest tokens
            vis = vis & (j <= qpos)
            if window:
                vis = vis & ((j > qpos - window) | (j < sinks))
        if blocks is not None:
            rows, cols = np.minimum(i[:, 0] // lb, blocks.shape[0] - 1), np.minimum(j[0] // lb, blocks.shape[1] - 1)
            vis = vis & blocks[rows][:, cols]  # indices are clipped where vis is already False (padding)
        tiles = vis.reshape(t1 - t0, bq, nk, bk)
        visible[t0:t1], full[t0:t1] = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
    return visible, full


def _pack(
    visible: np.ndarray, full: np.ndarray, columns: int | None, full_first: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of (tile, kind) padded with (-1, 0), in ascending tile order or (full_first) the FULL tiles, then the
    PARTIAL ones, each ascending; counts per row; FULL tiles per row."""
    counts = visible.sum(axis=-1)
    columns = int(counts.max(initial=0)) if columns is None else columns
    if counts.size and counts.max() > columns:
        raise AttentionKernelError(f"block map: a row has {counts.max()} non-empty tiles, the map holds {columns}")
    rank = np.where(full, 0, np.where(visible, 1, 2)) if full_first else ~visible
    order = np.argsort(rank, axis=-1, kind="stable")[:, :columns]
    used = np.take_along_axis(visible, order, axis=-1)
    kinds = np.where(np.take_along_axis(full, order, axis=-1), FULL, PARTIAL)
    out = np.zeros((visible.shape[0], max(columns, 1), 2), dtype=np.int32)
    out[..., 0] = -1
    n = order.shape[-1]
    out[:, :n, 0] = np.where(used, order, -1)
    out[:, :n, 1] = np.where(used, kinds, 0)
    return out[None, :, :columns], counts[None].astype(np.int32), full.sum(axis=-1)[None].astype(np.int32)


@functools.lru_cache(maxsize=64)
def block_map(
    sq: int, skv: int, mask: tuple, bq: int, bk: int, device: str, transposed: bool = False, columns: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (block_map int32[1, n_q, C, 2], counts int32[1, n_q]) of a mask on `device`, as the IR defines
    it. transposed=True gives the map of the backward's dk/dv pass: one row per k tile listing the q tiles that
    see it."""
    visible, full = _tile_any_all(sq, skv, mask, bq, bk)
    if transposed:
        visible, full = visible.T, full.T
    m, c, _ = _pack(visible, full, columns, full_first=False)
    return torch.from_numpy(m).to(device), torch.from_numpy(c).to(device)


@functools.lru_cache(maxsize=64)
def split_block_map(
    sq: int, skv: int, mask: tuple, bq: int, bk: int, device: str, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map, counts, full_counts) with each row's FULL tiles first: the kernels walk them in a loop without mask
    code, then the PARTIAL ones in a second loop (used where the launcher builds the map itself)."""
    visible, full = _tile_any_all(sq, skv, mask, bq, bk)
    if transposed:
        visible, full = visible.T, full.T
    return tuple(torch.from_numpy(x).to(device) for x in _pack(visible, full, None, full_first=True))


@functools.lru_cache(maxsize=64)
def layout_bitmap(sq: int, skv: int, mask: tuple, device: str) -> torch.Tensor | None:
    """int8 [n_lq, n_lk] layout bitmap the kernels read on partial tiles (None without a layout)."""
    blocks = _layout_blocks(sq, skv, mask)
    return None if blocks is None else torch.from_numpy(blocks.astype(np.int8)).to(device)


# ---- checks and configuration -----------------------------------------------------------------------------------


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dtype not in _DTYPES:
            raise AttentionKernelError(f"{op}: {name} has dtype {t.dtype}; the kernel supports f16, bf16, f32")
        if t.dim() != 4:
            raise AttentionKernelError(f"{op}: {name} must be [B, H, S, D], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise AttentionKernelError(f"{op}: q, k, v must share dtype and device")
    if q.shape[1] % k.shape[1]:
        raise AttentionKernelError(f"{op}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    for d, name in ((q.shape[3], "qk head dim"), (v.shape[3], "v head dim")):
        if not 1 <= d <= _MAX_HEAD_DIM:
            raise AttentionKernelError(f"{op}: {name} {d} is not in 1..{_MAX_HEAD_DIM}")
    if not scale > 0:  # the running max is taken on scaled logits
        raise AttentionKernelError(f"{op}: scale must be > 0, got {scale}")


def check_tile(op: str, name: str, size: int) -> None:
    if size < 16 or size > 256 or size & (size - 1):
        raise AttentionKernelError(f"{op}: {name}={size}; the kernel needs a power of two in 16..256")


def pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # f32 inputs get f32 dots; the others ignore it


def fwd_config(bd: int, block_q: int, block_k: int, elem_bytes: int = 2) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) for a map tiled block_q x block_k: BLOCK_M divides block_q. Stages by the
    bytes of a k (or v) tile: two 32 KB tiles per stage at most, so f32 with D=192 (padded to 256) fits sm_90's
    227 KB of shared memory (3 stages needed 272 KB: bench/sm90_aot.py)."""
    block_m = min(block_q, 128 if bd <= 128 else 64)  # a 128 x 256 q tile would spill
    warps = 8 if block_m * max(bd, block_k) >= 128 * 128 else 4
    stages = 3 if bd * block_k * elem_bytes <= 128 * 128 * 2 else 2
    return block_m, warps, stages


def tma_ok(k: torch.Tensor, v: torch.Tensor, block_k: int, even: bool) -> bool:
    """k/v tiles can come through tensor descriptors: contiguous [B, H, S, D] with whole tiles (a tile never crosses
    into the next head's rows), 16-byte rows and bases, on a GPU (sm_90+)."""
    return (
        even
        and (INTERPRET or (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9))
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (k, v))
        and all(t.shape[3] * t.element_size() % 16 == 0 for t in (k, v))
        and k.shape[2] % block_k == 0
    )


# ---- forward kernel ---------------------------------------------------------------------------------------------


@triton.jit
def tile_visible(
    offs_m, offs_n, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr
):
    """Element mask of a partial tile: offs_m [BM, 1] query indices, offs_n [1, BN] key indices (or transposed)."""
    vis = (offs_m < SQ) & (offs_n < SKV)
    if CAUSAL:
        qpos = offs_m + (SKV - SQ)
        vis = vis & (offs_n <= qpos)
        if WINDOW > 0:
            vis = vis & ((offs_n > qpos - WINDOW) | (offs_n < SINKS))
    if HAS_LAYOUT:
        vis = vis & (tl.load(LAYOUT + (offs_m // LB) * NLK + offs_n // LB, mask=vis, other=0) != 0)
    return vis


@triton.jit
def _fwd_tile(
    q, acc, m_i, l_i, entry, smk, k_base, v_base, skn, svn, KD, VD, kv_row, offs_m, offs_n, offs_d, offs_dv,
    SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, EVEN: tl.constexpr, MODE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One (k_tile, kind) map entry of the online softmax: returns the updated (acc, m_i, l_i). MODE 0 reads the
    kind and branches on it; 1: a FULL tile (no mask code); 2: a PARTIAL tile. TMA: k and v tiles come through the
    tensor descriptors KD, VD over the [B*Hkv*S, D] rows (kv_row: this head's first row)."""
    kt = tl.load(entry)
    offs_kn = kt * BLOCK_N + offs_n
    if TMA:
        k = KD.load([kv_row + kt * BLOCK_N, 0]).T
    elif EVEN:  # no tile crosses the end of the keys and the head dims are powers of two: unmasked loads
        k = tl.load(k_base + offs_kn[None, :] * skn)
    else:
        k = tl.load(k_base + offs_kn[None, :] * skn, mask=(offs_kn[None, :] < SKV) & (offs_d[:, None] < D), other=0.0)
    qk = tl.dot(q, k, input_precision=PREC)  # unscaled: scale > 0 is folded into the exp2 below (one FMA)
    if MODE == 0:
        if tl.load(entry + smk) == 2:  # PARTIAL: only these tiles pay for the element mask
            vis = tile_visible(offs_m[:, None], offs_kn[None, :], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                               HAS_LAYOUT)  # fmt: skip
            qk = tl.where(vis, qk, float("-inf"))
    elif MODE == 2:
        vis = tile_visible(offs_m[:, None], offs_kn[None, :], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                           HAS_LAYOUT)  # fmt: skip
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = VD.load([kv_row + kt * BLOCK_N, 0])
    elif EVEN:
        v = tl.load(v_base + offs_kn[:, None] * svn)
    else:
        v = tl.load(v_base + offs_kn[:, None] * svn, mask=(offs_kn[:, None] < SKV) & (offs_dv[None, :] < DV), other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_loop(
    start, stop, q, acc, m_i, l_i, map_row, smc, smk, k_base, v_base, skn, svn, KD, VD, kv_row,
    offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, EVEN: tl.constexpr, MODE: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Map entries start..stop of a row. The interpreter cannot take range() of a loaded scalar (it calls int() on a
    1-element numpy array), so there the loop is a `while`; compiled, a `for` that Triton software-pipelines."""
    if INTERPRET:
        c = start
        while c < stop:
            acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, map_row + c * smc, smk, k_base, v_base, skn, svn, KD, VD,
                                      kv_row, offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB,
                                      NLK, qk_scale, D, DV, BLOCK_N, CAUSAL, HAS_LAYOUT, PREC, EVEN, MODE,
                                      TMA)  # fmt: skip
            c += 1
    else:
        for c in range(start, stop):
            acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, map_row + c * smc, smk, k_base, v_base, skn, svn, KD, VD,
                                      kv_row, offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB,
                                      NLK, qk_scale, D, DV, BLOCK_N, CAUSAL, HAS_LAYOUT, PREC, EVEN, MODE,
                                      TMA)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KD, VD, OUT, LSE, DO, DELTA, MAP, COUNTS, FULLC, LAYOUT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, som, sod, sgb, sgh, sgm, sgd, smb, smr, smc, smk, scb, scr,
    H, REP, SQ, SKV, WINDOW, SINKS, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr, MAP_BATCHED: tl.constexpr,
    STORE_O: tl.constexpr, STORE_LSE: tl.constexpr, WITH_DO: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # last q tiles (longest causal rows) are launched first
    b, h = bh // H, bh % H
    hk = h // REP
    row = pid_m // SUB  # BLOCK_M may split a map q tile; each part walks the tile's whole row
    mb = b if MAP_BATCHED else 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < SQ
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = K + b * skb + hk * skh + offs_d[:, None] * skd
    v_base = V + b * svb + hk * svh + offs_dv[None, :] * svd
    kv_row = (b * (H // REP) + hk) * SKV  # first row of this kv head in the descriptors' [B*Hkv*S, D] view
    map_row = MAP + mb * smb + row * smr
    count = tl.load(COUNTS + mb * scb + row * scr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    if SPLIT:  # the row lists its FULL tiles first: two loops, mask code only in the second
        nfull = tl.load(FULLC + mb * scb + row * scr)
        acc, m_i, l_i = _fwd_loop(0, nfull, q, acc, m_i, l_i, map_row, smc, smk, k_base, v_base, skn, svn, KD, VD,
                                  kv_row, offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK,
                                  qk_scale, D, DV, BLOCK_N, CAUSAL, HAS_LAYOUT, PREC, EVEN, 1, INTERPRET,
                                  TMA)  # fmt: skip
        acc, m_i, l_i = _fwd_loop(nfull, count, q, acc, m_i, l_i, map_row, smc, smk, k_base, v_base, skn, svn, KD, VD,
                                  kv_row, offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK,
                                  qk_scale, D, DV, BLOCK_N, CAUSAL, HAS_LAYOUT, PREC, EVEN, 2, INTERPRET,
                                  TMA)  # fmt: skip
    else:
        acc, m_i, l_i = _fwd_loop(0, count, q, acc, m_i, l_i, map_row, smc, smk, k_base, v_base, skn, svn, KD, VD,
                                  kv_row, offs_m, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK,
                                  qk_scale, D, DV, BLOCK_N, CAUSAL, HAS_LAYOUT, PREC, EVEN, 0, INTERPRET,
                                  TMA)  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a fully masked row gives zeros, as the reference does
    omask = row_ok[:, None] & (offs_dv[None, :] < DV)
    if STORE_O:
        tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
                 mask=omask)  # fmt: skip
    if STORE_LSE:  # natural-log logsumexp of the scaled logits; -inf for a row that sees nothing
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + bh * SQ + offs_m, lse, mask=row_ok)
    if WITH_DO:  # the backward's delta = rowsum(O * dO), from the fp32 O before it is rounded
        do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_dv[None, :] * sgd, mask=omask, other=0.0)
        tl.store(DELTA + bh * SQ + offs_m, tl.sum(out * do.to(tl.float32), 1), mask=row_ok)


def tiled_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    mask: tuple,
    return_lse: bool = False,
    grad_out: torch.Tensor | None = None,
    store_out: bool = True,
    config: tuple[int, int, int] | None = None,
    full_counts: torch.Tensor | None = None,
    op: str = "tiled_attention",
    tma: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(out [B, H, Sq, Dv] or None, lse f32 [B, H, Sq] or None, delta f32 [B, H, Sq] or None) of attention over the
    tiles the block map lists. `mask` is `mask_key(attrs)`. full_counts (from `split_block_map`) says the rows list
    their FULL tiles first, that many of them. With grad_out, also delta = rowsum(out * grad_out), the
    backward's preprocessing; store_out=False skips writing out (the backward needs only lse and delta).
    config = (BLOCK_M, num_warps, num_stages) overrides `fwd_config` (benchmarks). tma: k/v tiles through tensor
    descriptors (None: where `tma_ok` allows it and USE_TMA says so; True where it does not allow it is an error)."""
    check_inputs(op, q, k, v, scale)
    check_tile(op, "block_q", block_q)
    check_tile(op, "block_k", block_k)
    b, h, sq, d = q.shape
    skv, dv = k.shape[2], v.shape[3]
    bm = block_map.shape[0]
    if bm not in (1, b) or block_map.shape[1] != cdiv(sq, block_q) or counts.shape != block_map.shape[:2]:
        raise AttentionKernelError(
            f"{op}: block map {tuple(block_map.shape)} / counts {tuple(counts.shape)} do not fit {sq} queries in "
            f"tiles of {block_q} and batch {b}"
        )
    bd, bdv = pow2(d), pow2(dv)
    block_m, warps, stages = config or fwd_config(max(bd, bdv), block_q, block_k, q.element_size())
    if block_q % block_m:
        raise AttentionKernelError(f"{op}: BLOCK_M={block_m} does not divide block_q={block_q}")
    dev = q.device
    out = torch.empty((b, h, sq, dv), dtype=q.dtype, device=dev) if store_out else None
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=dev) if return_lse else None
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=dev) if grad_out is not None else None
    if sq == 0:
        return out, lse, delta
    causal, window, sinks, lb, _ = mask
    layout = layout_bitmap(sq, skv, mask, str(dev))
    o_ = out if out is not None else q  # an unused pointer argument still needs a tensor
    g_ = grad_out if grad_out is not None else q
    even = d == bd and dv == bdv and skv % block_k == 0
    allowed = tma_ok(k, v, block_k, even)
    use_tma = (USE_TMA and allowed) if tma is None else tma
    if use_tma and not allowed:
        raise AttentionKernelError(f"{op}: tma=True needs contiguous k/v, whole tiles and 16-byte rows on sm_90+")
    kd = TensorDescriptor.from_tensor(k.view(-1, d), [block_k, d]) if use_tma else None
    vd = TensorDescriptor.from_tensor(v.view(-1, dv), [block_k, dv]) if use_tma else None
    grid = (b * h, triton.cdiv(sq, block_m))
    _fwd_kernel[grid](
        q, k, v, kd, vd, o_, lse if lse is not None else q, g_, delta if delta is not None else q,
        block_map, counts, full_counts if full_counts is not None else counts, layout if layout is not None else counts,
        *q.stride(), *k.stride(), *v.stride(), *o_.stride(), *g_.stride(), *block_map.stride(), *counts.stride(),
        h, h // k.shape[1], sq, skv, window, sinks, max(lb, 1), layout.shape[1] if layout is not None else 1,
        scale * LOG2E,
        D=d, DV=dv, BD=bd, BDV=bdv, BLOCK_M=block_m, BLOCK_N=block_k, SUB=block_q // block_m,
        CAUSAL=causal, HAS_LAYOUT=layout is not None, MAP_BATCHED=bm > 1,
        STORE_O=out is not None, STORE_LSE=lse is not None, WITH_DO=delta is not None, PREC=dot_precision(q.dtype),
        INTERPRET=INTERPRET, EVEN=even, SPLIT=full_counts is not None, TMA=kd is not None,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse, delta


# (block_q, block_k) of the maps the launchers build themselves (`attention`, `block_sparse_attention`). Measured on
# the H100 (bench/attention_cuda_notes.md): 64 x 64 with 4 warps runs two programs per SM, whose softmax and matrix
# phases overlap; it ties 128 x 128 (which spills) on causal and wastes least on a sliding window's diagonal bands.
DENSE_TILES = (64, 64)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: dict, op: str = "attention", **kw
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Attention with the dense attributes `a` (scale, causal, window, sinks[, layout]): the cached ascending map
    (one loop that branches on each tile's kind) + the kernel. split=True: a map with each row's FULL tiles first,
    walked in a loop without mask code (correct, not yet timed on the GPU: bench/attention_cuda_notes.md)."""
    mask = mask_key(a)
    bq, bk = kw.pop("tiles", None) or DENSE_TILES
    sq, skv, dev = q.shape[2], k.shape[2], str(q.device)
    if kw.pop("split", False):
        bmap, counts, full_counts = split_block_map(sq, skv, mask, bq, bk, dev)
    else:
        (bmap, counts), full_counts = block_map(sq, skv, mask, bq, bk, dev), None
    return tiled_attention_fwd(
        q, k, v, bmap, counts, scale=a["scale"], block_q=bq, block_k=bk, mask=mask, op=op, full_counts=full_counts, **kw
    )


# ---- launchers --------------------------------------------------------------------------------------------------


@launcher("attention_block_map")
def attention_block_map(q: torch.Tensor, k: torch.Tensor, **a) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-built (numpy) and cached per shape and attributes; q and k give only the lengths and device."""
    bq, bk = a["block_q"], a["block_k"]
    if bq <= 0 or bk <= 0:
        raise AttentionKernelError(f"attention_block_map: block_q and block_k must be > 0, got {bq} and {bk}")
    cols = map_columns(k.shape[2], a)
    return block_map(q.shape[2], k.shape[2], mask_key(a), bq, bk, str(q.device), columns=cols)


@launcher("tiled_attention")
def tiled_attention(q, k, v, block_map_, counts, **a) -> torch.Tensor:
    out, _, _ = tiled_attention_fwd(
        q, k, v, block_map_, counts, scale=a["scale"], block_q=a["block_q"], block_k=a["block_k"], mask=mask_key(a)
    )
    return out


@launcher("attention")
def attention(q, k, v, **a) -> torch.Tensor:
    return attention_fwd(q, k, v, a)[0]


@launcher("block_sparse_attention")
def block_sparse_attention(q, k, v, **a) -> torch.Tensor:
    return attention_fwd(q, k, v, a, op="block_sparse_attention")[0]


# The backward registers `attention_grad`; imported last because it uses this module's helpers.
from r1c.backends.cuda.kernels import flash_attention_bwd  # noqa: E402, F401
