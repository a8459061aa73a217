"""Tiled (flash-style) attention driven by a block map, and the ops that build the map.

The block map is what a Triton kernel with one program per q tile consumes:
  block_map int32[Bm, n_q, C, 2]: row t lists the non-empty k tiles of q tile t in ascending order as
      (k_tile, kind) with kind FULL=1 (every element visible: no element mask) or PARTIAL=2 (apply the element
      mask); unused slots hold (-1, 0).
  counts int32[Bm, n_q]: how many slots of each row are used (the kernel's loop bound).
Bm is 1 when the mask is the same for every batch row (causal, window, sinks, block-sparse layouts) and B when it
depends on data (DeepSeek-V3.2 DSA, see dsa.py).

Tiles are padded, not required to divide S: n_q = ceil(Sq / block_q), n_k = ceil(Skv / block_k); a tile that
crosses the end of the sequence is PARTIAL (the kernel masks its loads). Dims are products of symbols, so
ceil(S / 64) of a symbolic S is spelled as the derived symbol `S_cdiv64` (see `tile_count`).

Masks: rows are query indices, columns key indices; causal aligns the queries to the end of the keys (as in
`attention`); `layout` (flat (q_block, k_block) pairs in units of `layout_block`) keeps only those blocks of
the mask (block-sparse attention), intersected with the causal/window/sinks mask.
"""

from __future__ import annotations

import numpy as np

from r1c.ir import dims, registry
from r1c.ir.dims import Dim
from r1c.ir.ops._util import require_int, require_rank, same_dim
from r1c.ir.ops.attention import attention_mask
from r1c.ir.ops.grad_util import no_grad
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register
from r1c.ir.types import DType, TensorType

FULL, PARTIAL = 1, 2

# The attributes that define a structured mask; `attention` has the first three.
MASK_ATTRS = {
    "causal": AttrSpec("bool", True),
    "window": AttrSpec("int", 0),
    "sinks": AttrSpec("int", 0),
    "layout_block": AttrSpec("int", 0),
    "layout": AttrSpec("ints", ()),
}
TILE_ATTRS = {"block_q": AttrSpec("int", 64), "block_k": AttrSpec("int", 64)}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_count(d: Dim, block: int) -> Dim:
    """Number of `block`-sized tiles along d (see dims.ceil_div for a symbolic d)."""
    return dims.ceil_div(d, block)


def check_tiles(op: str, a: dict) -> None:
    if a["block_q"] <= 0 or a["block_k"] <= 0:
        raise OpError(f"{op}: block_q and block_k must be > 0, got {a['block_q']} and {a['block_k']}")


def check_layout(op: str, a: dict) -> None:
    lay, lb = a["layout"], a["layout_block"]
    if lb < 0 or bool(lb) != bool(lay):
        raise OpError(f"{op}: a block-sparse layout needs both layout_block > 0 and a non-empty layout")
    if len(lay) % 2 or any(x < 0 for x in lay):
        raise OpError(f"{op}: layout must list (q_block, k_block) pairs of non-negative ints, got {list(lay)}")


def layout_mask(sq: int, skv: int, a: dict) -> np.ndarray:
    """Element mask [sq, skv] of the block-sparse layout (all True without one)."""
    lb = a["layout_block"]
    if not lb:
        return np.ones((sq, skv), dtype=bool)
    pairs = np.asarray(a["layout"], dtype=np.int64).reshape(-1, 2)
    blocks = np.zeros((cdiv(sq, lb), cdiv(skv, lb)), dtype=bool)
    inside = (pairs[:, 0] < blocks.shape[0]) & (pairs[:, 1] < blocks.shape[1])  # blocks past the end see nothing
    blocks[pairs[inside, 0], pairs[inside, 1]] = True
    return blocks[np.arange(sq) // lb][:, np.arange(skv) // lb]


def structured_mask(sq: int, skv: int, a: dict) -> np.ndarray:
    """The element mask [1, sq, skv] of causal/window/sinks/layout attributes."""
    return (attention_mask(sq, skv, a["causal"], a["window"], a["sinks"]) & layout_mask(sq, skv, a))[None]


def tile_any_all(mask: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of mask [Bm, sq, skv]: any element visible, every element visible (padding counts as hidden)."""
    bm, sq, skv = mask.shape
    nq, nk = cdiv(sq, bq), cdiv(skv, bk)
    padded = np.zeros((bm, nq * bq, nk * bk), dtype=bool)
    padded[:, :sq, :skv] = mask
    tiles = padded.reshape(bm, nq, bq, nk, bk)
    return tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))


def block_map_from_mask(mask: np.ndarray, bq: int, bk: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(block_map [Bm, n_q, columns, 2], counts [Bm, n_q]) of an element mask [Bm, sq, skv]."""
    visible, full = tile_any_all(mask, bq, bk)
    counts = visible.sum(axis=-1)
    if counts.size and counts.max() > columns:
        raise OpError(f"block map: a q tile has {counts.max()} non-empty k tiles, the map type holds {columns}")
    order = np.argsort(~visible, axis=-1, kind="stable")[..., :columns]  # non-empty k tiles first, ascending
    used = np.take_along_axis(visible, order, axis=-1)
    kinds = np.where(np.take_along_axis(full, order, axis=-1), FULL, PARTIAL)
    out = np.zeros((*counts.shape, columns, 2), dtype=np.int32)
    out[..., 0], out[..., 1] = -1, 0
    n = order.shape[-1]
    out[..., :n, 0] = np.where(used, order, -1)
    out[..., :n, 1] = np.where(used, kinds, 0)
    return out, counts.astype(np.int32)


def _layout_columns(a: dict) -> int:
    """Most k tiles any q tile of the pass's tiling touches inside the layout (the layout bounds every row)."""
    pairs = np.asarray(a["layout"], dtype=np.int64).reshape(-1, 2)
    extent = (pairs.max(axis=0) + 1) * a["layout_block"]
    mask = layout_mask(int(extent[0]), int(extent[1]), a)[None]
    visible, _ = tile_any_all(mask, a["block_q"], a["block_k"])
    return int(visible.sum(axis=-1).max())


def map_columns(skv: Dim, a: dict) -> Dim:
    """Slots per row of a structured block map: n_k, or the tightest bound independent of S when the mask has one."""
    nk = tile_count(skv, a["block_k"])
    bounds = []
    if a["layout_block"]:
        bounds.append(_layout_columns(a))
    if a["causal"] and a["window"]:
        bq, bk = a["block_q"], a["block_k"]
        # The window keys of one q tile span block_q + window - 1 positions; the sinks add their own tiles.
        bounds.append(cdiv(bq + a["window"] - 1, bk) + 1 + cdiv(a["sinks"], bk))
    # A bound is used even where n_k is smaller: the reference sees only concrete lengths, and must give the type
    # that a symbolic length got.
    return min(bounds) if bounds else nk


def visited_tiles(sq: int, skv: int, a: dict) -> int:
    """Non-empty (q tile, k tile) pairs of the causal/window/sinks mask in closed form (O(n_q), no element mask):
    the window keys of a q tile are one contiguous range, the sinks another one starting at key 0."""
    bq, bk = a["block_q"], a["block_k"]
    nq, nk = cdiv(sq, bq), cdiv(skv, bk)
    if not a["causal"]:
        return nq * nk
    t = np.arange(nq, dtype=np.int64)
    first = t * bq + (skv - sq)  # absolute position of the tile's first and last query
    last = np.minimum((t + 1) * bq, sq) - 1 + (skv - sq)
    hi = np.minimum(last, skv - 1)  # last visible key
    hi_tile = hi // bk
    if a["window"]:
        lo = np.maximum(first - a["window"] + 1, 0)
        lo_tile = lo // bk
        sink_end = np.minimum(a["sinks"], hi + 1)  # sink keys are only visible up to the query's own position
        below = np.clip(np.minimum(-(-sink_end // bk), lo_tile), 0, None)  # sink tiles before the window's
        count = hi_tile - lo_tile + 1 + below
    else:
        count = hi_tile + 1
    return int(np.where(hi >= 0, count, 0).sum())


def tiled_cost_tiles(sq: int, skv: int, a: dict) -> int:
    if a["layout_block"]:
        visible, _ = tile_any_all(structured_mask(sq, skv, a), a["block_q"], a["block_k"])
        return int(visible.sum())
    return visited_tiles(sq, skv, a)


def flash_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    block_map: np.ndarray,
    counts: np.ndarray,
    mask: np.ndarray,
    scale: float,
    bq: int,
    bk: int,
) -> np.ndarray:
    """Online-softmax attention over the listed tiles only; the element mask [Bm, Sq, Skv] is read on PARTIAL
    tiles alone, so a tile wrongly marked FULL or left out changes the result."""
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    b, h, sq, _ = q.shape
    rep = h // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    bm, nq = counts.shape
    if block_map.shape[:2] != (bm, nq) or nq != cdiv(sq, bq) or bm not in (1, b) or mask.shape[0] != bm:
        raise OpError(
            f"block map of shape {block_map.shape} (counts {counts.shape}) does not fit {sq} queries in tiles of "
            f"{bq} and batch {b}"
        )
    out = np.zeros((b, h, sq, v.shape[3]))
    for mb in range(bm):
        rows = slice(None) if bm == 1 else slice(mb, mb + 1)
        for t in range(nq):
            q0, q1 = t * bq, min((t + 1) * bq, sq)
            qt = q[rows, :, q0:q1]
            m = np.full(qt.shape[:3] + (1,), -np.inf)
            l = np.zeros_like(m)  # noqa: E741  (the flash-attention name)
            acc = np.zeros(qt.shape[:3] + (v.shape[3],))
            for kt, kind in block_map[mb, t, : counts[mb, t]]:
                k0, k1 = kt * bk, min((kt + 1) * bk, k.shape[2])
                s = np.einsum("bhqd,bhkd->bhqk", qt, k[rows, :, k0:k1]) * scale
                if kind == PARTIAL:
                    s = np.where(mask[mb, q0:q1, k0:k1], s, -np.inf)
                elif kind != FULL:
                    raise OpError(f"block map entry ({kt}, {kind}) of q tile {t}: kind must be 1 or 2")
                m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
                m_safe = np.where(np.isfinite(m_new), m_new, 0.0)  # a row with nothing visible yet stays at 0
                alpha = np.exp(m - m_safe)
                p = np.exp(s - m_safe)
                l = l * alpha + p.sum(axis=-1, keepdims=True)  # noqa: E741
                acc = acc * alpha + np.einsum("bhqk,bhkd->bhqd", p, v[rows, :, k0:k1])
                m = m_new
            out[rows, :, q0:q1] = np.divide(acc, l, out=np.zeros_like(acc), where=l > 0)
    return out


def dense_masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """Plain softmax attention with an element mask [Bm, Sq, Skv] (Bm 1 or B); a fully masked row gives zeros."""
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.where(mask[:, None], np.einsum("bhqd,bhkd->bhqk", q, k) * scale, -np.inf)
    p = np.exp(s - np.where(np.isfinite(m := s.max(axis=-1, keepdims=True)), m, 0.0))
    denom = p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", np.divide(p, denom, out=np.zeros_like(p), where=denom > 0), v)


def check_block_map(op: str, q: TensorType, block_map: TensorType, counts: TensorType, a: dict) -> None:
    """The map types of a tiled op: int32[Bm, n_q, C, 2] and int32[Bm, n_q], Bm 1 or the batch."""
    require_rank(op, block_map, 4, "block_map [Bm, n_q, C, 2]")
    require_rank(op, counts, 2, "counts [Bm, n_q]")
    for t in (block_map, counts):
        require_int(op, t, "the block map")
    if block_map.shape[0] not in (1, q.shape[0]):
        raise OpError(f"{op}: block_map batch must be 1 or {q.shape[0]}, got {block_map.shape[0]}")
    same_dim(op, block_map.shape[1], tile_count(q.shape[2], a["block_q"]), "q tiles of block_map")
    same_dim(op, block_map.shape[3], 2, "last dim of block_map (k_tile, kind)")
    same_dim(op, counts.shape[0], block_map.shape[0], "batch of counts and block_map")
    same_dim(op, counts.shape[1], block_map.shape[1], "q tiles of counts and block_map")


def _dense_attrs(a: dict) -> dict:
    return {n: a[n] for n in ("scale", "causal", "window", "sinks")}


def map_types(bm: Dim, q: TensorType, columns: Dim, a: dict) -> list[TensorType]:
    nq = tile_count(q.shape[2], a["block_q"])
    return [TensorType(DType.int32, (bm, nq, columns, 2)), TensorType(DType.int32, (bm, nq))]


# ---- attention_block_map ----------------------------------------------------------------------------------------


def _block_map_rule(ins, a):
    q, k = ins
    require_rank("attention_block_map", q, 4, "q [B, H, Sq, Dk]")
    require_rank("attention_block_map", k, 4, "k [B, Hkv, Skv, Dk]")
    check_tiles("attention_block_map", a)
    check_layout("attention_block_map", a)
    if (a["window"] or a["sinks"]) and not a["causal"]:
        raise OpError("attention_block_map: window and sinks refine a causal mask; set causal=true")
    return map_types(1, q, map_columns(k.shape[2], a), a)


def _block_map_ref(ins, a):
    q, k = ins
    cols = map_columns(k.shape[2], a)
    return list(block_map_from_mask(structured_mask(q.shape[2], k.shape[2], a), a["block_q"], a["block_k"], cols))


def _map_cost(ins, outs, a):
    return Cost(0, bytes_of(outs))  # q and k are read for their shapes only


register(
    OpDef(
        "attention_block_map",
        "The block map (int32[1, n_q, C, 2] of (k_tile, kind), kind 1 full / 2 partial, -1 padded; and counts "
        "int32[1, n_q]) of the causal/window/sinks/block-sparse mask of attention(q, k, ...), tiled by "
        "block_q x block_k. q and k give only the sequence lengths.",
        ("q", "k"),
        _block_map_rule,
        _block_map_ref,
        _map_cost,
        {**TILE_ATTRS, **MASK_ATTRS},
        vjp=no_grad,
    )
)


# ---- tiled_attention --------------------------------------------------------------------------------------------


def _tiled_rule(ins, a):
    q, k, v, block_map, counts = ins
    check_tiles("tiled_attention", a)
    check_layout("tiled_attention", a)
    out = registry.get("attention").infer([q, k, v], _dense_attrs(a))
    check_block_map("tiled_attention", q, block_map, counts, a)
    return out


def _tiled_ref(ins, a):
    q, k, v, block_map, counts = ins
    mask = structured_mask(q.shape[2], k.shape[2], a)
    return [flash_attention(q, k, v, block_map, counts, mask, a["scale"], a["block_q"], a["block_k"])]


def tiled_flops(q: TensorType, v: TensorType, tiles: int, a: dict) -> int:
    """Two matmuls per visited tile: q k^T (Dk) and p v (Dv), every head."""
    b, h, _, dk = q.shape
    return 2 * b * h * tiles * a["block_q"] * a["block_k"] * (dk + v.shape[3])


def _tiled_cost(ins, outs, a):
    q, k, v = ins[:3]
    return Cost(tiled_flops(q, v, tiled_cost_tiles(q.shape[2], k.shape[2], a), a), bytes_of(ins) + bytes_of(outs))


def _tiled_vjp(fb, op, cts):
    """The gradient does not depend on the tiling: the dense backward op (flash-attention backward) computes it.
    A block-sparse layout has no dense backward op yet, which is an error naming it."""
    (g,) = cts
    if g is None:
        return [None] * 5
    if op.attrs["layout_block"]:
        raise NotImplementedError(
            "tiled_attention with a block-sparse layout has no VJP (no masked attention_grad); "
            "run `grad` before sparse-attention-tiling"
        )
    q, k, v = op.operands[:3]
    return [*fb.attention_grad(q, k, v, g, **_dense_attrs(op.attrs)), None, None]


register(
    OpDef(
        "tiled_attention",
        "attention(q, k, v) computed tile by tile (block_q x block_k) over the (k_tile, kind) pairs that "
        "block_map lists for each q tile, with an online softmax; the element mask (causal/window/sinks/layout) "
        "is applied on partial tiles only.",
        ("q", "k", "v", "block_map", "counts"),
        _tiled_rule,
        _tiled_ref,
        _tiled_cost,
        {"scale": AttrSpec("float"), **TILE_ATTRS, **MASK_ATTRS},
        vjp=_tiled_vjp,
    )
)


# ---- block_sparse_attention -------------------------------------------------------------------------------------


def _block_sparse_rule(ins, a):
    check_layout("block_sparse_attention", a)
    if not a["layout_block"]:
        raise OpError("block_sparse_attention: needs a layout (use attention for masks without one)")
    return registry.get("attention").infer(ins, _dense_attrs(a))


def _block_sparse_ref(ins, a):
    q, k, v = ins
    return [dense_masked_attention(q, k, v, structured_mask(q.shape[2], k.shape[2], a), a["scale"])]


def _block_sparse_cost(ins, outs, a):
    q, k, v = ins
    pairs = int(structured_mask(q.shape[2], k.shape[2], a).sum())
    return Cost(2 * q.shape[0] * q.shape[1] * pairs * (q.shape[3] + v.shape[3]), bytes_of(ins) + bytes_of(outs))


def _block_sparse_vjp(fb, op, cts):
    raise NotImplementedError("block_sparse_attention has no VJP: there is no masked attention backward op yet")


register(
    OpDef(
        "block_sparse_attention",
        "attention(q, k, v) whose mask keeps only the (q_block, k_block) pairs listed in `layout` (flat pairs, "
        "blocks of layout_block x layout_block), intersected with the causal/window/sinks mask.",
        ("q", "k", "v"),
        _block_sparse_rule,
        _block_sparse_ref,
        _block_sparse_cost,
        {"scale": AttrSpec("float"), **MASK_ATTRS},
        vjp=_block_sparse_vjp,
    )
)
