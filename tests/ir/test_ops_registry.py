"""Registry-wide checks: every registered op has a per-op test file that exercises it, every op carries its
documentation and rules, and bad arity/attributes are OpErrors that name the op."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1c.ir import registry
from r1c.ir.registry import OpError, UnknownOpError

HERE = Path(__file__).parent

# Where each op is checked against torch. A new op fails test_every_op_is_tested until it is added here
# together with a real test.
TESTED_IN = {
    **{
        n: "test_ops_elementwise.py"
        for n in [
            "neg",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "reciprocal",
            "abs",
            "square",
            "tanh",
            "sigmoid",
            "silu",
            "gelu",
            "relu",
            "softplus",
            "sin",
            "cos",
            "add",
            "sub",
            "mul",
            "div",
            "pow",
            "maximum",
            "minimum",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "logical_and",
            "logical_or",
            "logical_not",
            "where",
            "swiglu",
        ]
    },
    "matmul": "test_ops_linalg.py",
    "linear": "test_ops_linalg.py",
    **{
        n: "test_ops_reduce.py"
        for n in [
            "reduce_sum",
            "reduce_mean",
            "reduce_max",
            "reduce_min",
            "argmax",
            "softmax",
            "log_softmax",
            "cumsum",
            "topk",
        ]
    },
    **{
        n: "test_ops_shape.py"
        for n in ["reshape", "transpose", "concat", "slice", "broadcast_to", "gather", "take", "one_hot"]
    },
    **{n: "test_ops_nn.py" for n in ["embedding", "rmsnorm", "rope", "cross_entropy"]},
    "attention": "test_ops_attention.py",
    "cache_write": "test_ops_cache.py",
    "cached_attention": "test_ops_cache.py",
    "paged_write": "test_ops_paged.py",
    "paged_write_q": "test_ops_paged.py",
    "paged_mla_attention": "test_ops_paged.py",
    "paged_mla_attention_kvq": "test_ops_paged.py",
    "moe_experts": "test_ops_moe.py",
    **{n: "test_ops_structure.py" for n in ["param", "constant", "iota", "cast"]},
    # Backward ops: run by the VJP tests (against torch) and listed with their type-rule checks there.
    **{
        n: "../autodiff/test_vjp_coverage.py"
        for n in [
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
    },
    **{n: "../passes/test_kv_quant_ops.py" for n in ["quantize", "dequantize", "attention_kvq", "mla_attention_kvq"]},
    **{
        n: "../passes/test_sparse_attention_tiling.py"
        for n in [
            "attention_block_map",
            "tiled_attention",
            "block_sparse_attention",
            "dsa_attention",
            "dsa_block_map",
            "tiled_dsa_attention",
        ]
    },
    **{
        n: "../passes/test_expert_fusion_ops.py"
        for n in [
            "moe_permute",
            "moe_gather_rows",
            "moe_scatter_rows",
            "moe_unpermute",
            "grouped_matmul",
            "grouped_matmul_wgrad",
        ]
    },
    **{
        n: "../train/test_optim_ops.py"
        for n in ["adamw_update", "sgd_update", "global_norm", "clip_coef", "lr_schedule", "balance_bias_update"]
    },
}


def test_every_op_is_tested():
    ops = set(registry.all_ops())
    assert ops - set(TESTED_IN) == set(), "ops without a per-op test"
    assert set(TESTED_IN) - ops == set(), "tests for ops that are not registered"
    for name, file in TESTED_IN.items():
        text = (HERE / file).read_text()
        assert f'"{name}"' in text or f"{name}(" in text, f"{file} never mentions op {name}"


@pytest.mark.parametrize("name", sorted(registry.all_ops()))
def test_opdef_is_complete(name):
    opdef = registry.get(name)
    assert opdef.name == name
    assert opdef.doc and opdef.doc[-1] == "."
    assert callable(opdef.type_rule) and callable(opdef.reference) and callable(opdef.cost)
    for spec in opdef.attrs.values():
        if spec.default is not registry.REQUIRED and spec.default is not None:
            spec.check(name, "default", spec.default)  # defaults must satisfy their own kind


@pytest.mark.parametrize("name", sorted(set(registry.all_ops()) - {"param"}))
def test_wrong_arity_names_op(name):
    opdef = registry.get(name)
    n = len(opdef.operands) - (1 if opdef.variadic else 0)
    bad = n + 1 if not opdef.variadic else n - 1
    if bad < 0:
        pytest.skip(f"{name} takes any number of operands")
    from r1c.ir.types import DType, TensorType

    with pytest.raises(OpError, match=name):
        opdef.infer([TensorType(DType.f32, (2,))] * bad, opdef.complete_attrs(_required_attrs(name)))


def _required_attrs(name: str) -> dict:
    from r1c.ir.types import DType

    return {
        "reshape": {"shape": [2]},
        "transpose": {"perm": [0]},
        "concat": {"axis": 0},
        "slice": {"axis": 0, "start": 0, "stop": 1},
        "broadcast_to": {"shape": [2]},
        "gather": {"axis": 0},
        "take": {"axis": 0},
        "one_hot": {"depth": 2},
        "cumsum": {"axis": 0},
        "topk": {"k": 1},
        "reduce_sum": {"axes": [0]},
        "reduce_mean": {"axes": [0]},
        "reduce_max": {"axes": [0]},
        "reduce_min": {"axes": [0]},
        "attention": {"scale": 1.0},
        "attention_kvq": {"scale": 1.0},
        "cache_write": {"layer": 0},
        "cached_attention": {"layer": 0, "scale": 1.0},
        "paged_write": {"layer": 0},
        "paged_write_q": {"layer": 0},
        "paged_mla_attention": {"layer": 0, "scale": 1.0, "qk_nope_head_dim": 2, "v_head_dim": 2},
        "paged_mla_attention_kvq": {"layer": 0, "scale": 1.0, "qk_nope_head_dim": 2, "v_head_dim": 2},
        "mla_attention_kvq": {"scale": 1.0, "qk_nope_head_dim": 2, "v_head_dim": 2},
        "tiled_attention": {"scale": 1.0},
        "block_sparse_attention": {"scale": 1.0},
        "dsa_attention": {"scale": 1.0},
        "tiled_dsa_attention": {"scale": 1.0},
        "iota": {"axis": 0},
        "cast": {"dtype": DType.bf16},
        "constant": {"value": 1.0},
        "scatter_add": {"axis": 0},
        "index_add": {"axis": 0},
        "slice_scatter": {"axis": 0, "start": 0, "stop": 1},
        "attention_grad": {"scale": 1.0},
        "clip_coef": {"max_norm": 1.0},
        "lr_schedule": {"lr": 1e-3},
        "moe_permute": {"num_experts": 2},
        "grouped_matmul_wgrad": {"num_experts": 2},
    }.get(name, {})


@pytest.mark.parametrize("name", sorted(set(registry.all_ops()) - {"param"}))
def test_attribute_errors_name_op(name):
    opdef = registry.get(name)
    with pytest.raises(OpError, match=f"{name} has no attribute"):
        opdef.complete_attrs({**_required_attrs(name), "bogus": 1})
    if any(s.default is registry.REQUIRED for s in opdef.attrs.values()):
        with pytest.raises(OpError, match=f"{name} needs attribute"):
            opdef.complete_attrs({})
    full = opdef.complete_attrs(_required_attrs(name))
    assert set(full) == set(opdef.attrs)
    opdef.check_attrs(full)
    with pytest.raises(OpError, match=name):
        opdef.check_attrs({k: v for k, v in list(full.items())[:-1]} if full else {"bogus": 1})


def test_unknown_op_suggests():
    with pytest.raises(UnknownOpError, match="did you mean softmax"):
        registry.get("sofmax")
