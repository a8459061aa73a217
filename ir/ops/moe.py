"""Mixture-of-experts FFN: the per-expert computation that expert fusion rewrites into grouped GEMMs."""

from __future__ import annotations

import numpy as np

from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim, same_dtype
from r1c.ir.registry import Cost, OpDef, OpError, bytes_of, register


def _moe_rule(ins, a):
    x, idx, w, wg, wu, wd = ins
    require_rank("moe_experts", x, 2, "tokens x [T, D]")
    require_rank("moe_experts", idx, 2, "expert ids [T, K]")
    require_rank("moe_experts", w, 2, "routing weights [T, K]")
    require_int("moe_experts", idx, "expert ids")
    require_float("moe_experts", w)
    for t, what in ((wg, "w_gate [E, F, D]"), (wu, "w_up [E, F, D]"), (wd, "w_down [E, D, F]")):
        require_rank("moe_experts", t, 3, what)
    same_dtype("moe_experts", [x, wg, wu, wd])
    same_dim("moe_experts", idx.shape[0], x.shape[0], "tokens of ids and x")
    same_dim("moe_experts", w.shape[0], x.shape[0], "tokens of weights and x")
    same_dim("moe_experts", w.shape[1], idx.shape[1], "top-k of weights and ids")
    if wg.shape != wu.shape:
        raise OpError(f"moe_experts: w_gate {wg} and w_up {wu} differ")
    same_dim("moe_experts", wg.shape[2], x.shape[1], "model dim of w_gate and x")
    same_dim("moe_experts", wd.shape[0], wg.shape[0], "experts of w_down and w_gate")
    same_dim("moe_experts", wd.shape[1], x.shape[1], "model dim of w_down and x")
    same_dim("moe_experts", wd.shape[2], wg.shape[1], "ffn dim of w_down and w_gate")
    return [x]


def _moe_ref(ins, a):
    x, idx, w, wg, wu, wd = ins
    x, w = x.astype(np.float64), w.astype(np.float64)
    if idx.size and (idx.min() < 0 or idx.max() >= wg.shape[0]):
        raise OpError(f"moe_experts: expert id out of range [0, {wg.shape[0]})")
    out = np.zeros_like(x)
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        h = x[tok]
        g, u = h @ wg[e].astype(np.float64).T, h @ wu[e].astype(np.float64).T
        y = (g / (1.0 + np.exp(-g)) * u) @ wd[e].astype(np.float64).T
        np.add.at(out, tok, y * w[tok, slot][:, None])
    return [out]


def _moe_cost(ins, outs, a):
    x, idx, w, wg, wu, wd = ins
    t, k = idx.shape
    e, f, d = wg.shape
    touched = min(e, t * k)  # experts whose weights must be read at least once
    weight_bytes = touched * 3 * f * d * wg.dtype.itemsize
    return Cost(t * k * (6 * f * d + 6 * f), bytes_of([x, idx, w]) + weight_bytes + bytes_of(outs))


def _moe_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None] * 6
    dx, dw, dwg, dwu, dwd = fb.moe_experts_grad(*op.operands, g)
    return [dx, None, dw, dwg, dwu, dwd]


register(
    OpDef(
        "moe_experts",
        "sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t) with e = ids[t,k]: routed SwiGLU experts "
        "with stacked weights w_gate/w_up [E, F, D] and w_down [E, D, F].",
        ("x", "ids", "weights", "w_gate", "w_up", "w_down"),
        _moe_rule,
        _moe_ref,
        _moe_cost,
        vjp=_moe_vjp,
    )
)
