"""The fused MoE ops of expert-fusion: moe_permute's sort/capacity semantics against a direct loop, and every
VJP checked by the adjoint identity <ct, f(v)> = <vjp(ct), v> (each op is linear in each float operand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c import build
from r1c.build import BuildError
from r1c.ir import registry
from r1c.ir.interpreter import run
from r1c.ir.types import DType, TensorType

FUSED_OPS = (
    "moe_permute",
    "moe_gather_rows",
    "moe_scatter_rows",
    "moe_unpermute",
    "grouped_matmul",
    "grouped_matmul_wgrad",
)


def _permute(x: np.ndarray, ids: np.ndarray, e: int, shared: int = 0, cf: float = 0.0) -> list[np.ndarray]:
    attrs = {"num_experts": e, "num_shared": shared, "capacity_factor": cf}
    return registry.get("moe_permute").reference([x, ids], attrs)


def _kept_by_loop(ids: np.ndarray, e: int, shared: int, cf: float) -> list[list[tuple[int, int]]]:
    """Per expert, the (token, slot) pairs a capacity implementation keeps, walking tokens in order."""
    t, k = ids.shape
    cap = math.ceil(cf * t * (k - shared) / (e - shared)) if cf > 0 else t * k
    kept: list[list[tuple[int, int]]] = [[] for _ in range(e)]
    for tok in range(t):
        for slot in range(k):
            ex = int(ids[tok, slot])
            if ex >= e - shared or len(kept[ex]) < cap:
                kept[ex].append((tok, slot))
    return kept


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 9),
    k=st.integers(1, 3),
    e=st.integers(2, 6),
    shared=st.integers(0, 1),
    cf=st.sampled_from([0.0, 0.5, 1.0, 1.25, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_permute_matches_a_capacity_loop(t: int, k: int, e: int, shared: int, cf: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, e - shared, (t, k))
    if shared:
        ids[:, -1] = e - 1  # the shared slot
    x = rng.standard_normal((t, 5))
    x_sorted, offsets, row_of = _permute(x, ids.astype(np.int32), e, shared, cf)
    kept = _kept_by_loop(ids, e, shared, cf)
    assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(p) for p in kept])]).tolist()
    want_rows = np.full((t, k), -1)
    for ex, pairs in enumerate(kept):
        for i, (tok, slot) in enumerate(pairs):
            want_rows[tok, slot] = offsets[ex] + i
    np.testing.assert_array_equal(row_of, want_rows)
    for tok, slot in zip(*np.nonzero(want_rows >= 0)):
        np.testing.assert_array_equal(x_sorted[want_rows[tok, slot]], x[tok])
    assert not x_sorted[offsets[-1] :].any()  # padding rows are zero


def test_permute_rejects_bad_ids_and_attrs() -> None:
    with pytest.raises(registry.OpError, match="expert id out of range"):
        _permute(np.ones((2, 3)), np.array([[0], [4]], np.int32), 4)
    opdef = registry.get("moe_permute")
    x, ids = TensorType(DType.f32, ("T", 8)), TensorType(DType.int32, ("T", 2))
    with pytest.raises(registry.OpError, match="capacity_factor"):
        opdef.infer([x, ids], {"num_experts": 4, "num_shared": 0, "capacity_factor": -1.0})
    with pytest.raises(registry.OpError, match="num_shared"):
        opdef.infer([x, ids], {"num_experts": 4, "num_shared": 4, "capacity_factor": 0.0})
    out = opdef.infer([x, ids], {"num_experts": 4, "num_shared": 0, "capacity_factor": 0.0})
    assert [str(o) for o in out] == ["f32[T*2,8]", "int32[5]", "int32[T,2]"]


def test_grouped_matmul_type_and_offset_errors() -> None:
    opdef = registry.get("grouped_matmul")
    x, w = TensorType(DType.f32, ("R", 8)), TensorType(DType.f32, (2, 6, 8))
    with pytest.raises(registry.OpError, match="not all in group_offsets"):
        opdef.infer([x, w, TensorType(DType.int32, (5,))], {"first_expert": 3})
    with pytest.raises(registry.OpError, match="contraction"):
        opdef.infer([x, TensorType(DType.f32, (2, 6, 7)), TensorType(DType.int32, (5,))], {"first_expert": 0})
    with pytest.raises(registry.OpError, match="non-decreasing"):
        opdef.reference([np.ones((4, 8)), np.ones((2, 6, 8)), np.array([0, 3, 2])], {"first_expert": 0})


def test_grouped_matmul_rows_outside_the_groups_are_zero() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 4)), rng.standard_normal((2, 3, 4))
    offsets = np.array([0, 1, 3, 6, 7])
    (out,) = registry.get("grouped_matmul").reference([x, w, offsets], {"first_expert": 1})
    np.testing.assert_allclose(out[1:3], x[1:3] @ w[0].T)
    np.testing.assert_allclose(out[3:6], x[3:6] @ w[1].T)
    assert not out[:1].any() and not out[6:].any()


# ---- VJPs: the adjoint identity on random data ----


def _routing(rng: np.random.Generator, t: int, k: int, e: int, cf: float) -> tuple[np.ndarray, np.ndarray]:
    """(group_offsets, row_of) of a random routing, with dropped pairs when cf > 0."""
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    _, offsets, row_of = _permute(np.ones((t, 1)), ids, e, 0, cf)
    return offsets.astype(np.int32), row_of.astype(np.int32)


def _cases(rng: np.random.Generator) -> dict[str, tuple[list[np.ndarray], dict]]:
    t, k, e, d, n = 5, 2, 3, 4, 6
    offsets, row_of = _routing(rng, t, k, e, cf=0.7)  # some pairs drop: -1 rows must get no gradient
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    r = t * k
    f = rng.standard_normal
    return {
        "moe_permute": ([f((t, d)), ids], {"num_experts": e, "num_shared": 0, "capacity_factor": 0.7}),
        "moe_gather_rows": ([f((r, d)), row_of], {}),
        "moe_scatter_rows": ([f((t, k, d)), row_of], {}),
        "moe_unpermute": ([f((r, d)), row_of, f((t, k))], {}),
        "grouped_matmul": ([f((r, d)), f((2, n, d)), offsets], {"first_expert": 1}),
        "grouped_matmul_wgrad": ([f((r, n)), f((r, d)), offsets], {"first_expert": 1, "num_experts": 2}),
    }


def _vjp_module(opname: str, arrays: list[np.ndarray], attrs: dict, cts: list[np.ndarray]):
    def ty(a: np.ndarray) -> TensorType:
        return build.tensor("f32" if a.dtype.kind == "f" else "int32", list(a.shape))

    mb = build.ModuleBuilder("vjp")
    args = {f"a{i}": ty(a) for i, a in enumerate(arrays)} | {f"ct{i}": ty(c) for i, c in enumerate(cts)}
    fb = mb.function("forward", **args)
    results = fb.op(opname, *fb.args[: len(arrays)], **attrs)
    results = results if isinstance(results, tuple) else (results,)
    op = fb.function.body[-1]
    ct_values = list(fb.args[len(arrays) :]) + [None] * (len(results) - len(cts))
    grads = registry.get(opname).vjp(fb, op, ct_values)
    assert len(grads) == len(op.operands)
    for g, v in zip(grads, op.operands):
        if v.type.dtype.is_float:
            assert g is not None and g.type == v.type, f"{opname}: cotangent {g} for operand {v}: {v.type}"
        else:
            assert g is None
    fb.ret(*results[: len(cts)], *(g for g in grads if g is not None))
    return mb.build(), [i for i, g in enumerate(grads) if g is not None]


@pytest.mark.parametrize("opname", FUSED_OPS)
def test_vjp_is_the_adjoint(opname: str) -> None:
    rng = np.random.default_rng(7)
    arrays, attrs = _cases(rng)[opname]
    out_types = registry.get(opname).reference(arrays, attrs)
    cts = [rng.standard_normal(out_types[0].shape)]  # only the first result is float
    module, diff = _vjp_module(opname, [a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays], attrs, cts)
    for pos, i in enumerate(diff):
        v = rng.standard_normal(arrays[i].shape).astype(np.float32)
        inputs = [v if j == i else a for j, a in enumerate(arrays)] + cts
        outs = run(module, inputs, {})
        lhs = float(np.sum(cts[0] * outs[0]))
        rhs = float(np.sum(outs[1 + pos] * v))
        scale = float(np.sum(np.abs(cts[0] * outs[0]))) + 1e-12
        assert abs(lhs - rhs) <= 1e-5 * scale, f"{opname} operand {i}: <ct, f(v)> = {lhs}, <vjp, v> = {rhs}"


def test_every_fused_op_has_a_vjp_and_a_cost() -> None:
    for name in FUSED_OPS:
        assert registry.get(name).vjp is not None, name


def test_unpermute_needs_one_dtype() -> None:
    mb = build.ModuleBuilder("m")
    fb = mb.function(
        "forward",
        y=build.tensor("f32", ["T*2", 4]),
        rows=build.tensor("int32", ["T", 2]),
        w=build.tensor("bf16", ["T", 2]),
    )
    with pytest.raises(BuildError, match="dtypes differ"):
        fb.moe_unpermute(*fb.args)


def test_grouped_matmul_cost_counts_the_expected_rows() -> None:
    """A dispatch over a share of the experts counts that share of the rows; all dispatches add up to R rows."""
    cost = registry.get("grouped_matmul").cost
    x, offsets = TensorType(DType.f32, (64, 16)), TensorType(DType.int32, (9,))
    whole = cost([x, TensorType(DType.f32, (8, 32, 16)), offsets], [TensorType(DType.f32, (64, 32))], {})
    half = cost([x, TensorType(DType.f32, (4, 32, 16)), offsets], [TensorType(DType.f32, (64, 32))], {})
    assert whole.flops == 2 * 64 * 32 * 16 == 2 * half.flops


# ---- against torch: the fused ops and their VJPs equal torch autograd of a plain per-group implementation ----


def test_grouped_matmul_and_its_gradients_match_torch() -> None:
    import torch

    rng = np.random.default_rng(3)
    x, w, ct = rng.standard_normal((9, 4)), rng.standard_normal((3, 5, 4)), rng.standard_normal((9, 5))
    offsets = np.array([1, 3, 3, 7])  # an empty group, and rows outside every group
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    out = torch.zeros(9, 5, dtype=torch.float64)
    for i in range(3):
        lo, hi = offsets[i], offsets[i + 1]
        out = out.index_put((torch.arange(lo, hi),), tx[lo:hi] @ tw[i].T)
    (out * torch.tensor(ct)).sum().backward()
    (got,) = registry.get("grouped_matmul").reference([x, w, offsets], {"first_expert": 0})
    np.testing.assert_allclose(got, out.detach().numpy(), rtol=1e-12)
    (dx,) = registry.get("grouped_matmul").reference([ct, w.transpose(0, 2, 1), offsets], {"first_expert": 0})
    (dw,) = registry.get("grouped_matmul_wgrad").reference([ct, x, offsets], {"first_expert": 0, "num_experts": 3})
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-12)


def test_permute_unpermute_and_gradients_match_torch() -> None:
    import torch

    rng = np.random.default_rng(4)
    t, k, e, d = 6, 2, 3, 4
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    x, w, ct = rng.standard_normal((t, d)), rng.random((t, k)), rng.standard_normal((t, d))
    x_sorted, offsets, row_of = _permute(x, ids, e, cf=0.6)
    # torch: sort pairs by expert (stable), keep the first C per expert, scale each row and scatter back.
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    order = torch.sort(torch.tensor(ids.reshape(-1), dtype=torch.int64), stable=True).indices
    cap = math.ceil(0.6 * t * k / e)
    seen = [0] * e
    out = torch.zeros(t, d, dtype=torch.float64)
    for pair in order.tolist():
        tok, slot = divmod(pair, k)
        ex = int(ids[tok, slot])
        if seen[ex] < cap:
            seen[ex] += 1
            out = out.index_add(0, torch.tensor([tok]), (tw[tok, slot] * tx[tok])[None])
    (out * torch.tensor(ct)).sum().backward()
    (got,) = registry.get("moe_unpermute").reference([x_sorted, row_of, w], {})
    np.testing.assert_allclose(got, out.detach().numpy(), rtol=1e-12)
    # The VJP rules' chain (unpermute -> permute), evaluated with the ops' references, gives torch's gradients.
    ref = {n: registry.get(n).reference for n in ("moe_gather_rows", "moe_scatter_rows")}
    (dy,) = ref["moe_scatter_rows"]([ct[:, None, :] * w[:, :, None], row_of], {})
    (dx,) = ref["moe_gather_rows"]([dy, row_of], {})
    (rows,) = ref["moe_gather_rows"]([x_sorted, row_of], {})
    np.testing.assert_allclose(dx.sum(axis=1), tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose((rows * ct[:, None, :]).sum(axis=2), tw.grad.numpy(), rtol=1e-12)
