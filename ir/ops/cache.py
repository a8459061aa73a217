"""A KV cache for prefill and decode steps: write a step's keys/values into a stacked per-layer cache, and attend
over each row's cached prefix.

The cache of all layers is one tensor [L, B, Hkv, C, D] (C slots per row); `start` [B] holds how many tokens each
row has cached before this step. A step of S tokens writes them at slots start .. start + S - 1 of layer `layer`,
and its queries (positions start .. start + S - 1) attend causally to the row's first start + S slots. Prefill is a
step with start = 0. The ops are functional (the result is a new cache); the cuda runtime writes in place when the
written cache has no later reader (backends/cuda/lower.py).
"""

from __future__ import annotations

import numpy as np

from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim, same_dtype
from r1c.ir.ops.attention import _attention_ref
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register
from r1c.ir.types import TensorType


def check_layer(op: str, cache: TensorType, layer: int) -> None:
    n = cache.shape[0]
    if layer < 0 or (isinstance(n, int) and layer >= n):
        raise OpError(f"{op}: layer {layer} is out of range for a cache of {n} layers")


def check_start(op: str, start: TensorType, batch) -> None:
    require_int(op, start, "start")
    require_rank(op, start, 1, "start [B]")
    same_dim(op, start.shape[0], batch, "batch of start and the step")


def _rows(op: str, start: np.ndarray, steps: int, slots: int) -> list[int]:
    """Each row's start, checked: the step must fit in the cache."""
    out = [int(s) for s in start]
    for b, s in enumerate(out):
        if s < 0 or s + steps > slots:
            raise OpError(f"{op}: row {b} starts at {s} with {steps} new token(s), outside the cache's {slots} slots")
    return out


def _write_rule(ins, a):
    cache, new, start = ins
    require_float("cache_write", cache)
    require_rank("cache_write", cache, 5, "cache [L, B, Hkv, C, D]")
    require_rank("cache_write", new, 4, "new [B, Hkv, S, D]")
    same_dtype("cache_write", [cache, new])
    same_dim("cache_write", cache.shape[1], new.shape[0], "batch of cache and new")
    same_dim("cache_write", cache.shape[2], new.shape[1], "heads of cache and new")
    same_dim("cache_write", cache.shape[4], new.shape[3], "head dim of cache and new")
    check_start("cache_write", start, new.shape[0])
    check_layer("cache_write", cache, a["layer"])
    return [cache]


def _write_ref(ins, a):
    cache, new, start = ins
    out = cache.copy()
    for b, s in enumerate(_rows("cache_write", start, new.shape[2], cache.shape[3])):
        out[a["layer"], b, :, s : s + new.shape[2]] = new[b]
    return [out]


def _write_cost(ins, outs, a):
    return Cost(0, 2 * bytes_of([ins[1]]) + bytes_of([ins[2]]))  # in place: the new rows are read and written


def _attention_rule(ins, a):
    q, k, v, start = ins
    for t, what in zip(ins[:3], ("q [B, H, S, Dk]", "k_cache [L, B, Hkv, C, Dk]", "v_cache [L, B, Hkv, C, Dv]")):
        require_float("cached_attention", t)
        require_rank("cached_attention", t, 4 if t is q else 5, what)
    same_dtype("cached_attention", [q, k, v])
    for i, what in ((0, "layers"), (1, "batch"), (2, "heads"), (3, "slots")):
        same_dim("cached_attention", k.shape[i], v.shape[i], f"{what} of k_cache and v_cache")
    same_dim("cached_attention", q.shape[0], k.shape[1], "batch of q and the cache")
    same_dim("cached_attention", q.shape[3], k.shape[4], "head dim of q and k_cache")
    h, hkv = q.shape[1], k.shape[2]
    if isinstance(h, int) and isinstance(hkv, int) and (hkv == 0 or h % hkv):
        raise OpError(f"cached_attention: {h} query heads are not a multiple of {hkv} key/value heads")
    check_start("cached_attention", start, q.shape[0])
    check_layer("cached_attention", k, a["layer"])
    return [TensorType(q.dtype, (q.shape[0], h, q.shape[2], v.shape[4]))]


def _attention_ref_cached(ins, a):
    q, k, v, start = ins
    sq, layer = q.shape[2], a["layer"]
    attrs = {"scale": a["scale"], "causal": True, "window": 0, "sinks": 0}
    out = np.zeros((*q.shape[:3], v.shape[4]), dtype=np.float64)
    for b, s in enumerate(_rows("cached_attention", start, sq, k.shape[3])):
        n = s + sq  # the queries are the newest of the row's n cached tokens
        out[b] = _attention_ref([q[b : b + 1], k[layer, b : b + 1, :, :n], v[layer, b : b + 1, :, :n]], attrs)[0][0]
    return [out]


def _attention_cost(ins, outs, a):
    """An upper bound: every slot of the cache is visible (the fill level is known only at run time)."""
    q, k, v, _ = ins
    b, h, sq, dk = q.shape
    slots, dv = k.shape[3], v.shape[4]
    layer_kv = b * k.shape[2] * slots * (dk + dv) * k.dtype.itemsize  # one layer of K and V
    return Cost(2 * b * h * sq * slots * (dk + dv), bytes_of([q]) + layer_kv + bytes_of(outs))


def cache_vjp(fb, op, cotangents):
    """The VJP of every KV-cache op (contiguous and paged): an error, since a cache serves inference steps."""
    raise OpError(f"{op.name} is not differentiable: the KV cache serves inference steps; train on `forward`")


register(
    OpDef(
        "cache_write",
        "The cache [L, B, Hkv, C, D] with new [B, Hkv, S, D] written at slots start[b] .. start[b] + S - 1 of layer "
        "`layer` for each row b (start [B] int32); a step that does not fit in the C slots is an error.",
        ("cache", "new", "start"),
        _write_rule,
        _write_ref,
        _write_cost,
        {"layer": AttrSpec("int")},
        vjp=cache_vjp,
    )
)

register(
    OpDef(
        "cached_attention",
        "Causal attention of q [B, H, S, Dk] over layer `layer` of a KV cache [L, B, Hkv, C, D]: row b's queries "
        "sit at positions start[b] .. start[b] + S - 1 and see its first start[b] + S slots; grouped heads as in "
        "`attention`.",
        ("q", "k_cache", "v_cache", "start"),
        _attention_rule,
        _attention_ref_cached,
        _attention_cost,
        {"layer": AttrSpec("int"), "scale": AttrSpec("float")},
        vjp=cache_vjp,
    )
)
