"""Elementwise ops with numpy broadcasting. Unary ops keep their operand's type."""

from __future__ import annotations

import math

import numpy as np

from r1c.ir.ops._util import broadcast_shapes, require_float, same_dtype
from r1c.ir.registry import OpDef, OpError, elementwise_cost, register
from r1c.ir.types import DType, TensorType


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


UNARY = {
    "neg": (np.negative, 1, "-x"),
    "exp": (np.exp, 4, "e^x"),
    "log": (np.log, 4, "natural log"),
    "sqrt": (np.sqrt, 2, "square root"),
    "rsqrt": (lambda x: 1.0 / np.sqrt(x), 2, "1/sqrt(x)"),
    "reciprocal": (lambda x: 1.0 / x, 1, "1/x"),
    "abs": (np.abs, 1, "|x|"),
    "square": (np.square, 1, "x*x"),
    "tanh": (np.tanh, 4, "tanh"),
    "sigmoid": (_sigmoid, 4, "1/(1+e^-x)"),
    "silu": (lambda x: x * _sigmoid(x), 5, "x*sigmoid(x)"),
    "gelu": (lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))), 8, "x*Phi(x), exact erf form"),
    "relu": (lambda x: np.maximum(x, 0), 1, "max(x,0)"),
    "softplus": (lambda x: np.logaddexp(0.0, x), 4, "log(1+e^x)"),
    "sin": (np.sin, 4, "sine"),
    "cos": (np.cos, 4, "cosine"),
}


def _unary_rule(name: str):
    def rule(ins, a):
        if name not in ("neg", "abs", "square", "relu"):
            require_float(name, ins[0])
        return [ins[0]]

    return rule


def _float_ref(fn):
    return lambda ins, a: [fn(ins[0].astype(np.float64) if ins[0].dtype.kind == "f" else ins[0])]


for _name, (_fn, _flops, _doc) in UNARY.items():
    register(
        OpDef(_name, f"Elementwise {_doc}.", ("x",), _unary_rule(_name), _float_ref(_fn), elementwise_cost(_flops))
    )


BINARY = {
    "add": (np.add, "a+b"),
    "sub": (np.subtract, "a-b"),
    "mul": (np.multiply, "a*b"),
    "div": (
        lambda a, b: np.true_divide(a, b) if a.dtype.kind == "f" else np.floor_divide(a, b),
        "a/b (floor for ints)",
    ),
    "pow": (np.power, "a**b"),
    "maximum": (np.maximum, "max(a,b)"),
    "minimum": (np.minimum, "min(a,b)"),
}


def _binary_rule(name: str, out_dtype: DType | None = None):
    def rule(ins, a):
        dtype = same_dtype(name, ins)
        if out_dtype is None and dtype == DType.bool:
            raise OpError(f"{name}: bool operands; use logical_and/logical_or")
        return [TensorType(out_dtype or dtype, broadcast_shapes(name, *(t.shape for t in ins)))]

    return rule


def _binary_ref(fn):
    def ref(ins, a):
        x, y = (v.astype(np.float64) if v.dtype.kind == "f" else v for v in ins)
        return [fn(x, y)]

    return ref


for _name, (_fn, _doc) in BINARY.items():
    register(
        OpDef(
            _name,
            f"Elementwise {_doc} with broadcasting.",
            ("a", "b"),
            _binary_rule(_name),
            _binary_ref(_fn),
            elementwise_cost(1),
        )
    )

COMPARE = {
    "eq": np.equal,
    "ne": np.not_equal,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
}
for _name, _fn in COMPARE.items():
    register(
        OpDef(
            _name,
            f"Elementwise comparison `{_name}` with broadcasting; gives bool.",
            ("a", "b"),
            _binary_rule(_name, DType.bool),
            _binary_ref(_fn),
            elementwise_cost(1),
        )
    )


def _logical_rule(name: str):
    def rule(ins, a):
        for t in ins:
            if t.dtype != DType.bool:
                raise OpError(f"{name}: needs bool operands, got {t}")
        return [TensorType(DType.bool, broadcast_shapes(name, *(t.shape for t in ins)))]

    return rule


register(
    OpDef(
        "logical_and",
        "Elementwise and of bools.",
        ("a", "b"),
        _logical_rule("logical_and"),
        lambda ins, a: [np.logical_and(*ins)],
        elementwise_cost(1),
    )
)
register(
    OpDef(
        "logical_or",
        "Elementwise or of bools.",
        ("a", "b"),
        _logical_rule("logical_or"),
        lambda ins, a: [np.logical_or(*ins)],
        elementwise_cost(1),
    )
)
register(
    OpDef(
        "logical_not",
        "Elementwise not of a bool.",
        ("a",),
        _logical_rule("logical_not"),
        lambda ins, a: [np.logical_not(ins[0])],
        elementwise_cost(1),
    )
)


def _where_rule(ins, a):
    cond, x, y = ins
    if cond.dtype != DType.bool:
        raise OpError(f"where: condition must be bool, got {cond}")
    dtype = same_dtype("where", [x, y])
    return [TensorType(dtype, broadcast_shapes("where", cond.shape, x.shape, y.shape))]


register(
    OpDef(
        "where",
        "Select a where cond else b, with broadcasting.",
        ("cond", "a", "b"),
        _where_rule,
        lambda ins, a: [np.where(*ins)],
        elementwise_cost(1),
    )
)


def _swiglu_rule(ins, a):
    for t in ins:
        require_float("swiglu", t)
    return [TensorType(same_dtype("swiglu", ins), broadcast_shapes("swiglu", ins[0].shape, ins[1].shape))]


register(
    OpDef(
        "swiglu",
        "silu(gate) * up: the gated activation of DeepSeek's FFNs.",
        ("gate", "up"),
        _swiglu_rule,
        _binary_ref(lambda g, u: g * _sigmoid(g) * u),
        elementwise_cost(6),
    )
)
