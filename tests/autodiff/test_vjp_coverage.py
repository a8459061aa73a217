"""Every registered op has a VJP rule (a new op without one fails here), non-differentiable ops say so by
returning None for every operand, and the backward ops check their operands and cost like any op."""

from __future__ import annotations

import numpy as np
import pytest

from r1c import build
from r1c.ir import registry, run
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType, tensor

NON_DIFFERENTIABLE = [
    "argmax",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_not",
    "one_hot",
    "iota",
    "param",
    "constant",
]
BACKWARD = [
    "gelu_grad",
    "scatter_add",
    "index_add",
    "slice_scatter",
    "rmsnorm_grad",
    "rope_grad",
    "cross_entropy_grad",
    "attention_grad",
    "moe_experts_grad",
]


@pytest.mark.parametrize("name", sorted(registry.all_ops()))
def test_every_op_has_a_vjp(name):
    assert callable(registry.get(name).vjp), f"op {name} has no VJP rule: add vjp= to its registration"


@pytest.mark.parametrize("name", NON_DIFFERENTIABLE)
def test_non_differentiable_ops_return_none(name):
    from r1c.ir.core import Op, Value

    opdef = registry.get(name)
    n = len(opdef.operands) - (1 if opdef.variadic else 0)
    fake = Op(name, tuple(Value(f"a{i}", tensor("f32", [2])) for i in range(n)), (Value("r", tensor("f32", [2])),))
    assert opdef.vjp(None, fake, [None]) == [None] * n


@pytest.mark.parametrize("name", BACKWARD)
def test_backward_ops_refuse_second_order(name):
    with pytest.raises(NotImplementedError, match=f"'{name}' has no VJP"):
        registry.get(name).vjp(None, type("O", (), {"name": name})(), [None])


def f32(*shape):
    return TensorType(DType.f32, shape)


def i32(*shape):
    return TensorType(DType.int32, shape)


@pytest.mark.parametrize(
    "name, types, attrs, match",
    [
        ("scatter_add", [f32(3, 4), i32(3, 2), f32(3, 3)], {"axis": 1}, "updates must be"),
        ("scatter_add", [f32(3, 4), f32(3, 2), f32(3, 2)], {"axis": 1}, "int32"),
        ("index_add", [f32(5, 4), i32(2, 3), f32(2, 4)], {"axis": 0}, "updates must be"),
        ("slice_scatter", [f32(6, 4), f32(2, 4)], {"axis": 0, "start": 0, "stop": 6, "step": 2}, "updates must be"),
        ("rmsnorm_grad", [f32(2, 4), f32(4), f32(2, 3)], {}, "cotangent must be"),
        ("rope_grad", [f32(2, 3, 1, 5), i32(2, 3)], {}, "even"),
        ("cross_entropy_grad", [f32(3, 5), i32(3), f32(3)], {}, "rank 0"),
        (
            "attention_grad",
            [f32(1, 2, 3, 4), f32(1, 1, 3, 4), f32(1, 1, 3, 2), f32(1, 2, 3, 4)],
            {"scale": 1.0},
            "cotangent must be",
        ),
        (
            "moe_experts_grad",
            [f32(3, 4), i32(3, 2), f32(3, 2), f32(5, 6, 4), f32(5, 6, 4), f32(5, 4, 6), f32(3, 5)],
            {},
            "cotangent must be",
        ),
        ("gelu_grad", [f32(3), f32(4)], {}, "cotangent must be"),
    ],
)
def test_backward_type_rules_reject_bad_operands(name, types, attrs, match):
    opdef = registry.get(name)
    with pytest.raises(OpError, match=match):
        opdef.infer(types, opdef.complete_attrs(attrs))


def test_backward_ops_run_and_cost_on_a_real_gradient_function():
    """Build a function using every backward op through the VJPs, run it, and check each op's cost rule."""
    from r1c.passes.grad import grad_function

    mb = build.ModuleBuilder("m")
    fb = mb.function("loss", ids=tensor("int32", [2, 3]), labels=tensor("int32", [6]))
    x = fb.embedding(fb.param("emb", tensor("f32", [7, 8])), fb.args[0])
    x = fb.rmsnorm(x, fb.param("n", tensor("f32", [8])))
    q = fb.rope(fb.reshape(x, shape=[2, 3, 2, 4]), fb.iota(fb.args[0], axis=1), scaling="yarn", factor=2.0)
    q = fb.transpose(q, perm=(0, 2, 1, 3))
    o = fb.attention(q, fb.slice(q, axis=1, start=0, stop=1), fb.slice(q, axis=1, start=1, stop=2), scale=0.5)
    t = fb.gelu(fb.reshape(fb.transpose(o, perm=(0, 2, 1, 3)), shape=[6, 8]))
    vals, ids = fb.topk(t, k=2)
    t = fb.moe_experts(
        t,
        ids,
        fb.softmax(vals),
        fb.param("wg", tensor("f32", [8, 3, 8])),
        fb.param("wu", tensor("f32", [8, 3, 8])),
        fb.param("wd", tensor("f32", [8, 8, 3])),
    )
    fb.ret(fb.cross_entropy(t, fb.args[1]))
    m = grad_function(mb.build(), "loss")
    body = m.functions["loss_grad"].body
    used = {op.name for op in body}
    assert set(BACKWARD) - used == set(), f"not exercised: {set(BACKWARD) - used}"
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(p.type.shape).astype(np.float32) for n, p in m.params.items()}
    outs = run(
        m,
        [rng.integers(0, 7, (2, 3)).astype(np.int32), rng.integers(0, 8, 6).astype(np.int32)],
        weights,
        function="loss_grad",
    )
    assert all(np.isfinite(o).all() for o in outs) and any(np.abs(o).max() > 0 for o in outs[1:])
    for op in body:  # every shape is static here, as cost rules require
        c = registry.get(op.name).cost([v.type for v in op.operands], [r.type for r in op.results], op.attrs)
        assert c.flops >= 0 and (c.bytes > 0 or op.name == "reshape"), (op.name, c)  # a reshape is free
