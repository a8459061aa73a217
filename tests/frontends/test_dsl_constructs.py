"""Parsing and lowering of every DSL construct (tests/frontends/dsl_cases/constructs.r1 and small inline models)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from r1c.frontends.dsl import DSLError, compile_source, load
from r1c.ir import init_weights, parse_module, print_module, random_inputs, run
from r1c.ir.types import DType

CASES = Path(__file__).parent / "dsl_cases"


def op_names(m, loc=None):
    return [op.name for op in m.main.body if loc is None or op.loc == loc]


@pytest.fixture(scope="module")
def constructs():
    return load(CASES / "constructs.r1")


def test_config_expressions_fold_in_order(constructs):
    a = constructs.attrs
    assert constructs.name == "constructs"
    assert (a["head_dim"], a["ratio"], a["big"], a["rem"]) == (4, 4.0, 17, 2)
    assert isinstance(a["ratio"], float) and isinstance(a["head_dim"], int)
    assert a["std"] == pytest.approx(0.02) and a["scale"] == pytest.approx(0.5)
    assert a["root"] == 5.0 and a["flag"] is True and a["mode"] == "gelu" and a["act_dtype"] == DType.f32
    assert a["mscale"] == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_params_with_every_initializer_and_indexed_paths(constructs):
    inits = {name: p.init for name, p in constructs.params.items()}
    assert inits == {
        "table": "normal(0.02)",
        "blocks.0.up.weight": "normal(0.02)",
        "blocks.2.up.weight": "normal(0.02)",
        "blocks.4.up.weight": "normal(0.02)",
        "misc.inits.a": "zeros",
        "misc.inits.b": "ones",
        "misc.inits.c": "normal(0.04)",
        "misc.inits.d": "uniform(-0.1, 0.1)",
        "misc.inits.e": "constant(3.0)",
    }
    assert constructs.params["blocks.2.up.weight"].type.shape == (8, 8)


def test_locs_follow_nested_instance_paths(constructs):
    # `act(...) as blocks[i*2]` holds `proj(...) as blocks[i*2].up`: the inner path is given in full at the call
    assert op_names(constructs, "blocks.2.up") == ["linear"]
    assert op_names(constructs, "blocks.2") == ["gelu"]
    assert op_names(constructs, "misc.inits") == ["mul", "add", "div", "sub", "add"]


def test_if_elif_else_and_overrides_pick_branches(constructs):
    assert op_names(constructs).count("gelu") == 3
    silu = load(CASES / "constructs.r1", overrides={"mode": "silu", "layers": 1})
    assert op_names(silu).count("silu") == 1 and "gelu" not in op_names(silu)
    assert silu.attrs["layers"] == 1 and "blocks.2.up.weight" not in silu.params
    relu = load(CASES / "constructs.r1", overrides={"mode": "other", "std": 1})
    assert "relu" in op_names(relu) and relu.attrs["std"] == 1.0
    # a later constant sees the override of an earlier one
    assert load(CASES / "constructs.r1", overrides={"dim": 12}).attrs["head_dim"] == 6


def test_multi_return_aliases_and_numbers_next_to_tensors(constructs):
    text = print_module(constructs)
    assert "reduce_mean(%11) {axes=[-1], keepdims=false}" in text
    assert "reshape(%10) {shape=[B,S,2,4]}" in text
    assert "constant() {dtype=f32, shape=[], value=-inf} : f32[]" in text
    ops = op_names(constructs)
    for name in (
        "slice",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "neg",
        "gt",
        "ge",
        "eq",
        "logical_not",
        "logical_and",
        "maximum",
        "pow",
        "where",
        "cast",
    ):
        assert name in ops, name
    results = constructs.main.results
    assert [str(r.type) for r in results[:2]] == ["f32[B,S]", "f32[B,2,S,4]"]


def test_constructs_round_trip_and_run(constructs):
    assert parse_module(print_module(constructs)) == constructs
    weights = init_weights(constructs, seed=1)
    inputs = random_inputs(constructs, constructs.main, {"B": 2, "S": 3}, seed=2)
    outs = run(constructs, inputs, weights)
    assert [o.shape for o in outs] == [(2, 3), (2, 2, 3, 4), (2, 3, 8), (2, 3, 8), (2, 3), (2, 3, 8), (2, 3, 8)]
    np.testing.assert_allclose(outs[4], inputs[1].astype(np.float32) * 2)
    s = outs[5] ** 0.5  # max(s, 0.5) ** 2 -> every entry is at least 0.25
    assert np.all(s >= 0.5 - 1e-6)


def test_imports_from_the_model_directory(tmp_path):
    (tmp_path / "blocks.r1").write_text("import more\nblock double(x) {\n  return twice(x) * 1\n}\n")
    (tmp_path / "more.r1").write_text("block twice(x) { return x + x }\n")
    (tmp_path / "m.r1").write_text(
        "import blocks\nimport more   # loaded once even when imported twice\n"
        "config { n = 4 }\n"
        "func forward(x: f32[N, n]) {\n  return double(x)\n}\n"
    )
    m = load(tmp_path / "m.r1")
    assert m.name == "m" and op_names(m) == ["add", "constant", "mul"]
    assert [str(a.type) for a in m.main.args] == ["f32[N,4]"]


def test_compile_source_search_path_and_module_name(tmp_path):
    (tmp_path / "lib.r1").write_text("block sq(x) { return x * x }\n")
    m = compile_source(
        "import lib\nfunc forward(x: f32[3]) { return sq(x) }", filename="9 odd-name.r1", search_path=[tmp_path]
    )
    assert m.name == "_9_odd_name" and op_names(m) == ["mul"]


def test_block_arguments_kinds_defaults_keywords_and_patterns():
    m = compile_source("""
config { d = 4 }
block f(x: f32[B, S, d], n: int, eps: float = 0.5, flag: bool = false, t: dtype = bf16) {
  y = x * eps
  if flag { y = y + n }
  return cast(reshape(y, shape=[B * S, d]), dtype=t)
}
func forward(x: f32[B, S, 4]) {
  a = f(x, 2)
  b = f(x, n=3, flag=true, t=f32, eps=2)
  return a, b
}
""")
    assert [str(r.type) for r in m.main.results] == ["bf16[B*S,4]", "f32[B*S,4]"]
    consts = [op.attrs["value"] for op in m.main.body if op.name == "constant"]
    assert consts == [0.5, 2.0, 3.0]


def test_symbols_products_in_func_args_and_one_line_bodies():
    m = compile_source(
        "func forward(x: f32[B*S, 2], y: i32[B, S]) { return reshape(x, shape=[B, S, 2]), y }\n"
        "func other(x: f32[2, 3]) { return transpose(x, perm=[1, 0]) }"
    )
    assert [str(a.type) for a in m.main.args] == ["f32[B*S,2]", "int32[B,S]"]
    assert str(m.main.results[0].type) == "f32[B,S,2]"
    assert list(m.functions) == ["forward", "other"]


def test_tied_params_and_return_inside_repeat():
    m = compile_source("""
config { v = 5
  d = 3 }
block table() {
  param weight: f32[v, d] = normal(0.1)
  return weight
}
block first_positive(x) {
  repeat i in 1..10 {
    if i * i > 8 { return x * i }
  }
  return x
}
func forward(ids: int32[T]) {
  e = embedding(table() as embed, ids)
  return first_positive(linear(e, table() as embed))
}
""")
    assert list(m.params) == ["embed.weight"]
    assert [op.attrs["value"] for op in m.main.body if op.name == "constant"] == [3.0]


def test_overrides_are_checked():
    src = "config {\n  n = 2\n  f = 1.5\n}\nfunc forward(x: f32[n]) { return x }"
    assert compile_source(src, overrides={"n": 5}).main.args[0].type.shape == (5,)
    with pytest.raises(DSLError, match="is a float, but the config constant is int 2"):
        compile_source(src, overrides={"n": 2.5})


def test_layout_comments_crlf_and_short_circuit():
    src = (
        "# leading comment\r\n\r\nconfig {\r\n  # inside config\r\n  on = false\r\n}\r\n"
        "func forward(x: f32[2,\r\n                   3]) {   # args may span lines\r\n"
        "  if on and undefined_name > 0 {\r\n    x = x * 2\r\n  }\r\n  # between } and else\r\n"
        "  else {\r\n    x = x + 1\r\n  }\r\n  return x}"
    )
    m = compile_source(src)
    assert op_names(m) == ["constant", "add"]


def test_dtype_values_and_dtype_overrides():
    src = "config { dt = bf16 }\nfunc forward(x: f32[2]) {\n  param w: dt[2] = ones\n  return cast(x, dtype=dt) * w\n}"
    assert str(compile_source(src).main.results[0].type) == "bf16[2]"
    m = compile_source(src, overrides={"dt": "f16"})
    assert m.attrs["dt"] == DType.f16 and str(m.params["w"].type) == "f16[2]"
