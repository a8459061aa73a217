"""A paged MLA latent cache (FlashMLA's layout): every layer's cache lives in one pool of fixed-size pages, and each
row of a step owns a list of pages (its block table), so rows of any length share one pool without padding.

- pool [L, P, T, D]: P pages of T tokens, D = kv_lora_rank + qk_rope_head_dim channels per token: the normalized
  kv latent followed by the rotated shared key, the two things MLA's absorbed attention reads (the per-head K/V
  expansion through kv_b_proj never reaches the cache).
- block_table [B, M] int32: row b's token at position p sits in page block_table[b, p // T], slot p % T. Entries a
  step does not reach may hold anything (an allocator marks them -1).
- start [B] int32: how many tokens row b has cached before this step; a step of S tokens covers positions
  start .. start + S - 1 and its queries attend causally to positions 0 .. start + s.

Quantized pools (the kv-quant pass) hold int8 or fp8e4m3 codes [L, P, T, D] and f32 scales [L, P, T, G]: one scale
per token per group of D / G consecutive channels, so each token is quantized on its own when written (per-token
scales are what a cache that grows one token at a time can keep; a rotary group apart from the latent keeps the
rotary key's precision when its range differs from the normalized latent's).
"""

from __future__ import annotations

import numpy as np

from r1c.ir import dims
from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim
from r1c.ir.ops.attention import _attention_ref
from r1c.ir.ops.cache import cache_vjp, check_layer, check_start
from r1c.ir.ops.quant import QUANT_DTYPES, dequantize_ref, quantize_ref
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, numel, register
from r1c.ir.types import DType, TensorType


def _check_table(op: str, table: TensorType, start: TensorType, batch) -> None:
    require_int(op, table, "block_table")
    require_rank(op, table, 2, "block_table [B, M]")
    same_dim(op, table.shape[0], batch, "batch of block_table and the step")
    check_start(op, start, batch)


def _check_pool(op: str, pool: TensorType, what: str) -> None:
    require_rank(op, pool, 4, f"{what} [L, P, T, D]")


def _check_scales(op: str, scales: TensorType, pool: TensorType) -> None:
    if pool.dtype not in QUANT_DTYPES:
        raise OpError(f"{op}: the pool must hold int8 or fp8e4m3 codes, got {pool}")
    if scales.dtype != DType.f32:
        raise OpError(f"{op}: scales must be f32, got {scales}")
    require_rank(op, scales, 4, "scales [L, P, T, G]")
    for i, what in ((0, "layers"), (1, "pages"), (2, "page size")):
        same_dim(op, scales.shape[i], pool.shape[i], f"{what} of scales and pool")
    g, d = scales.shape[3], pool.shape[3]
    if isinstance(g, int) and isinstance(d, int) and (g < 1 or d % g):
        raise OpError(f"{op}: {g} scale groups do not divide the pool's {d} channels")


def slots(op: str, table: np.ndarray, start: np.ndarray, steps: int, pages: int, page: int) -> list[np.ndarray]:
    """For each row, the (page, slot) flat index into a [P * T] view of every position 0 .. start + steps - 1,
    checked: the positions must fit in the row's block table and name pages that exist."""
    out = []
    for b, s in enumerate(int(x) for x in start):
        n = s + steps
        if s < 0:
            raise OpError(f"{op}: row {b} has a negative start {s}")
        if -(-n // page) > table.shape[1]:
            raise OpError(f"{op}: row {b} reaches position {n - 1}, past its block table of {table.shape[1]} pages")
        pos = np.arange(n)
        page_ids = table[b, pos // page].astype(np.int64)
        bad = (page_ids < 0) | (page_ids >= pages)
        if bad.any():
            p = int(pos[bad][0])
            raise OpError(f"{op}: row {b} position {p} maps to page {int(page_ids[bad][0])}, not one of {pages}")
        out.append(page_ids * page + pos % page)
    return out


# ---- writes ----


def _write_rule(ins, a):
    pool, new, table, start = ins
    op = "paged_write"
    _check_pool(op, pool, "pool")
    require_float(op, pool)
    require_rank(op, new, 3, "new [B, S, D]")
    if new.dtype != pool.dtype:
        raise OpError(f"{op}: new {new} must have the pool's dtype {pool.dtype}")
    same_dim(op, new.shape[2], pool.shape[3], "channels of new and pool")
    _check_table(op, table, start, new.shape[0])
    check_layer(op, pool, a["layer"])
    return [pool]


def _write_ref(ins, a):
    pool, new, table, start = ins
    out = pool.copy()
    layer = out[a["layer"]].reshape(-1, pool.shape[3])  # a view: [P * T, D]
    for b, idx in enumerate(slots("paged_write", table, start, new.shape[1], pool.shape[1], pool.shape[2])):
        layer[idx[-new.shape[1] :]] = new[b]
    return [out]


def _write_cost(ins, outs, a):
    return Cost(0, 2 * bytes_of([ins[1]]) + bytes_of(ins[2:]))  # in place: the new tokens are read and written


def _write_q_rule(ins, a):
    pool, scales, new, table, start = ins
    op = "paged_write_q"
    _check_pool(op, pool, "pool")
    _check_scales(op, scales, pool)
    require_float(op, new)
    require_rank(op, new, 3, "new [B, S, D]")
    same_dim(op, new.shape[2], pool.shape[3], "channels of new and pool")
    _check_table(op, table, start, new.shape[0])
    check_layer(op, pool, a["layer"])
    return [pool, scales]


def code_dtype(pool: np.ndarray) -> DType:
    """The code format of a quantized pool as the reference stores it: int8, or fp8 values held in float32."""
    return DType.int8 if pool.dtype == np.int8 else DType.fp8e4m3


def quantize_tokens(x: np.ndarray, dtype: DType, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [N, D] and scales [N, G] of tokens x [N, D]: one scale per token per group of D / G channels."""
    n, d = x.shape
    q, s = quantize_ref(x.reshape(n, groups, d // groups), dtype, 8, 1, "per_token")
    return q.reshape(n, d), s.reshape(n, groups)


def dequantize_tokens(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n, d = q.shape
    g = scales.shape[1]
    return dequantize_ref(q.reshape(n, g, d // g), scales[..., None]).reshape(n, d)


def _write_q_ref(ins, a):
    pool, scales, new, table, start = ins
    out, out_s = pool.copy(), scales.copy()
    layer, layer_s = out[a["layer"]].reshape(-1, pool.shape[3]), out_s[a["layer"]].reshape(-1, scales.shape[3])
    steps = new.shape[1]
    for b, idx in enumerate(slots("paged_write_q", table, start, steps, pool.shape[1], pool.shape[2])):
        q, s = quantize_tokens(np.asarray(new[b], np.float64), code_dtype(pool), scales.shape[3])
        layer[idx[-steps:]], layer_s[idx[-steps:]] = q, s
    return [out, out_s]


def _write_q_cost(ins, outs, a):
    pool, scales, new, table, start = ins
    tokens = numel(new) // new.shape[2]
    stored = numel(new) * pool.dtype.itemsize + tokens * scales.shape[3] * 4
    return Cost(4 * numel(new), bytes_of([new, table, start]) + stored)


# ---- attention ----


def _attention_rule(op: str, q: TensorType, pool: TensorType, table, start, w, a) -> list[TensorType]:
    require_rank(op, q, 4, "q [B, H, S, dn+dr]")
    require_float(op, q)
    require_rank(op, w, 2, "kv_b weight [H*(dn+dv), C]")
    if w.dtype != q.dtype:
        raise OpError(f"{op}: kv_b weight {w} must have q's dtype {q.dtype}")
    _check_pool(op, pool, "pool")
    b, h, _, dk = q.shape
    dn, dv = a["qk_nope_head_dim"], a["v_head_dim"]
    c = w.shape[1]
    channels = (pool.shape[3], c, dk)
    if all(isinstance(x, int) for x in channels) and pool.shape[3] != c + dk - dn:
        raise OpError(f"{op}: pool channels {pool.shape[3]} != latent rank {c} + rotary dim {dk - dn}")
    same_dim(op, w.shape[0], dims.mul(h, dn + dv), "kv_b weight rows and heads * (qk_nope_head_dim + v_head_dim)")
    _check_table(op, table, start, b)
    check_layer(op, pool, a["layer"])
    return [TensorType(q.dtype, (b, h, q.shape[2], dv))]


def _float_rule(ins, a):
    q, pool, table, start, w = ins
    if pool.dtype != q.dtype:
        raise OpError(f"paged_mla_attention: pool {pool} must have q's dtype {q.dtype}")
    return _attention_rule("paged_mla_attention", q, pool, table, start, w, a)


def _quant_rule(ins, a):
    q, pool, scales, table, start, w = ins
    _check_scales("paged_mla_attention_kvq", scales, pool)
    return _attention_rule("paged_mla_attention_kvq", q, pool, table, start, w, a)


def absorbed_mla(q: np.ndarray, kv: np.ndarray, w: np.ndarray, a: dict) -> np.ndarray:
    """Absorbed MLA of one row: q [H, S, dn+dr] over its cached tokens kv [n, C+dr] (latent | rotary key), the
    queries being the newest S of the n; q_nope goes through W_UK into latent space, the latent is the value, and
    W_UV maps the result back per head."""
    dn, dv = a["qk_nope_head_dim"], a["v_head_dim"]
    h, c = q.shape[0], w.shape[1]
    w = np.asarray(w, np.float64).reshape(h, dn + dv, c)
    q = np.asarray(q, np.float64)
    q_lat = np.einsum("hsd,hdc->hsc", q[..., :dn], w[:, :dn])
    qk = np.concatenate([q_lat, q[..., dn:]], axis=-1)[None]
    attrs = {"scale": a["scale"], "causal": True, "window": 0, "sinks": 0}
    (o,) = _attention_ref([qk, kv[None, None], kv[None, None, :, :c]], attrs)
    return np.einsum("hsc,hec->hse", o[0], w[:, dn:])


def _float_ref(ins, a):
    q, pool, table, start, w = ins
    layer = np.asarray(pool[a["layer"]], np.float64).reshape(-1, pool.shape[3])
    out = np.zeros((*q.shape[:3], a["v_head_dim"]))
    for b, idx in enumerate(slots("paged_mla_attention", table, start, q.shape[2], pool.shape[1], pool.shape[2])):
        out[b] = absorbed_mla(q[b], layer[idx], w, a)
    return [out]


def _quant_ref(ins, a):
    q, pool, scales, table, start, w = ins
    layer = pool[a["layer"]].reshape(-1, pool.shape[3])
    layer_s = scales[a["layer"]].reshape(-1, scales.shape[3])
    out = np.zeros((*q.shape[:3], a["v_head_dim"]))
    steps = q.shape[2]
    for b, idx in enumerate(slots("paged_mla_attention_kvq", table, start, steps, pool.shape[1], pool.shape[2])):
        out[b] = absorbed_mla(q[b], dequantize_tokens(layer[idx], layer_s[idx]), w, a)
    return [out]


def _attention_cost(q: TensorType, pool: TensorType, table: TensorType, w: TensorType, a: dict, extra: int) -> Cost:
    """An upper bound: every page of each row's block table is visible (the fill level is known at run time)."""
    b, h, sq, _ = q.shape
    c, d = w.shape[1], pool.shape[3]
    keys = table.shape[1] * pool.shape[2]
    absorb = 2 * b * h * sq * c * (a["qk_nope_head_dim"] + a["v_head_dim"])
    read = b * keys * d * pool.dtype.itemsize + extra
    return Cost(2 * b * h * sq * keys * (d + c) + absorb, read + bytes_of([q, w, table]))


def _float_cost(ins, outs, a):
    q, pool, table, start, w = ins
    return _attention_cost(q, pool, table, w, a, bytes_of(outs))


def _quant_cost(ins, outs, a):
    q, pool, scales, table, start, w = ins
    b, keys = q.shape[0], table.shape[1] * pool.shape[2]
    return _attention_cost(q, pool, table, w, a, bytes_of(outs) + b * keys * scales.shape[3] * 4)


ATTRS = {
    "layer": AttrSpec("int"),
    "scale": AttrSpec("float"),
    "qk_nope_head_dim": AttrSpec("int"),
    "v_head_dim": AttrSpec("int"),
}

register(
    OpDef(
        "paged_write",
        "The pool [L, P, T, D] with new [B, S, D] written into layer `layer` at row b's positions start[b] .. "
        "start[b] + S - 1, position p going to page block_table[b, p // T], slot p % T.",
        ("pool", "new", "block_table", "start"),
        _write_rule,
        _write_ref,
        _write_cost,
        {"layer": AttrSpec("int")},
        vjp=cache_vjp,
    )
)

register(
    OpDef(
        "paged_write_q",
        "paged_write into a quantized pool: each new token is quantized (symmetric, int8 or fp8e4m3 as the pool) "
        "with one f32 scale per group of D / G channels, codes into pool [L, P, T, D], scales into [L, P, T, G].",
        ("pool", "scales", "new", "block_table", "start"),
        _write_q_rule,
        _write_q_ref,
        _write_q_cost,
        {"layer": AttrSpec("int")},
        vjp=cache_vjp,
    )
)

register(
    OpDef(
        "paged_mla_attention",
        "Absorbed MLA of q [B, H, S, dn+dr] over layer `layer` of a paged latent pool [L, P, T, C+dr]: row b's "
        "queries sit at positions start[b] .. start[b] + S - 1 and see its positions up to their own; kv_b weight "
        "[H*(dn+dv), C] gives W_UK and W_UV; -> [B, H, S, dv].",
        ("q", "pool", "block_table", "start", "kv_b_weight"),
        _float_rule,
        _float_ref,
        _float_cost,
        ATTRS,
        vjp=cache_vjp,
    )
)

register(
    OpDef(
        "paged_mla_attention_kvq",
        "paged_mla_attention over a quantized pool (codes [L, P, T, D] and scales [L, P, T, G]), dequantized as read.",
        ("q", "pool", "scales", "block_table", "start", "kv_b_weight"),
        _quant_rule,
        _quant_ref,
        _quant_cost,
        ATTRS,
        vjp=cache_vjp,
    )
)
