"""Matrix products."""

from __future__ import annotations

import numpy as np

from r1c.ir.ops._util import broadcast_shapes, require_float, same_dim, same_dtype
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


register(
    OpDef(
        "matmul",
        "Batched matrix product with broadcast batch dims: [..., M, K] @ [..., K, N].",
        ("a", "b"),
        _matmul_rule,
        lambda ins, a: [np.matmul(ins[0].astype(np.float64), ins[1].astype(np.float64))],
        _matmul_cost,
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


register(
    OpDef(
        "linear",
        "x @ w^T with w laid out [out, in] (torch.nn.Linear without bias).",
        ("x", "w"),
        _linear_rule,
        lambda ins, a: [ins[0].astype(np.float64) @ ins[1].astype(np.float64).T],
        _linear_cost,
    )
)
