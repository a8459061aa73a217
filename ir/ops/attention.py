"""Scaled dot-product attention with the masks DeepSeek models use."""

from __future__ import annotations

import numpy as np

from r1c.ir.ops._util import require_float, require_rank, same_dim, same_dtype
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register
from r1c.ir.types import TensorType


def _attention_rule(ins, a):
    q, k, v = ins
    for t, what in zip(ins, ("q [B, H, Sq, Dk]", "k [B, Hkv, Skv, Dk]", "v [B, Hkv, Skv, Dv]")):
        require_float("attention", t)
        require_rank("attention", t, 4, what)
    same_dtype("attention", ins)
    same_dim("attention", q.shape[0], k.shape[0], "batch of q and k")
    same_dim("attention", k.shape[0], v.shape[0], "batch of k and v")
    same_dim("attention", q.shape[3], k.shape[3], "head dim of q and k")
    same_dim("attention", k.shape[1], v.shape[1], "heads of k and v")
    same_dim("attention", k.shape[2], v.shape[2], "length of k and v")
    h, hkv = q.shape[1], k.shape[1]
    if isinstance(h, int) and isinstance(hkv, int) and (hkv == 0 or h % hkv):  # 0 kv heads: no ZeroDivisionError
        raise OpError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if a["window"] < 0 or a["sinks"] < 0:
        raise OpError("attention: window and sinks must be >= 0")
    if (a["window"] or a["sinks"]) and not a["causal"]:
        raise OpError("attention: window and sinks refine a causal mask; set causal=true")
    return [TensorType(q.dtype, (q.shape[0], h, q.shape[2], v.shape[3]))]


def attention_mask(sq: int, skv: int, causal: bool, window: int, sinks: int) -> np.ndarray:
    """mask[i, j]: query i (at absolute position i + skv - sq, the queries being the newest tokens) sees key j."""
    if not causal:
        return np.ones((sq, skv), dtype=bool)
    qpos = np.arange(sq)[:, None] + (skv - sq)
    kpos = np.arange(skv)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= (kpos > qpos - window) | (kpos < sinks)
    return mask


def attention_probs(q: np.ndarray, k: np.ndarray, a: dict) -> np.ndarray:
    """softmax(q k^T * scale + mask) [B, H, Sq, Skv], k already repeated to q's heads."""
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * a["scale"]
    mask = attention_mask(q.shape[2], k.shape[2], a["causal"], a["window"], a["sinks"])
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    return np.divide(p, denom, out=np.zeros_like(p), where=denom > 0)  # a fully masked row gives zeros, not NaN


def _attention_ref(ins, a):
    q, k, v = (t.astype(np.float64) for t in ins)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    return [np.einsum("bhqk,bhkd->bhqd", attention_probs(q, k, a), v)]


def visible_pairs(sq: int, skv: int, causal: bool, window: int, sinks: int) -> int:
    """Number of (query, key) pairs the mask keeps, in closed form (no sq x skv mask is built)."""
    if not causal:
        return sq * skv
    p = np.arange(sq, dtype=np.int64) + (skv - sq)  # absolute position of each query
    seen = np.clip(p + 1, 0, skv)
    if window:
        in_window = np.minimum(seen, window)
        sink_extra = np.clip(np.minimum(sinks, p - window + 1), 0, None)
        seen = in_window + sink_extra
    return int(seen.sum())


def _attention_cost(ins, outs, a):
    q, k, v = ins
    b, h, sq, dk = q.shape
    skv, dv = k.shape[2], v.shape[3]
    visible = visible_pairs(sq, skv, a["causal"], a["window"], a["sinks"])
    return Cost(2 * b * h * visible * (dk + dv), bytes_of(ins) + bytes_of(outs))


def _attention_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None, None]
    return list(fb.attention_grad(*op.operands, g, **op.attrs))


register(
    OpDef(
        "attention",
        "softmax(q k^T * scale + mask) v per head; grouped k/v heads are shared by consecutive query "
        "heads. causal aligns queries to the end of the keys; window>0 keeps the last `window` keys; the first `sinks` "
        "keys stay visible.",
        ("q", "k", "v"),
        _attention_rule,
        _attention_ref,
        _attention_cost,
        {
            "scale": AttrSpec("float"),
            "causal": AttrSpec("bool", True),
            "window": AttrSpec("int", 0),
            "sinks": AttrSpec("int", 0),
        },
        vjp=_attention_vjp,
    )
)
