"""shape-inference beyond the golden files: binding syntax, errors, and repairing types after a rewrite."""

from __future__ import annotations

import pytest

from r1c.ir import Param, VerifyError, parse_module, verify
from r1c.passes import PipelineError, compare_modules, run_pipeline
from r1c.passes.shape_inference import ShapeInferenceError, parse_bindings, substitute

TEXT = """module @m {
  param @w : f32[16,8] = normal(0.5)
  func @forward(%x: f32[B,S,8]) -> (f32[B*S,16]) {
    %w = param() {name="w"} : f32[16,8]
    %0 = reshape(%x) {shape=[B*S,8]} : f32[B*S,8]
    %1 = linear(%0, %w) : f32[B*S,16]
    return %1
  }
}
"""


def test_parse_bindings_and_substitute() -> None:
    assert parse_bindings(" B=1, S = 128 ") == {"B": 1, "S": 128}
    assert parse_bindings("") == {}
    assert substitute("B*S*2", {"B": 3}) == "S*6"
    assert substitute("B*S", {"B": 3, "S": 5}) == 15
    assert substitute(7, {"B": 3}) == 7
    for bad in ("B", "B=x", "B=1;S=2", "B=-1", "B=1,B=2"):
        with pytest.raises(PipelineError, match="shape-inference"):
            parse_bindings(bad)


def test_bind_unknown_symbol_is_an_error() -> None:
    with pytest.raises(PipelineError, match=r"symbol\(s\) Q .*they use \['B', 'S'\]"):
        run_pipeline(parse_module(TEXT), 'shape-inference{bind="B=2,Q=1"}')


def test_repairs_types_after_a_param_changes() -> None:
    m = parse_module(TEXT)
    m.params["w"] = Param("w", m.params["w"].type.with_shape((32, 8)), "normal(0.5)")
    with pytest.raises(VerifyError):
        verify(m)
    out = run_pipeline(m, "shape-inference", verify_each=False)
    verify(out)
    assert str(out.main.results[0].type) == "f32[B*S,32]"


def test_bound_module_computes_the_same() -> None:
    m = parse_module(TEXT)
    out = run_pipeline(m, 'shape-inference{bind="B=2,S=3"}', verify_each=True)
    assert all(a.type.is_static for a in out.main.args)
    assert compare_modules(m, out, {"B": 2, "S": 3}) == 0.0


def test_type_rule_failure_names_the_op() -> None:
    m = parse_module(TEXT)
    m.params["w"] = Param("w", m.params["w"].type.with_shape((16, 4)), "ones")
    with pytest.raises(ShapeInferenceError, match=r"@forward: 'linear' defining %1: linear: input features"):
        run_pipeline(m, "shape-inference")
