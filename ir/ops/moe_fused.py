"""The fused MoE form that `expert-fusion` rewrites `moe_experts` into: token permutation (sort by expert),
grouped GEMMs over contiguous row groups, and the weighted combine back to token order.

Rows live in a "sorted" space of R = T*K rows (one per (token, slot) pair): `moe_permute` places the pairs
expert by expert, `group_offsets[e] .. group_offsets[e+1]` being expert e's rows, and records `row_of[t, k]`
(the row of pair (t, k), -1 when the pair was dropped by the capacity limit). Rows past the last offset are
padding and hold zeros. `moe_gather_rows` / `moe_scatter_rows` are the two primitive movements between the
token and row spaces; they are adjoint to each other, which is what keeps every VJP here inside this family
(grouped GEMM's gradients are grouped GEMMs).
"""

from __future__ import annotations

import math

import numpy as np

from r1c.ir import dims
from r1c.ir.core import DimList
from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim, same_dtype
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, register, traffic_cost
from r1c.ir.types import DType, TensorType


def _require_rows(op: str, rows: TensorType, row_of: TensorType) -> None:
    require_rank(op, row_of, 2, "row_of [T, K]")
    require_int(op, row_of, "row_of")
    same_dim(op, rows.shape[0], dims.mul(row_of.shape[0], row_of.shape[1]), "rows (T*K) of the sorted operand")


def _check_rows(op: str, row_of: np.ndarray, n_rows: int) -> None:
    if row_of.size and (row_of.min() < -1 or row_of.max() >= n_rows):
        raise OpError(f"{op}: row_of out of range [-1, {n_rows}): min {row_of.min()}, max {row_of.max()}")


def _check_offsets(op: str, offsets: np.ndarray, n_rows: int) -> None:
    if offsets[0] < 0 or offsets[-1] > n_rows or np.any(np.diff(offsets) < 0):
        raise OpError(f"{op}: group_offsets must be non-decreasing within [0, {n_rows}], got {offsets.tolist()}")


# ---- moe_permute: stable sort of the (token, slot) pairs by expert, with an optional capacity ----


def capacity(capacity_factor: float, tokens: int, routed_slots: int, routed_experts: int) -> int:
    """Rows each routed expert keeps: ceil(capacity_factor * T * K_routed / E_routed) (float arithmetic)."""
    return math.ceil(capacity_factor * tokens * routed_slots / routed_experts)


def _permute_rule(ins, a):
    x, ids = ins
    require_rank("moe_permute", x, 2, "tokens x [T, D]")
    require_rank("moe_permute", ids, 2, "expert ids [T, K]")
    require_float("moe_permute", x)
    require_int("moe_permute", ids, "expert ids")
    same_dim("moe_permute", ids.shape[0], x.shape[0], "tokens of ids and x")
    e, shared, cf = a["num_experts"], a["num_shared"], a["capacity_factor"]
    if e < 1 or not 0 <= shared < e:
        raise OpError(f"moe_permute: needs num_experts >= 1 and 0 <= num_shared < num_experts, got {e}, {shared}")
    if cf < 0 or not math.isfinite(cf):
        raise OpError(f"moe_permute: capacity_factor must be >= 0 (0: dropless), got {cf}")
    k = ids.shape[1]
    if isinstance(k, int) and k < shared:
        raise OpError(f"moe_permute: the last num_shared={shared} columns of ids {ids} are the shared slots")
    rows = dims.mul(x.shape[0], k)
    i32 = DType.int32
    return [x.with_shape((rows, x.shape[1])), TensorType(i32, (e + 1,)), TensorType(i32, ids.shape)]


def _permute_ref(ins, a):
    x, ids = ins
    t, k = ids.shape
    e, shared, cf = a["num_experts"], a["num_shared"], a["capacity_factor"]
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= e):
        raise OpError(f"moe_permute: expert id out of range [0, {e})")
    order = np.argsort(flat, kind="stable")  # by expert, then by (token, slot): token order within an expert
    if cf > 0:
        routed = e - shared
        sorted_ids = flat[order]
        first = np.searchsorted(sorted_ids, sorted_ids, side="left")
        rank = np.arange(flat.size) - first  # position within the expert's pairs, in token order
        order = order[(sorted_ids >= routed) | (rank < capacity(cf, t, k - shared, routed))]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat[order], minlength=e))])
    row_of = np.full(t * k, -1, np.int64)
    row_of[order] = np.arange(order.size)
    x_sorted = np.zeros((t * k, x.shape[1]), np.float64)
    x_sorted[: order.size] = x[order // k]
    return [x_sorted, offsets, row_of.reshape(t, k)]


def _permute_cost(ins, outs, a):
    return Cost(0, bytes_of(ins) + bytes_of(outs))


def _permute_vjp(fb, op, cts):
    g = cts[0]
    if g is None:
        return [None, None]
    row_of = op.results[2]
    return [fb.reduce_sum(fb.moe_gather_rows(g, row_of), axes=(1,), keepdims=False), None]


register(
    OpDef(
        "moe_permute",
        "Sort the T*K (token, slot) pairs by expert id (stable: token order within an expert). Results: "
        "x_sorted [T*K, D] (row of each kept pair = its token's x; padding rows after the last group are 0), "
        "group_offsets [E+1], row_of [T, K] (-1: dropped). capacity_factor > 0 keeps, per routed expert, the "
        "first ceil(capacity_factor*T*(K-num_shared)/(E-num_shared)) pairs in token order; the last num_shared "
        "experts are always-on shared experts and never drop.",
        ("x", "ids"),
        _permute_rule,
        _permute_ref,
        _permute_cost,
        {
            "num_experts": AttrSpec("int"),
            "num_shared": AttrSpec("int", 0),
            "capacity_factor": AttrSpec("float", 0.0),
        },
        vjp=_permute_vjp,
    )
)


# ---- row movement between token space [T, K, ...] and row space [T*K, ...] ----


def _gather_rows_rule(ins, a):
    y, row_of = ins
    require_rank("moe_gather_rows", y, 2, "rows y [T*K, D]")
    _require_rows("moe_gather_rows", y, row_of)
    return [y.with_shape((row_of.shape[0], row_of.shape[1], y.shape[1]))]


def _gather_rows(y: np.ndarray, row_of: np.ndarray) -> np.ndarray:
    _check_rows("moe_gather_rows", row_of, y.shape[0])
    out = y[np.maximum(row_of, 0)]
    out[row_of < 0] = 0.0
    return out


register(
    OpDef(
        "moe_gather_rows",
        "out[t, k] = y[row_of[t, k]] (0 where row_of is -1): the rows of each (token, slot) pair.",
        ("y", "row_of"),
        _gather_rows_rule,
        lambda ins, a: [_gather_rows(ins[0].astype(np.float64), ins[1])],
        traffic_cost,
        vjp=lambda fb, op, cts: [None if cts[0] is None else fb.moe_scatter_rows(cts[0], op.operands[1]), None],
    )
)


def _scatter_rows_rule(ins, a):
    z, row_of = ins
    require_rank("moe_scatter_rows", z, 3, "per-pair values z [T, K, D]")
    require_rank("moe_scatter_rows", row_of, 2, "row_of [T, K]")
    require_int("moe_scatter_rows", row_of, "row_of")
    same_dim("moe_scatter_rows", z.shape[0], row_of.shape[0], "tokens of z and row_of")
    same_dim("moe_scatter_rows", z.shape[1], row_of.shape[1], "slots of z and row_of")
    return [z.with_shape((dims.mul(z.shape[0], z.shape[1]), z.shape[2]))]


def _scatter_rows_ref(ins, a):
    z, row_of = ins
    t, k, d = z.shape
    _check_rows("moe_scatter_rows", row_of, t * k)
    out = np.zeros((t * k, d), np.float64)
    kept = row_of >= 0
    np.add.at(out, row_of[kept], z[kept].astype(np.float64))  # add: the exact transpose of moe_gather_rows
    return [out]


register(
    OpDef(
        "moe_scatter_rows",
        "out[row_of[t, k]] += z[t, k] into T*K zero rows (pairs with row_of -1 are skipped): the transpose of "
        "moe_gather_rows.",
        ("z", "row_of"),
        _scatter_rows_rule,
        _scatter_rows_ref,
        traffic_cost,
        vjp=lambda fb, op, cts: [None if cts[0] is None else fb.moe_gather_rows(cts[0], op.operands[1]), None],
    )
)


# ---- moe_unpermute: weighted combine of each token's rows ----


def _unpermute_rule(ins, a):
    y, row_of, w = ins
    require_rank("moe_unpermute", y, 2, "rows y [T*K, D]")
    require_float("moe_unpermute", y)
    _require_rows("moe_unpermute", y, row_of)
    require_rank("moe_unpermute", w, 2, "routing weights [T, K]")
    same_dtype("moe_unpermute", [y, w])
    same_dim("moe_unpermute", w.shape[0], row_of.shape[0], "tokens of weights and row_of")
    same_dim("moe_unpermute", w.shape[1], row_of.shape[1], "slots of weights and row_of")
    return [y.with_shape((row_of.shape[0], y.shape[1]))]


def _unpermute_ref(ins, a):
    y, row_of, w = ins
    rows = _gather_rows(y.astype(np.float64), row_of)
    return [np.einsum("tk,tkd->td", w.astype(np.float64), rows)]


def _unpermute_cost(ins, outs, a):
    t, k = ins[1].shape
    return Cost(2 * t * k * ins[0].shape[1], bytes_of(ins) + bytes_of(outs))


def _unpermute_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None, None]
    y, row_of, w = op.operands
    t, k = row_of.type.shape
    g3 = fb.reshape(g, shape=DimList((t, 1, y.type.shape[1])))
    dy = fb.moe_scatter_rows(fb.mul(g3, fb.reshape(w, shape=DimList((t, k, 1)))), row_of)
    dw = fb.reduce_sum(fb.mul(fb.moe_gather_rows(y, row_of), g3), axes=(2,), keepdims=False)
    return [dy, None, dw]


register(
    OpDef(
        "moe_unpermute",
        "out[t] = sum_k weights[t, k] * y[row_of[t, k]] (dropped pairs, row_of -1, add nothing): scatter the "
        "expert outputs back to token order and combine the slots.",
        ("y", "row_of", "weights"),
        _unpermute_rule,
        _unpermute_ref,
        _unpermute_cost,
        vjp=_unpermute_vjp,
    )
)


# ---- grouped GEMMs over the row groups ----


def _groups_rule(op: str, offsets: TensorType, first: int, n_groups: int) -> None:
    require_rank(op, offsets, 1, "group_offsets [E+1]")
    require_int(op, offsets, "group_offsets")
    if not isinstance(offsets.shape[0], int):
        raise OpError(f"{op}: group_offsets must have a static size, got {offsets}")
    if first < 0 or first + n_groups + 1 > offsets.shape[0]:
        raise OpError(f"{op}: experts {first}..{first + n_groups} are not all in group_offsets {offsets}")


def _groups(op: str, offsets: np.ndarray, n_rows: int, first: int, n_groups: int):
    _check_offsets(op, offsets, n_rows)
    for i in range(n_groups):
        yield i, slice(int(offsets[first + i]), int(offsets[first + i + 1]))


def _rows_share(rows: TensorType, offsets: TensorType, n_groups: int) -> float:
    """Expected rows of `n_groups` experts out of all: the sum over dispatches covering every expert is R."""
    return rows.shape[0] * n_groups / (offsets.shape[0] - 1)


def _gmm_rule(ins, a):
    x, w, offsets = ins
    require_rank("grouped_matmul", x, 2, "rows x [R, D]")
    require_rank("grouped_matmul", w, 3, "expert weights w [E, N, D]")
    require_float("grouped_matmul", x)
    same_dtype("grouped_matmul", [x, w])
    same_dim("grouped_matmul", w.shape[2], x.shape[1], "contraction dim of w and x")
    _groups_rule("grouped_matmul", offsets, a["first_expert"], w.shape[0])
    return [x.with_shape((x.shape[0], w.shape[1]))]


def _gmm_ref(ins, a):
    x, w, offsets = ins
    x, w = x.astype(np.float64), w.astype(np.float64)
    out = np.zeros((x.shape[0], w.shape[1]), np.float64)
    for i, rows in _groups("grouped_matmul", offsets, x.shape[0], a["first_expert"], w.shape[0]):
        out[rows] = x[rows] @ w[i].T
    return [out]


def _gmm_cost(ins, outs, a):
    x, w, offsets = ins
    e, n, d = w.shape
    rows = _rows_share(x, offsets, e)
    moved = round(rows * (d + n) * x.dtype.itemsize)
    return Cost(round(2 * rows * n * d), moved + bytes_of([w, offsets]))


def _gmm_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None, None]
    x, w, offsets = op.operands
    first = op.attrs["first_expert"]
    dx = fb.grouped_matmul(g, fb.transpose(w, perm=(0, 2, 1)), offsets, first_expert=first)
    dw = fb.grouped_matmul_wgrad(g, x, offsets, first_expert=first, num_experts=w.type.shape[0])
    return [dx, dw, None]


register(
    OpDef(
        "grouped_matmul",
        "out[r] = x[r] @ w[i]^T for the rows r in group_offsets[first_expert+i] .. group_offsets[first_expert+i+1] "
        "(i < w's E); all other rows are 0. FLOPs count the expected share E/(len(group_offsets)-1) of the rows.",
        ("x", "w", "group_offsets"),
        _gmm_rule,
        _gmm_ref,
        _gmm_cost,
        {"first_expert": AttrSpec("int", 0)},
        vjp=_gmm_vjp,
    )
)


def _wgrad_rule(ins, a):
    dy, x, offsets = ins
    require_rank("grouped_matmul_wgrad", dy, 2, "row cotangents dy [R, N]")
    require_rank("grouped_matmul_wgrad", x, 2, "rows x [R, D]")
    require_float("grouped_matmul_wgrad", x)
    same_dtype("grouped_matmul_wgrad", [dy, x])
    same_dim("grouped_matmul_wgrad", dy.shape[0], x.shape[0], "rows of dy and x")
    if a["num_experts"] < 1:
        raise OpError(f"grouped_matmul_wgrad: num_experts must be >= 1, got {a['num_experts']}")
    _groups_rule("grouped_matmul_wgrad", offsets, a["first_expert"], a["num_experts"])
    return [x.with_shape((a["num_experts"], dy.shape[1], x.shape[1]))]


def _wgrad_ref(ins, a):
    dy, x, offsets = (v.astype(np.float64) if v.dtype.kind == "f" else v for v in ins)
    out = np.zeros((a["num_experts"], dy.shape[1], x.shape[1]), np.float64)
    for i, rows in _groups("grouped_matmul_wgrad", offsets, x.shape[0], a["first_expert"], a["num_experts"]):
        out[i] = dy[rows].T @ x[rows]
    return [out]


def _wgrad_cost(ins, outs, a):
    dy, x, offsets = ins
    n, d = dy.shape[1], x.shape[1]
    rows = _rows_share(x, offsets, a["num_experts"])
    return Cost(round(2 * rows * n * d), round(rows * (n + d) * x.dtype.itemsize) + bytes_of([offsets, *outs]))


def _wgrad_vjp(fb, op, cts):
    (c,) = cts
    if c is None:
        return [None, None, None]
    dy, x, offsets = op.operands
    first = op.attrs["first_expert"]
    d_dy = fb.grouped_matmul(x, c, offsets, first_expert=first)
    d_x = fb.grouped_matmul(dy, fb.transpose(c, perm=(0, 2, 1)), offsets, first_expert=first)
    return [d_dy, d_x, None]


register(
    OpDef(
        "grouped_matmul_wgrad",
        "out[i] = sum over rows r of group first_expert+i of dy[r]^T x[r] ([num_experts, N, D]): the weight "
        "gradient of grouped_matmul.",
        ("dy", "x", "group_offsets"),
        _wgrad_rule,
        _wgrad_ref,
        _wgrad_cost,
        {"first_expert": AttrSpec("int", 0), "num_experts": AttrSpec("int")},
        vjp=_wgrad_vjp,
    )
)
