"""Malformed IR, as text and built programmatically: each error names the function, the op and the value
(and, for text, the line and column)."""

from __future__ import annotations

import re

import pytest

from r1c.ir import DimList, Function, IRParseError, Module, Op, Param, Value, VerifyError, parse_module, tensor, verify

HEAD = "module @m {\n  param @w : f32[4,4] = ones\n  func @forward(%x: f32[4,4]) -> (f32[4,4]) {\n"
TAIL = "  }\n}\n"
T = tensor("f32", [4, 4])

# name -> (function body text, error class, fragments the message must contain)
TEXT_CASES = {
    "use_before_def": (
        "    %0 = add(%x, %1) : f32[4,4]\n    %1 = neg(%x) : f32[4,4]\n    return %0\n",
        IRParseError,
        ["<ir>:4:18", "@forward", "add", "%1", "before it is defined"],
    ),
    "double_def": (
        "    %0 = neg(%x) : f32[4,4]\n    %0 = exp(%x) : f32[4,4]\n    return %0\n",
        IRParseError,
        ["<ir>:5:5", "@forward", "exp", "%0", "defined twice"],
    ),
    "unknown_op": (
        "    %0 = sofmax(%x) {axis=-1} : f32[4,4]\n    return %0\n",
        VerifyError,
        ["@forward", "'sofmax'", "%0", "did you mean softmax"],
    ),
    "wrong_arity": (
        "    %0 = add(%x) : f32[4,4]\n    return %0\n",
        VerifyError,
        ["@forward", "'add'", "%0", "takes 2 operands", "got 1"],
    ),
    "wrong_result_type": (
        "    %0 = transpose(%x) {perm=[1,0]} : f32[4,5]\n    return %x\n",
        VerifyError,
        ["@forward", "'transpose'", "%0", "declared f32[4,5]", "gives f32[4,4]"],
    ),
    "wrong_result_count": (
        "    %0, %1 = neg(%x) : f32[4,4], f32[4,4]\n    return %0\n",
        VerifyError,
        ["@forward", "'neg'", "%0, %1", "1 result(s)", "lists 2"],
    ),
    "missing_attr": (
        "    %0 = softmax(%x) : f32[4,4]\n    return %0\n",
        VerifyError,
        ["@forward", "'softmax'", "%0", "missing attribute", "axis"],
    ),
    "unknown_attr": (
        "    %0 = neg(%x) {foo=1} : f32[4,4]\n    return %0\n",
        VerifyError,
        ["@forward", "'neg'", "%0", "no attribute", "foo"],
    ),
    "ill_typed_attr": (
        '    %0 = softmax(%x) {axis="last"} : f32[4,4]\n    return %0\n',
        VerifyError,
        ["@forward", "'softmax'", "%0", "'axis'", "must be int", "'last'"],
    ),
    "undeclared_param": (
        '    %v = param() {name="v"} : f32[4,4]\n    return %v\n',
        VerifyError,
        ["@forward", "'param'", "%v", "@v is not declared", "@m"],
    ),
    "param_type_mismatch": (
        '    %w = param() {name="w"} : f32[4,8]\n    return %x\n',
        VerifyError,
        ["@forward", "'param'", "%w", "declared f32[4,8]", "gives f32[4,4]"],
    ),
    "return_undefined": (
        "    %0 = neg(%x) : f32[4,4]\n    return %5\n",
        IRParseError,
        ["<ir>:5:12", "@forward", "return", "%5"],
    ),
    "return_type_mismatch": (
        "    %0 = reduce_sum(%x) {axes=[0], keepdims=false} : f32[4]\n    return %0\n",
        IRParseError,
        ["@forward", "%0: f32[4]", "signature", "f32[4,4]"],
    ),
    "syntax_error": (
        "    %0 = neg(%x) : f32[4,4\n    return %0\n",
        IRParseError,
        ["<ir>:5:5", "unexpected 'return'", "RSQB", "^"],
    ),
    "bad_character": ("    %0 = neg(%x) : f32[4,4] $\n    return %0\n", IRParseError, ["<ir>:4:29", "unexpected '$'"]),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_malformed_text(case: str) -> None:
    body, error, fragments = TEXT_CASES[case]
    with pytest.raises(error) as info:
        verify(parse_module(HEAD + body + TAIL))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_parse_error_positions_are_attached() -> None:
    with pytest.raises(IRParseError) as info:
        parse_module(HEAD + "    %0 = neg(%y) : f32[4,4]\n    return %0\n" + TAIL, "model.ir")
    assert info.value.pos == (4, 14)
    assert str(info.value).startswith("model.ir:4:14: @forward: neg uses %y")


def _module(body: list[Op], results: list[Value], params: dict | None = None, args=None) -> Module:
    x = Value("x", T)
    f = Function("forward", [x] if args is None else args, body, results)
    return Module("m", {"w": Param("w", T)} if params is None else params, {"forward": f})


X = Value("x", T)


def _op(name: str, operands, result: str, type_=T, **attrs) -> Op:
    return Op(name, tuple(operands), (Value(result, type_),), attrs)


def _assert_verify_error(m: Module, *fragments: str) -> None:
    with pytest.raises(VerifyError) as info:
        verify(m)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_programmatic_use_before_def() -> None:
    late = Value("late", T)
    m = _module([_op("add", [X, late], "0"), _op("neg", [X], "late")], [Value("0", T)])
    _assert_verify_error(m, "@forward", "'add'", "%0", "operand %late is used before it is defined")


def test_programmatic_double_def() -> None:
    m = _module([_op("neg", [X], "0"), _op("exp", [X], "0")], [Value("0", T)])
    _assert_verify_error(m, "@forward", "'exp'", "%0", "defined twice")


def test_programmatic_operand_type_disagrees_with_definition() -> None:
    stale = Value("0", tensor("f32", [4, 8]))
    m = _module([_op("neg", [X], "0"), _op("exp", [stale], "1", tensor("f32", [4, 8]))], [Value("0", T)])
    _assert_verify_error(m, "@forward", "'exp'", "%1", "operand %0 has type f32[4,8] here", "defined as f32[4,4]")


def test_programmatic_return_of_undefined_value() -> None:
    m = _module([_op("neg", [X], "0")], [Value("ghost", T)])
    _assert_verify_error(m, "@forward", "returned value %ghost is not defined")


def test_symbolic_param_shape() -> None:
    sym = tensor("f32", ["B", 4])
    m = _module([_op("neg", [X], "0")], [Value("0", T)], params={"w": Param("w", sym)})
    _assert_verify_error(m, "parameter @w", "symbolic shape f32[B,4]", "must be static")


def test_param_table_key_mismatch() -> None:
    m = _module([_op("neg", [X], "0")], [Value("0", T)], params={"v": Param("w", T)})
    _assert_verify_error(m, "@m", "'v'", "'w'")


def test_duplicate_argument() -> None:
    m = _module([_op("neg", [X], "0")], [Value("0", T)], args=[X, X])
    _assert_verify_error(m, "@forward", "argument %x is declared twice")


def test_programmatic_bad_reshape_attr_names_op_and_value() -> None:
    m = _module([_op("reshape", [X], "r", tensor("f32", [3, 5]), shape=DimList([3, 5]))], [X])
    _assert_verify_error(m, "@forward", "'reshape'", "%r", "16 elements")


def test_module_without_functions() -> None:
    with pytest.raises(VerifyError, match=re.escape("module @empty has no functions")):
        verify(Module("empty"))
