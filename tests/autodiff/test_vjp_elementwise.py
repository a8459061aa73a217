"""VJPs of the elementwise ops against torch autograd: unary ops on their domains, binary ops, where and
swiglu with numpy broadcasting (hypothesis picks the shapes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=12, deadline=None)

# op -> (torch function, input generator from a standard-normal array): inputs stay inside the op's domain.
UNARY = {
    "neg": (torch.neg, None),
    "exp": (torch.exp, None),
    "log": (torch.log, lambda x: np.abs(x) + 0.5),
    "sqrt": (torch.sqrt, lambda x: np.abs(x) + 0.5),
    "rsqrt": (torch.rsqrt, lambda x: np.abs(x) + 0.5),
    "reciprocal": (torch.reciprocal, lambda x: np.sign(x) * (np.abs(x) + 0.5)),
    "abs": (torch.abs, None),
    "square": (torch.square, None),
    "tanh": (torch.tanh, None),
    "sigmoid": (torch.sigmoid, None),
    "silu": (F.silu, None),
    "gelu": (F.gelu, None),
    "relu": (torch.relu, None),
    "softplus": (F.softplus, None),
    "sin": (torch.sin, None),
    "cos": (torch.cos, None),
}

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast: a common shape, each side dropping leading dims or setting some to 1."""
    full = draw(st.lists(st.integers(2, 4), min_size=1, max_size=3))

    def side():
        lead = draw(st.integers(0, len(full)))
        return tuple(1 if draw(st.booleans()) else d for d in full[lead:])

    return side(), side()


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@SETTINGS
@given(name=st.sampled_from(sorted(UNARY)), shape=shapes, seed=st.integers(0, 2**16))
def test_unary_vjp(check_vjp, name, shape, seed):
    fn, domain = UNARY[name]
    x = normal(shape, seed)
    check_vjp(name, [domain(x) if domain else x], fn, seed=seed)


BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}


@SETTINGS
@given(name=st.sampled_from(sorted(BINARY)), shapes=broadcast_pair(), seed=st.integers(0, 2**16))
def test_binary_vjp_broadcasting(check_vjp, name, shapes, seed):
    a, b = normal(shapes[0], seed), normal(shapes[1], seed + 1)
    if name == "pow":
        a = np.abs(a) + 0.5  # a real-valued power needs a positive base
    if name == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)
    check_vjp(name, [a, b], BINARY[name], seed=seed)


def test_maximum_minimum_share_ties_like_torch(check_vjp):
    a = np.array([1.0, 2.0, 3.0, -1.0], np.float32)
    b = np.array([1.0, 0.0, 3.0, 2.0], np.float32)
    check_vjp("maximum", [a, b], torch.maximum)
    check_vjp("minimum", [a, b], torch.minimum)


def test_abs_and_relu_at_zero_like_torch(check_vjp):
    x = np.array([0.0, -1.5, 2.0, 0.0], np.float32)
    check_vjp("abs", [x], torch.abs)
    check_vjp("relu", [x], torch.relu)


@SETTINGS
@given(shapes=broadcast_pair(), seed=st.integers(0, 2**16))
def test_where_vjp_broadcasting(check_vjp, shapes, seed):
    a, b = normal(shapes[0], seed), normal(shapes[1], seed + 1)
    cond = np.random.default_rng(seed).random(np.broadcast_shapes(a.shape, b.shape)[-1:]) < 0.5
    check_vjp("where", [cond, a, b], torch.where, seed=seed)


@SETTINGS
@given(shapes=broadcast_pair(), seed=st.integers(0, 2**16))
def test_swiglu_vjp_broadcasting(check_vjp, shapes, seed):
    g, u = normal(shapes[0], seed), normal(shapes[1], seed + 1)
    check_vjp("swiglu", [g, u], lambda g, u: F.silu(g) * u, seed=seed)
