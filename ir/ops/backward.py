"""Backward ops: the gradients that are best one op each, so backends can lower them to dedicated kernels
(flash-attention backward, grouped-GEMM expert backward, fused norm backward, scatter-add).

Each is a normal op with a type rule, numpy reference and cost; the VJP rules in the forward ops' files emit
them. They are not themselves differentiated (no second derivatives yet): their rule raises, naming the op.
"""

from __future__ import annotations

import math

import numpy as np

from r1c.ir import registry
from r1c.ir.ops._util import require_float, require_int, require_rank
from r1c.ir.ops.attention import attention_probs, visible_pairs
from r1c.ir.ops.elementwise import _erf, _sigmoid
from r1c.ir.ops.nn import rope_cos_sin
from r1c.ir.registry import (
    AttrSpec,
    Cost,
    OpDef,
    OpError,
    bytes_of,
    elementwise_cost,
    per_input_cost,
    register,
    traffic_cost,
)
from r1c.ir.types import TensorType


def _no_second_order(fb, op, cts):
    raise NotImplementedError(f"second-order gradients are not supported: '{op.name}' has no VJP")


def _expect(op: str, got: TensorType, want: TensorType, what: str) -> None:
    if got != want:
        raise OpError(f"{op}: {what} must be {want}, got {got}")


def _f64(*xs: np.ndarray) -> list[np.ndarray]:
    return [x.astype(np.float64) for x in xs]


def _backward(name: str, doc: str, operands, type_rule, reference, cost, attrs=None) -> None:
    register(OpDef(name, doc, operands, type_rule, reference, cost, attrs or {}, vjp=_no_second_order))


# gelu: the exact-erf slope Phi(x) + x phi(x) needs erf, which no forward op exposes.
def _gelu_grad_rule(ins, a):
    x, g = ins
    require_float("gelu_grad", x)
    _expect("gelu_grad", g, x, "the cotangent")
    return [x]


def _gelu_grad_ref(ins, a):
    x, g = _f64(*ins)
    slope = 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return [g * slope]


_backward(
    "gelu_grad", "g * d gelu(x)/dx (exact erf form).", ("x", "g"), _gelu_grad_rule, _gelu_grad_ref, elementwise_cost(12)
)


# scatter_add: the transpose of gather (and of topk's values).
def _scatter_add_rule(ins, a):
    base, idx, upd = ins
    require_int("scatter_add", idx)
    _expect("scatter_add", upd, registry.get("gather").infer([base, idx], {"axis": a["axis"]})[0], "updates")
    return [base]


def _along_axis_index(idx: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx.astype(np.int64)
    return tuple(grid)


def _scatter_add_ref(ins, a):
    base, idx, upd = ins
    out = base.astype(np.float64).copy()
    ax = a["axis"] % base.ndim
    if idx.size and (idx.min() < 0 or idx.max() >= base.shape[ax]):
        raise OpError(f"scatter_add: index out of range [0, {base.shape[ax]})")
    np.add.at(out, _along_axis_index(idx, ax), upd.astype(np.float64))
    return [out]


_backward(
    "scatter_add",
    "base with updates[..i..] added at base[..indices[..i..]..] along `axis` (the transpose of gather).",
    ("base", "indices", "updates"),
    _scatter_add_rule,
    _scatter_add_ref,
    elementwise_cost(1),
    {"axis": AttrSpec("int")},
)


# index_add: the transpose of take and embedding (rows of a table selected by an index tensor of any rank).
def _index_add_rule(ins, a):
    base, idx, upd = ins
    require_int("index_add", idx)
    _expect("index_add", upd, registry.get("take").infer([base, idx], {"axis": a["axis"]})[0], "updates")
    return [base]


def _index_add_ref(ins, a):
    base, idx, upd = ins
    ax = a["axis"] % base.ndim
    if idx.size and (idx.min() < 0 or idx.max() >= base.shape[ax]):
        raise OpError(f"index_add: index out of range [0, {base.shape[ax]})")
    out = np.moveaxis(base.astype(np.float64).copy(), ax, 0)
    flat = upd.astype(np.float64).reshape(base.shape[:ax] + (idx.size,) + base.shape[ax + 1 :])
    np.add.at(out, idx.astype(np.int64).ravel(), np.moveaxis(flat, ax, 0))
    return [np.moveaxis(out, 0, ax)]


_backward(
    "index_add",
    "base with the slices updates[.., j.., ..] added at base[.., indices[j..], ..] along `axis` "
    "(the transpose of take and embedding).",
    ("base", "indices", "updates"),
    _index_add_rule,
    _index_add_ref,
    elementwise_cost(1),
    {"axis": AttrSpec("int")},
)


# slice_scatter: the transpose of slice (with a zero base).
_SLICE_ATTRS = {"axis": AttrSpec("int"), "start": AttrSpec("int"), "stop": AttrSpec("int"), "step": AttrSpec("int", 1)}


def _slice_scatter_rule(ins, a):
    base, upd = ins
    _expect("slice_scatter", upd, registry.get("slice").infer([base], a)[0], "updates")
    return [base]


def _slice_scatter_ref(ins, a):
    base, upd = ins
    out = base.astype(np.float64).copy()
    idx = [slice(None)] * out.ndim
    idx[a["axis"]] = slice(a["start"], a["stop"], a["step"])
    out[tuple(idx)] = upd
    return [out]


_backward(
    "slice_scatter",
    "base with base[start:stop:step] along `axis` replaced by updates (the transpose of slice).",
    ("base", "updates"),
    _slice_scatter_rule,
    _slice_scatter_ref,
    traffic_cost,
    _SLICE_ATTRS,
)


def _rmsnorm_grad_rule(ins, a):
    x, w, g = ins
    registry.get("rmsnorm").infer([x, w], a)
    _expect("rmsnorm_grad", g, x, "the cotangent")
    return [x, w]


def _rmsnorm_grad_ref(ins, a):
    x, w, g = _f64(*ins)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + a["eps"])
    xhat = x * r
    dxhat = g * w
    dx = r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return [dx, (g * xhat).reshape(-1, x.shape[-1]).sum(axis=0)]


_backward(
    "rmsnorm_grad",
    "Gradients (dx, dw) of rmsnorm(x, w) given the cotangent g of its result.",
    ("x", "w", "g"),
    _rmsnorm_grad_rule,
    _rmsnorm_grad_ref,
    per_input_cost(8),
    {"eps": AttrSpec("float", 1e-6)},
)


def _rope_grad_rule(ins, a):
    g, pos = ins
    return registry.get("rope").infer([g, pos], a)


def _rope_grad_ref(ins, a):
    g, pos = ins
    g = g.astype(np.float64)
    cos, sin = rope_cos_sin(g.shape[-1], pos, a)
    half = g.shape[-1] // 2
    g1, g2 = g[..., :half], g[..., half:]
    dx1, dx2 = g1 * cos + g2 * sin, g2 * cos - g1 * sin  # the transposed (inverse-angle) rotation
    if not a["interleaved"]:
        return [np.concatenate([dx1, dx2], axis=-1)]
    out = np.empty_like(g)
    out[..., 0::2], out[..., 1::2] = dx1, dx2  # back from [evens | odds] to interleaved pairs
    return [out]


_backward(
    "rope_grad",
    "The transpose of rope: the cotangent of x given the cotangent g of rope(x, positions) (same attributes).",
    ("g", "positions"),
    _rope_grad_rule,
    _rope_grad_ref,
    per_input_cost(6),
    dict(registry.get("rope").attrs),
)


def _xent_grad_rule(ins, a):
    logits, labels, g = ins
    registry.get("cross_entropy").infer([logits, labels], a)
    require_float("cross_entropy_grad", g)
    require_rank("cross_entropy_grad", g, 0, "the cotangent")
    return [logits]


def _xent_grad_ref(ins, a):
    logits, labels, g = ins
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    keep = labels != a["ignore_index"]
    rows = np.nonzero(keep)[0]
    p[rows, labels[rows].astype(np.int64)] -= 1.0
    p *= keep[:, None]
    return [p * (float(g) / max(int(keep.sum()), 1))]


_backward(
    "cross_entropy_grad",
    "g * (softmax(logits) - one_hot(labels)) / #kept rows, zero on rows whose label is `ignore_index`.",
    ("logits", "labels", "g"),
    _xent_grad_rule,
    _xent_grad_ref,
    per_input_cost(6),
    {"ignore_index": AttrSpec("int", -100)},
)


def _attention_grad_rule(ins, a):
    q, k, v, g = ins
    (out,) = registry.get("attention").infer([q, k, v], a)
    _expect("attention_grad", g, out, "the cotangent")
    return [q, k, v]


def _attention_grad_ref(ins, a):
    q, k, v, g = _f64(*ins)
    b, hkv, skv, _ = k.shape
    rep = q.shape[1] // hkv
    kr, vr = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    p = attention_probs(q, kr, a)
    dv = np.einsum("bhqk,bhqd->bhkd", p, g)
    dp = np.einsum("bhqd,bhkd->bhqk", g, vr)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * a["scale"]
    dq = np.einsum("bhqk,bhkd->bhqd", ds, kr)
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q)

    def fold(t: np.ndarray) -> np.ndarray:  # sum the query heads that share each key/value head
        return t.reshape(b, hkv, rep, skv, t.shape[-1]).sum(axis=2)

    return [dq, fold(dk), fold(dv)]


def _attention_grad_cost(ins, outs, a):
    q, k, v, g = ins
    b, h, sq, dk = q.shape
    visible = visible_pairs(sq, k.shape[2], a["causal"], a["window"], a["sinks"])
    # Recompute q k^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
    return Cost(2 * b * h * visible * (3 * dk + 2 * v.shape[3]), bytes_of(ins) + bytes_of(outs))


_backward(
    "attention_grad",
    "Gradients (dq, dk, dv) of attention(q, k, v) given the cotangent g of its result (same attributes); "
    "the probabilities are recomputed, as flash-attention's backward does.",
    ("q", "k", "v", "g"),
    _attention_grad_rule,
    _attention_grad_ref,
    _attention_grad_cost,
    dict(registry.get("attention").attrs),
)


def _moe_grad_rule(ins, a):
    *fwd, g = ins
    (out,) = registry.get("moe_experts").infer(fwd, a)
    _expect("moe_experts_grad", g, out, "the cotangent")
    x, _, w, wg, wu, wd = fwd
    return [x, w, wg, wu, wd]


def _moe_grad_ref(ins, a):
    x, idx, w, wg, wu, wd, g = ins
    x, w, wg, wu, wd, g = _f64(x, w, wg, wu, wd, g)
    dx, dw, dwg, dwu, dwd = (np.zeros_like(t) for t in (x, w, wg, wu, wd))
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        h = x[tok]
        gate, up = h @ wg[e].T, h @ wu[e].T
        s = _sigmoid(gate)
        act = gate * s * up
        dw[tok, slot] = np.sum(g[tok] * (act @ wd[e].T), axis=-1)
        dy = g[tok] * w[tok, slot][:, None]
        dwd[e] = dy.T @ act
        dact = dy @ wd[e]
        dgate = dact * up * s * (1.0 + gate * (1.0 - s))
        dup = dact * gate * s
        dwg[e], dwu[e] = dgate.T @ h, dup.T @ h
        np.add.at(dx, tok, dgate @ wg[e] + dup @ wu[e])
    return [dx, dw, dwg, dwu, dwd]


def _moe_grad_cost(ins, outs, a):
    x, idx, w, wg, wu, wd, g = ins
    t, k = idx.shape
    e, f, d = wg.shape
    # Recompute gate/up/down (6fd), then two GEMMs per weight (12fd) per routed token.
    return Cost(t * k * (18 * f * d + 12 * f), bytes_of(ins) + bytes_of(outs))


_backward(
    "moe_experts_grad",
    "Gradients (dx, dweights, dw_gate, dw_up, dw_down) of moe_experts given the cotangent g of its result.",
    ("x", "ids", "weights", "w_gate", "w_up", "w_down", "g"),
    _moe_grad_rule,
    _moe_grad_ref,
    _moe_grad_cost,
)
