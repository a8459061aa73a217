"""Elementwise ops with numpy broadcasting. Unary ops keep their operand's type."""

from __future__ import annotations

import math

import numpy as np

from r1c.ir.core import Value
from r1c.ir.ops._util import broadcast_shapes, require_float, same_dtype
from r1c.ir.ops.grad_util import is_float, no_grad, scalar, unbroadcast
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


def _sign(fb, x):
    """sign(x) as x's dtype (0 at 0, as torch's abs gradient)."""
    return fb.sub(
        fb.cast(fb.gt(x, scalar(fb, 0.0, x.type.dtype)), dtype=x.type.dtype),
        fb.cast(fb.lt(x, scalar(fb, 0.0, x.type.dtype)), dtype=x.type.dtype),
    )


def _silu_slope(fb, x):
    """d silu(x)/dx = s * (1 + x * (1 - s)) with s = sigmoid(x)."""
    s = fb.sigmoid(x)
    one = scalar(fb, 1.0, x.type.dtype)
    return fb.mul(s, fb.add(one, fb.mul(x, fb.sub(one, s))))


# d y / d x for each unary op as a function of (fb, x, y); the rule multiplies it by the cotangent.
UNARY_SLOPE = {
    "exp": lambda fb, x, y: y,
    "log": lambda fb, x, y: fb.reciprocal(x),
    "sqrt": lambda fb, x, y: fb.div(scalar(fb, 0.5, x.type.dtype), y),
    "rsqrt": lambda fb, x, y: fb.mul(fb.div(y, x), scalar(fb, -0.5, x.type.dtype)),
    "reciprocal": lambda fb, x, y: fb.neg(fb.square(y)),
    "abs": lambda fb, x, y: _sign(fb, x),
    "square": lambda fb, x, y: fb.mul(x, scalar(fb, 2.0, x.type.dtype)),
    "tanh": lambda fb, x, y: fb.sub(scalar(fb, 1.0, x.type.dtype), fb.square(y)),
    "sigmoid": lambda fb, x, y: fb.mul(y, fb.sub(scalar(fb, 1.0, x.type.dtype), y)),
    "silu": lambda fb, x, y: _silu_slope(fb, x),
    "relu": lambda fb, x, y: fb.cast(fb.gt(x, scalar(fb, 0.0, x.type.dtype)), dtype=x.type.dtype),
    "softplus": lambda fb, x, y: fb.sigmoid(x),
    "sin": lambda fb, x, y: fb.cos(x),
    "cos": lambda fb, x, y: fb.neg(fb.sin(x)),
}


def _unary_vjp(name: str):
    def vjp(fb, op, cts):
        (x,), (g,) = op.operands, cts
        if g is None or not is_float(x):
            return [None]
        if name == "neg":
            return [fb.neg(g)]
        if name == "gelu":  # the slope needs erf, which only the dedicated backward op has
            return [fb.gelu_grad(x, g)]
        return [fb.mul(g, UNARY_SLOPE[name](fb, x, op.result))]

    return vjp


def _float_ref(fn):
    return lambda ins, a: [fn(ins[0].astype(np.float64) if ins[0].dtype.kind == "f" else ins[0])]


for _name, (_fn, _flops, _doc) in UNARY.items():
    register(
        OpDef(
            _name,
            f"Elementwise {_doc}.",
            ("x",),
            _unary_rule(_name),
            _float_ref(_fn),
            elementwise_cost(_flops),
            vjp=_unary_vjp(_name),
        )
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


def _tie_share(fb, a, b, wins: str):
    """Share of the cotangent that `a` gets in maximum/minimum: 1 where it wins, 1/2 on ties (as torch)."""
    dt = a.type.dtype
    won = fb.cast(fb.op(wins, a, b), dtype=dt)
    tie = fb.cast(fb.eq(a, b), dtype=dt)
    return fb.add(won, fb.mul(tie, scalar(fb, 0.5, dt)))


def _binary_grads(name: str, fb, a: Value, b: Value, y: Value, g: Value) -> tuple[Value, Value]:
    """Cotangents of (a, b) before unbroadcasting: they have the broadcast shape of g."""
    if name == "add":
        return g, g
    if name == "sub":
        return g, fb.neg(g)
    if name == "mul":
        return fb.mul(g, b), fb.mul(g, a)
    if name == "div":
        return fb.div(g, b), fb.neg(fb.mul(g, fb.div(y, b)))
    if name == "pow":
        da = fb.mul(g, fb.mul(b, fb.pow(a, fb.sub(b, scalar(fb, 1.0, b.type.dtype)))))
        return da, fb.mul(g, fb.mul(y, fb.log(a)))
    if name in ("maximum", "minimum"):
        wins = "gt" if name == "maximum" else "lt"
        return fb.mul(g, _tie_share(fb, a, b, wins)), fb.mul(g, _tie_share(fb, b, a, wins))
    raise KeyError(name)


def _binary_vjp(name: str):
    def vjp(fb, op, cts):
        a, b = op.operands
        (g,) = cts
        if g is None or not is_float(a):
            return [None, None]
        ga, gb = _binary_grads(name, fb, a, b, op.result, g)
        return [unbroadcast(fb, ga, a.type), unbroadcast(fb, gb, b.type)]

    return vjp


for _name, (_fn, _doc) in BINARY.items():
    register(
        OpDef(
            _name,
            f"Elementwise {_doc} with broadcasting.",
            ("a", "b"),
            _binary_rule(_name),
            _binary_ref(_fn),
            elementwise_cost(1),
            vjp=_binary_vjp(_name),
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
            vjp=no_grad,
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
        vjp=no_grad,
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
        vjp=no_grad,
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
        vjp=no_grad,
    )
)


def _where_vjp(fb, op, cts):
    cond, a, b = op.operands
    (g,) = cts
    if g is None or not is_float(a):
        return [None, None, None]
    zero = scalar(fb, 0.0, g.type.dtype)
    return [None, unbroadcast(fb, fb.where(cond, g, zero), a.type), unbroadcast(fb, fb.where(cond, zero, g), b.type)]


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
        vjp=_where_vjp,
    )
)


def _swiglu_rule(ins, a):
    for t in ins:
        require_float("swiglu", t)
    return [TensorType(same_dtype("swiglu", ins), broadcast_shapes("swiglu", ins[0].shape, ins[1].shape))]


def _swiglu_vjp(fb, op, cts):
    gate, up = op.operands
    (g,) = cts
    if g is None:
        return [None, None]
    dgate = fb.mul(fb.mul(g, up), _silu_slope(fb, gate))
    return [unbroadcast(fb, dgate, gate.type), unbroadcast(fb, fb.mul(g, fb.silu(gate)), up.type)]


register(
    OpDef(
        "swiglu",
        "silu(gate) * up: the gated activation of DeepSeek's FFNs.",
        ("gate", "up"),
        _swiglu_rule,
        _binary_ref(lambda g, u: g * _sigmoid(g) * u),
        elementwise_cost(6),
        vjp=_swiglu_vjp,
    )
)
