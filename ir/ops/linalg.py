"""Matrix products."""

from __future__ import annotations

import numpy as np

from r1c.ir import dims
from r1c.ir.core import DimList
from r1c.ir.ops._util import broadcast_shapes, require_float, same_dim, same_dtype
from r1c.ir.ops.grad_util import unbroadcast
from r1c.ir.registry import Cost, OpDef, OpError, bytes_of, numel, register
from r1c.ir.types import TensorType


def _matmul_rule(ins, a):
    x, y = ins
    for t in ins:
        require_float("matmul", t)
    if x.rank < 2 or y.rank < 2:
        raise OpError(f"matmul: operands need rank >= 2, got {x} and {y}")
    same_dim("matmul", x.shape[-1], y.shape[-2], f"contraction ({x} @ {y})")
    batch = broadcast_shapes("matmul", x.shape[:-2], y.shape[:-2])
    return [TensorType(same_dtype("matmul", ins), batch + (x.shape[-2], y.shape[-1]))]


def _matmul_cost(ins, outs, a):
    k = ins[0].shape[-1]
    return Cost(2 * numel(outs[0]) * k, bytes_of(ins) + bytes_of(outs))


def _mT(fb, x):
    """Swap the last two axes."""
    r = x.type.rank
    return fb.transpose(x, perm=tuple(range(r - 2)) + (r - 1, r - 2))


def _matmul_vjp(fb, op, cts):
    a, b = op.operands
    (g,) = cts
    if g is None:
        return [None, None]
    return [unbroadcast(fb, fb.matmul(g, _mT(fb, b)), a.type), unbroadcast(fb, fb.matmul(_mT(fb, a), g), b.type)]


register(
    OpDef(
        "matmul",
        "Batched matrix product with broadcast batch dims: [..., M, K] @ [..., K, N].",
        ("a", "b"),
        _matmul_rule,
        lambda ins, a: [np.matmul(ins[0].astype(np.float64), ins[1].astype(np.float64))],
        _matmul_cost,
        vjp=_matmul_vjp,
    )
)


def _linear_rule(ins, a):
    x, w = ins
    for t in ins:
        require_float("linear", t)
    if w.rank != 2:
        raise OpError(f"linear: weight must be [out, in], got {w}")
    if x.rank < 1:
        raise OpError(f"linear: input must have rank >= 1, got {x}")
    same_dim("linear", x.shape[-1], w.shape[1], f"input features ({x}) vs weight in-features ({w})")
    return [TensorType(same_dtype("linear", ins), x.shape[:-1] + (w.shape[0],))]


def _linear_cost(ins, outs, a):
    return Cost(2 * numel(outs[0]) * ins[1].shape[1], bytes_of(ins) + bytes_of(outs))


def _rows(fb, x):
    """x [..., n] as a matrix [prod(...), n]: the leading axes of a linear are one batch."""
    return fb.reshape(x, shape=DimList((dims.mul(*x.type.shape[:-1]) if x.type.rank > 1 else 1, x.type.shape[-1])))


def _linear_vjp(fb, op, cts):
    x, w = op.operands
    (g,) = cts
    if g is None:
        return [None, None]
    dx = fb.linear(g, fb.transpose(w, perm=(1, 0)))  # g @ w
    dw = fb.matmul(fb.transpose(_rows(fb, g), perm=(1, 0)), _rows(fb, x))
    return [dx, dw]


register(
    OpDef(
        "linear",
        "x @ w^T with w laid out [out, in] (torch.nn.Linear without bias).",
        ("x", "w"),
        _linear_rule,
        lambda ins, a: [ins[0].astype(np.float64) @ ins[1].astype(np.float64).T],
        _linear_cost,
        vjp=_linear_vjp,
    )
)
