"""Bad inputs: each error names file:line:col, puts the caret under the offending text, and gives a hint."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from r1c.frontends.dsl import DSLError, compile_source


@dataclass
class Case:
    id: str
    src: str
    line: int
    col: int
    at: str  # the source text the caret must point at
    message: str  # a fragment of the message
    hint: str = ""  # a fragment of the hint ("" = any non-empty hint)
    overrides: dict = field(default_factory=dict)


F = "func forward(x: f32[B, 4]) {\n"

CASES = [
    Case("missing-brace", F + "  y = x\n", 1, 28, "{", "'{' is not closed", "add the matching '}'"),
    Case("bad-token", F + "  return x $ 2\n}\n", 2, 12, "$", "unexpected character '$'"),
    Case("unexpected-token", F + "  return x +* 2\n}\n", 2, 13, "*", "unexpected '*'", "expected"),
    Case("unmatched-close", F + "  return x)\n}\n", 2, 11, ")", "unmatched ')'"),
    Case("incomplete-statement", F + "  y = x +\n  return y\n}\n", 2, 10, "", "unexpected end of line", "incomplete"),
    Case(
        "positional-after-keyword", F + "  return softmax(axis=-1, x)\n}\n", 2, 27, "x", "positional argument follows"
    ),
    Case(
        "unknown-op",
        F + "  return sofmax(x, axis=-1)\n}\n",
        2,
        10,
        "sofmax",
        "unknown op or block 'sofmax'",
        "did you mean 'softmax'",
    ),
    Case(
        "unknown-block",
        "block norm2(x) { return x }\n" + F + "  return norm3(x)\n}\n",
        3,
        10,
        "norm3",
        "unknown op or block 'norm3'",
        "did you mean 'norm2'",
    ),
    Case(
        "unknown-variable",
        F + "  y = x * 2\n  return x + yy\n}\n",
        3,
        14,
        "yy",
        "unknown name 'yy'",
        "did you mean 'y'",
    ),
    Case(
        "unknown-config-in-block",
        "config { rope_theta = 1.0 }\nblock rot(x) {\n  return x * rope_thetta\n}\n" + F + "  return rot(x)\n}\n",
        3,
        14,
        "rope_thetta",
        "block 'rot' reads 'rope_thetta'",
        "did you mean 'rope_theta'",
    ),
    Case(
        "too-many-block-args",
        "block f(a) { return a }\n" + F + "  return f(x, x)\n}\n",
        3,
        15,
        "x",
        "block 'f' takes 1 argument(s), got 2",
        "f(a)",
    ),
    Case(
        "missing-block-arg",
        "block f(a, n: int) { return a }\n" + F + "  return f(x)\n}\n",
        3,
        10,
        "f(x)",
        "block 'f' needs argument 'n'",
        "f(a, n)",
    ),
    Case(
        "unknown-block-keyword",
        "block f(a, eps: float = 1.0) { return a * eps }\n" + F + "  return f(x, esp=2)\n}\n",
        3,
        15,
        "esp",
        "block 'f' has no argument 'esp'",
        "did you mean 'eps'",
    ),
    Case(
        "wrong-arg-kind",
        "block f(a, n: int) { return a }\n" + F + "  return f(x, 2.5)\n}\n",
        3,
        15,
        "2.5",
        "argument 'n' of block 'f' must be int, got float 2.5",
    ),
    Case(
        "unknown-attribute",
        F + "  return softmax(x, axes=-1)\n}\n",
        2,
        21,
        "axes",
        "softmax has no attribute 'axes'",
        "did you mean 'axis'",
    ),
    Case(
        "missing-attribute",
        F + "  return reshape(x)\n}\n",
        2,
        10,
        "reshape(x)",
        "reshape needs attribute 'shape'",
        "reshape(x, shape=<dims>)",
    ),
    Case(
        "linear-shape-mismatch",
        F + "  param w: f32[3, 5] = normal(0.1)\n  return linear(x, w)\n}\n",
        3,
        10,
        "linear(x, w)",
        "linear: input features (f32[B,4]) vs weight in-features (f32[3,5]) mismatch: 4 vs 5",
        "linear(x, w)",
    ),
    Case("matmul-shape-mismatch", F + "  return matmul(x, x)\n}\n", 2, 10, "matmul", "matmul", "matmul(a, b)"),
    Case(
        "add-broadcast-mismatch",
        F + "  param b: f32[3] = zeros\n  return x + b\n}\n",
        3,
        10,
        "x + b",
        "do not broadcast",
    ),
    Case(
        "bad-dtype",
        "func forward(x: f64[B, 4]) {\n  return x\n}\n",
        1,
        17,
        "f64",
        "unknown dtype 'f64'",
        "did you mean 'f16'",
    ),
    Case(
        "param-without-as",
        "block proj(x) {\n  param w: f32[4, 4] = zeros\n  return linear(x, w)\n}\n" + F + "  return proj(x)\n}\n",
        6,
        10,
        "proj(x)",
        "block 'proj' declares params, so its call needs `as PATH`",
        "as ",
    ),
    Case(
        "duplicate-block",
        "block f(a) { return a }\nblock f(b) { return b }\n" + F + "  return f(x)\n}\n",
        2,
        7,
        "f",
        "'f' is defined twice",
        "case.r1:1:7",
    ),
    Case(
        "duplicate-config",
        "config {\n  n = 1\n  n = 2\n}\n" + F + "  return x\n}\n",
        3,
        3,
        "n",
        "config constant 'n' is defined twice",
        "case.r1:2:3",
    ),
    Case(
        "duplicate-param",
        F + "  param w: f32[4] = zeros\n  param w: f32[4] = ones\n  return x * w\n}\n",
        3,
        9,
        "w",
        "param 'w' is declared twice",
        "case.r1:2:9",
    ),
    Case(
        "block-named-like-op",
        "block softmax(x) { return x }\n" + F + "  return x\n}\n",
        1,
        7,
        "softmax",
        "block 'softmax' has the name of an op",
        "rename",
    ),
    Case(
        "recursion",
        "block a(x) { return b(x) }\nblock b(x) { return a(x) + 1 }\n" + F + "  return a(x)\n}\n",
        2,
        21,
        "a(x)",
        "block 'a' calls itself (a -> b -> a)",
        "recursion",
    ),
    Case(
        "error-statement",
        'config { mode = "x" }\n' + F + '  if mode != "y" {\n    error("mode must be y")\n  }\n  return x\n}\n',
        4,
        5,
        "error",
        "mode must be y",
        "error() statement",
    ),
    Case(
        "error-statement-not-string", F + "  error(3)\n  return x\n}\n", 2, 9, "3", "error() takes a string", 'error("'
    ),
    Case(
        "tensor-if-condition",
        F + "  if x > 0 {\n    x = x * 2\n  }\n  return x\n}\n",
        2,
        6,
        "x > 0",
        "`if` condition must be a compile-time constant",
        "where(cond, a, b)",
    ),
    Case(
        "int-if-condition",
        "config { n = 3 }\n" + F + "  if n {\n    x = x * 2\n  }\n  return x\n}\n",
        3,
        6,
        "n",
        "`if` condition must be a bool, got int 3",
        "n > 0",
    ),
    Case(
        "missing-import",
        "import nosuchfile\n" + F + "  return x\n}\n",
        1,
        1,
        "import nosuchfile",
        "cannot find 'nosuchfile.r1'",
        "looked in",
    ),
    Case(
        "repeat-bound-float",
        F + "  repeat i in 0..2.5 {\n    x = x + 1\n  }\n  return x\n}\n",
        2,
        18,
        "2.5",
        "`repeat` bounds must be ints, got float 2.5",
        "int",
    ),
    Case(
        "override-unknown",
        "model m\nconfig {\n  num_layers = 2\n}\n" + F + "  return x\n}\n",
        2,
        1,
        "config",
        "cannot override 'num_layer'",
        "did you mean 'num_layers'",
        {"num_layer": 4},
    ),
    Case(
        "pattern-mismatch",
        "config { d = 8 }\nblock f(a: [N, d]) { return a }\n" + F + "  return f(x)\n}\n",
        4,
        12,
        "x",
        "argument 'a' of block 'f' has dim 4 where the pattern wants d = 8",
        "case.r1:2:9",
    ),
    Case(
        "pattern-rank",
        "block f(a: [N, M, K]) { return a }\n" + F + "  return f(x * 2)\n}\n",
        3,
        12,
        "x * 2",
        "must have rank 3, got f32[B,4]",
    ),
    Case(
        "multi-value-in-expression",
        F + "  return topk(x, k=2) + 1\n}\n",
        2,
        10,
        "topk",
        "'topk' gives 2 values",
        "a, b = ",
    ),
    Case(
        "unpack-count",
        F + "  a, b, c = topk(x, k=2)\n  return a\n}\n",
        2,
        13,
        "topk",
        "the right side gives 2 value(s) but there are 3 name(s)",
    ),
    Case("tensor-index", F + "  return x[0]\n}\n", 2, 10, "x[0]", "tensor indexing is not supported", "slice("),
    Case(
        "path-index-not-int",
        "block p(x) {\n  param w: f32[4] = ones\n  return x * w\n}\n" + F + "  return p(x) as layers[1.5]\n}\n",
        6,
        25,
        "1.5",
        "a path index must be an int, got float 1.5",
    ),
    Case(
        "unknown-initializer",
        F + "  param w: f32[4] = norml(0.1)\n  return x * w\n}\n",
        2,
        21,
        "norml(0.1)",
        "unknown initializer 'norml'",
        "did you mean 'normal'",
    ),
    Case(
        "symbolic-param-shape",
        F + "  param w: f32[B, 4] = ones\n  return x * w\n}\n",
        2,
        16,
        "B",
        "param shapes must be static, but 'B' is symbolic",
    ),
    Case(
        "later-config-constant",
        "config {\n  a = b + 1\n  b = 2\n}\n" + F + "  return x\n}\n",
        2,
        7,
        "b",
        "unknown name 'b' in config",
        "defined above it",
    ),
    Case(
        "op-in-config",
        "config {\n  a = softmax(1)\n}\n" + F + "  return x\n}\n",
        2,
        7,
        "softmax",
        "'softmax' is an op; config constants must be compile-time values",
    ),
    Case(
        "const-type-error",
        'config {\n  a = "x" * 2\n}\n' + F + "  return x\n}\n",
        2,
        7,
        '"x" * 2',
        "cannot apply * to string 'x' and int 2",
    ),
    Case(
        "tensor-floordiv", F + "  return x // 2\n}\n", 2, 10, "x // 2", "operator 'floordiv' is not defined on tensors"
    ),
    Case("no-func", "config { a = 1 }\n", 1, 1, "config", "the model has no `func`", "func forward"),
    Case("func-returns-constant", F + "  return 3\n}\n", 2, 10, "3", "func 'forward' must return tensors, got int 3"),
    Case(
        "block-returns-nothing",
        "block f(a) {\n  b = a\n}\n" + F + "  return f(x)\n}\n",
        5,
        10,
        "f(x)",
        "block 'f' returns nothing",
        "case.r1:1:7",
    ),
    Case("alias-without-axis", F + "  return sum(x)\n}\n", 2, 10, "sum(x)", "sum needs axis=", "axis=-1"),
    Case(
        "param-shadows-variable",
        F + "  param x: f32[4] = ones\n  return x\n}\n",
        2,
        9,
        "x",
        "param 'x' has the name of a variable",
        "rename",
    ),
    Case(
        "else-without-brace",
        F + "  if true {\n    x = x * 2\n  } else\n  return x\n}\n",
        4,
        9,
        "",
        "unexpected end of line",
        "'{'",
    ),
    Case(
        "builtin-on-tensor", F + "  return int(x)\n}\n", 2, 10, "int", "int() works on constants, not tensors", "cast("
    ),
    Case("duplicate-keyword", F + "  return softmax(x, axis=0, axis=1)\n}\n", 2, 29, "axis=1", "'axis' is given twice"),
    Case("unknown-dtype-attr", F + "  return cast(x, dtype=float64)\n}\n", 2, 24, "float64", "unknown name 'float64'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_location_caret_and_hint(case: Case):
    with pytest.raises(DSLError) as info:
        compile_source(case.src, filename="case.r1", overrides=case.overrides)
    err = info.value
    text = str(err)
    lines = text.splitlines()
    assert lines[0].startswith(f"case.r1:{case.line}:{case.col}: error: "), text
    assert (err.filename, err.line, err.col) == ("case.r1", case.line, case.col)
    assert case.message in err.message, text
    assert err.source_line == case.src.splitlines()[case.line - 1]
    assert err.source_line[case.col - 1 :].startswith(case.at), text
    assert lines[1] == "  " + err.source_line
    assert lines[2].index("^") == case.col - 1 + 2, text
    assert err.hint and case.hint in err.hint, text
    assert f"hint: {err.hint}" in lines


def test_errors_inside_blocks_note_the_call_chain():
    src = (
        "block inner(x) {\n  return matmul(x, x)\n}\nblock outer(x) {\n  return inner(x)\n}\n"
        + F
        + "  return outer(x)\n}\n"
    )
    with pytest.raises(DSLError) as info:
        compile_source(src, filename="chain.r1")
    err = info.value
    assert (err.line, err.col) == (2, 10)
    assert err.notes == ["in block 'inner' called at chain.r1:5:10", "in block 'outer' called at chain.r1:8:10"]
    assert str(err).splitlines()[-1] == "note: in block 'outer' called at chain.r1:8:10"


def test_imported_file_errors_point_into_that_file(tmp_path):
    (tmp_path / "lib.r1").write_text("block f(x) {\n  return x * undefined_constant\n}\n")
    (tmp_path / "bad.r1").write_text("config { a = 1 }\nblock g(x) { return x }\n")
    with pytest.raises(DSLError) as info:
        compile_source("import lib\n" + F + "  return f(x)\n}\n", filename="m.r1", search_path=[tmp_path])
    assert (info.value.filename, info.value.line, info.value.col) == (str(tmp_path / "lib.r1"), 2, 14)
    assert "undefined_constant" in info.value.message
    with pytest.raises(DSLError, match="an imported file may hold only blocks and imports") as info:
        compile_source("import bad\n" + F + "  return x\n}\n", filename="m.r1", search_path=[tmp_path])
    assert (info.value.line, info.value.col) == (1, 1)
