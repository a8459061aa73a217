"""DeepSeek-V3.2 sparse attention (DSA): each query attends only to the key positions its lightning indexer
selected (int32 indices [B, Sq, topk], -1 = no selection), intersected with the causal mask (queries aligned
to the end of the keys, as in `attention`); and its tiled form, whose block map depends on the indices."""

from __future__ import annotations

import numpy as np

from r1c.ir import registry
from r1c.ir.ops._util import require_int, require_rank, same_dim
from r1c.ir.ops.attention import attention_mask
from r1c.ir.ops.attention_tiled import (
    TILE_ATTRS,
    block_map_from_mask,
    check_block_map,
    check_tiles,
    dense_masked_attention,
    flash_attention,
    map_types,
    tile_count,
    tiled_flops,
    visited_tiles,
)
from r1c.ir.ops.grad_util import no_grad
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register


def _check_indices(op: str, q, k, indices) -> None:
    require_int(op, indices, "indices")
    require_rank(op, indices, 3, "indices [B, Sq, topk]")
    same_dim(op, indices.shape[0], q.shape[0], "batch of indices and q")
    same_dim(op, indices.shape[1], q.shape[2], "queries of indices and q")


def dsa_mask(indices: np.ndarray, skv: int) -> np.ndarray:
    """Element mask [B, Sq, Skv]: the selected keys that the causal mask also shows."""
    b, sq, _ = indices.shape
    if ((indices < -1) | (indices >= skv)).any():
        bad = indices[(indices < -1) | (indices >= skv)].flat[0]
        raise OpError(f"DSA index {bad} is out of range for {skv} keys (-1 means no selection)")
    selected = np.zeros((b, sq, skv + 1), dtype=bool)  # column skv catches the -1 entries, then is dropped
    np.put_along_axis(selected, np.where(indices < 0, skv, indices).astype(np.int64), True, axis=-1)
    return selected[..., :skv] & attention_mask(sq, skv, True, 0, 0)[None]


def _dense_rule(ins, a):
    q, k, v, indices = ins
    _check_indices("dsa_attention", q, k, indices)
    return registry.get("attention").infer([q, k, v], {**a, "causal": True, "window": 0, "sinks": 0})


def _dense_ref(ins, a):
    q, k, v, indices = ins
    return [dense_masked_attention(q, k, v, dsa_mask(indices, k.shape[2]), a["scale"])]


def _dense_cost(ins, outs, a):
    q, k, v, indices = ins
    b, h, sq, dk = q.shape
    return Cost(2 * b * h * sq * min(indices.shape[2], k.shape[2]) * (dk + v.shape[3]), bytes_of(ins) + bytes_of(outs))


def _no_vjp(fb, op, cts):
    raise NotImplementedError(f"{op.name} has no VJP: there is no DSA attention backward op yet")


register(
    OpDef(
        "dsa_attention",
        "DeepSeek-V3.2 sparse attention: softmax(q k^T * scale) v over the keys listed in indices [B, Sq, topk] "
        "(-1 = none) that the causal mask also shows; k/v heads shared as in attention.",
        ("q", "k", "v", "indices"),
        _dense_rule,
        _dense_ref,
        _dense_cost,
        {"scale": AttrSpec("float")},
        vjp=_no_vjp,
    )
)


def _map_rule(ins, a):
    indices, k = ins
    require_int("dsa_block_map", indices, "indices")
    require_rank("dsa_block_map", indices, 3, "indices [B, Sq, topk]")
    require_rank("dsa_block_map", k, 4, "k [B, Hkv, Skv, Dk]")
    check_tiles("dsa_block_map", a)
    q_like = indices.with_shape((indices.shape[0], 1, indices.shape[1], 1))  # map_types reads batch and Sq
    return map_types(indices.shape[0], q_like, tile_count(k.shape[2], a["block_k"]), a)


def _map_ref(ins, a):
    indices, k = ins
    nk = -(-k.shape[2] // a["block_k"])
    return list(block_map_from_mask(dsa_mask(indices, k.shape[2]), a["block_q"], a["block_k"], nk))


def _map_cost(ins, outs, a):
    return Cost(0, bytes_of(ins[:1]) + bytes_of(outs))  # k is read for its length only


register(
    OpDef(
        "dsa_block_map",
        "The per-batch block map (int32[B, n_q, n_k, 2] of (k_tile, kind), kind 1 full / 2 partial, -1 padded; "
        "counts int32[B, n_q]) of DSA attention with these indices, tiled by block_q x block_k.",
        ("indices", "k"),
        _map_rule,
        _map_ref,
        _map_cost,
        dict(TILE_ATTRS),
        vjp=no_grad,
    )
)


def _tiled_rule(ins, a):
    q, k, v, indices, block_map, counts = ins
    check_tiles("tiled_dsa_attention", a)
    out = _dense_rule([q, k, v, indices], {"scale": a["scale"]})
    check_block_map("tiled_dsa_attention", q, block_map, counts, a)
    return out


def _tiled_ref(ins, a):
    q, k, v, indices, block_map, counts = ins
    mask = dsa_mask(indices, k.shape[2])
    return [flash_attention(q, k, v, block_map, counts, mask, a["scale"], a["block_q"], a["block_k"])]


def _tiled_cost(ins, outs, a):
    # The visited tiles depend on the indices; the causal tiles bound them (the selection is causal).
    q, k, v = ins[:3]
    tiles = visited_tiles(q.shape[2], k.shape[2], {**a, "causal": True, "window": 0, "sinks": 0})
    return Cost(tiled_flops(q, v, tiles, a), bytes_of(ins) + bytes_of(outs))


register(
    OpDef(
        "tiled_dsa_attention",
        "dsa_attention(q, k, v, indices) computed tile by tile over the (k_tile, kind) pairs block_map lists "
        "(from dsa_block_map), with an online softmax; the selection mask is applied on partial tiles only.",
        ("q", "k", "v", "indices", "block_map", "counts"),
        _tiled_rule,
        _tiled_ref,
        _tiled_cost,
        {"scale": AttrSpec("float"), **TILE_ATTRS},
        vjp=_no_vjp,
    )
)
