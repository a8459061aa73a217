"""Hypothesis strategies for random valid IR modules (reusable by any test).

`modules()` draws a DAG of elementwise/matmul/linear/reshape/transpose/reduce/softmax/concat/slice/cast/
broadcast ops over a few f32 inputs with static and symbolic (B, S) dims, parameters with odd names,
splat constants (0, 1, -0.0, negative, inf, ...), duplicated ops (work for CSE), unused ops (work for DCE)
and locations with quotes, backslashes, newlines and non-ASCII text. Ops go through the builder, which
applies the type rules; a drawn op the rules reject is simply not added, so every module is valid.

NaN never appears as an attribute: NaN != NaN would make `parse(print(m)) == m` false by definition.
"""

from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st

from r1c import build
from r1c.ir import DType, Module, Value, dims, verify

# Sizes every symbol takes in numerics checks on drawn modules.
ENV = {"B": 2, "S": 3}

ODD_TEXT = st.lists(st.sampled_from(list('ab.Z_ 0"\\\n\té%@{}()[]/,=') + ["//", "\x01"]), min_size=1, max_size=8).map(
    "".join
)
PARAM_NAMES = st.one_of(st.sampled_from(["w", "layers.0.mlp.gate_proj.weight", "lm_head"]), ODD_TEXT)
# Identity elements come up often on purpose: they are what canonicalize looks for.
SPLATS = st.one_of(
    st.sampled_from([0.0, 1.0, -0.0, 2.0, -1.5, float("inf"), -3e-7]),
    st.sampled_from([0.0, 1.0]),
    st.floats(-4, 4, allow_nan=False, width=32),
)
UNARY = ["neg", "tanh", "sigmoid", "silu", "abs", "relu", "square", "exp"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]


class _Graph:
    def __init__(self, draw: Callable, fb: build.FunctionBuilder, symbols: list[str], kinds: list[str]) -> None:
        self.draw, self.fb, self.kinds = draw, fb, kinds
        self.values: list[Value] = list(fb.args)
        self.dims: list[dims.Dim] = [1, 2, 3, 4] + symbols

    def pick(self) -> Value:
        return self.draw(st.sampled_from(self.values))

    def static_last(self) -> list[Value]:
        return [v for v in self.values if v.type.rank >= 1 and isinstance(v.type.shape[-1], int)]

    def emit(self, opname: str, *operands: Value, **attrs) -> None:
        try:
            out = self.fb.op(opname, *operands, **attrs)
        except build.BuildError:
            return  # rejected by the type rules: draw something else
        self.values += list(out) if isinstance(out, tuple) else [out]

    def splat(self, shape: list) -> Value:
        return self.fb.op("constant", value=self.draw(SPLATS), shape=shape)

    def step(self) -> None:
        kind = self.draw(st.sampled_from(self.kinds))
        x = self.pick()
        d = self.draw
        if kind == "unary":
            self.emit(d(st.sampled_from(UNARY)), x)
        elif kind == "binary":
            self.emit(d(st.sampled_from(BINARY + ["div"])), x, self.pick())
        elif kind == "binary_const":
            static = x.type.is_static
            # The last choice broadcasts x to a bigger shape: `x + 0` is then not a no-op.
            shape = d(
                st.sampled_from(
                    [[], [1], list(x.type.shape[-1:]) if static else [1], [2] + list(x.type.shape) if static else []]
                )
            )
            c = self.splat(shape)
            a, b = (c, x) if d(st.booleans()) else (x, c)
            self.emit(d(st.sampled_from(["add", "sub", "mul", "div", "maximum"])), a, b)
        elif kind in ("matmul", "linear"):
            candidates = self.static_last()
            if not candidates:
                return
            x = d(st.sampled_from(candidates))
            k, n = x.type.shape[-1], d(st.integers(1, 4))
            shape = [k, n] if kind == "matmul" else [n, k]
            w = self.fb.param(
                d(PARAM_NAMES) + f".{len(self.fb.parent.module.params)}",
                build.tensor("f32", shape),
                init=d(st.sampled_from(["normal(0.5)", "uniform(-1,1)", "ones"])),
            )
            self.emit(kind, x, w)
        elif kind == "reshape":
            shape = list(x.type.shape)
            target = d(
                st.sampled_from(
                    [
                        shape,
                        [dims.mul(*shape)] if shape else [1],
                        [1] + shape,
                        shape[:-2] + [dims.mul(*shape[-2:])] if len(shape) >= 2 else shape,
                        shape[:-1] + [-1] if shape else [],
                    ]
                )
            )
            self.emit("reshape", x, shape=target)
        elif kind == "transpose":
            perm = d(st.permutations(range(x.type.rank)))
            if d(st.booleans()):
                perm = [p - x.type.rank for p in perm]  # negative axes mean the same permutation
            self.emit("transpose", x, perm=list(perm))
        elif kind == "reduce" and x.type.rank:
            axes = d(st.lists(st.integers(-x.type.rank, x.type.rank - 1), min_size=1, max_size=2, unique=True))
            self.emit(
                d(st.sampled_from(["reduce_sum", "reduce_mean", "reduce_max"])), x, axes=axes, keepdims=d(st.booleans())
            )
        elif kind == "softmax" and x.type.rank:
            self.emit("softmax", x, axis=d(st.integers(-x.type.rank, x.type.rank - 1)))
        elif kind == "concat" and x.type.rank:
            operands = d(st.sampled_from([[x], [x, x], [x, self.pick()]]))
            self.emit("concat", *operands, axis=d(st.integers(-x.type.rank, x.type.rank - 1)))
        elif kind == "slice" and x.type.rank:
            axis = d(st.sampled_from([x.type.rank - 1, d(st.integers(0, x.type.rank - 1))]))
            size = x.type.shape[axis]
            if isinstance(size, int):
                start = d(st.sampled_from([0, d(st.integers(0, size - 1))]))
                stop = d(st.sampled_from([size, size + 2, d(st.integers(start + 1, size + 2))]))
                self.emit("slice", x, axis=axis, start=start, stop=stop, step=d(st.sampled_from([1, 1, 2])))
        elif kind == "cast":
            target = d(st.sampled_from([DType.f32, DType.bf16]))
            self.emit("cast", x, dtype=target)
            if target == DType.bf16:
                self.emit("cast", self.values[-1], dtype=DType.f32)
        elif kind == "broadcast":
            lead = d(st.lists(st.sampled_from(self.dims), max_size=1))
            self.emit("broadcast_to", x, shape=lead + list(x.type.shape))
        elif kind == "duplicate":
            ops = [op for op in self.fb.function.body if op.name not in ("param", "constant")]
            if ops:
                op = d(st.sampled_from(ops))
                self.emit(op.name, *op.operands, **op.attrs)


# Op kinds a graph step draws from; repeats make a kind likelier.
KINDS = [
    "unary",
    "binary",
    "binary_const",
    "binary_const",
    "matmul",
    "linear",
    "reshape",
    "reshape",
    "transpose",
    "transpose",
    "reduce",
    "softmax",
    "concat",
    "slice",
    "slice",
    "cast",
    "broadcast",
    "duplicate",
]
# The kinds canonicalize/constant-fold have patterns for: dense graphs of them find pattern bugs quickly.
REWRITE_KINDS = ["unary", "binary_const", "reshape", "transpose", "slice", "cast", "broadcast", "concat", "duplicate"]


@st.composite
def modules(draw: Callable, max_ops: int = 12, kinds: list[str] = KINDS) -> Module:
    """A random valid module with one `forward` function; symbolic dims take their sizes from `ENV`."""
    symbols = draw(st.lists(st.sampled_from(sorted(ENV)), max_size=2, unique=True))
    dim = st.sampled_from([1, 2, 3, 4] + symbols)
    n_args = draw(st.integers(1, 3))
    args = {f"a{i}": build.tensor("f32", draw(st.lists(dim, min_size=1, max_size=3))) for i in range(n_args)}
    used = sorted({s for t in args.values() for d in t.shape for s in dims.symbols(d)})
    mb = build.ModuleBuilder(
        draw(st.sampled_from(["m", "r1_tiny", "weird.name"])),
        attrs=draw(
            st.dictionaries(
                st.sampled_from(["eps", "n", "mode", "flag"]),
                st.one_of(st.integers(-5, 5), st.booleans(), st.floats(-1e3, 1e3, allow_nan=False), ODD_TEXT),
                max_size=2,
            )
        ),
    )
    fb = mb.function("forward", **args)
    g = _Graph(draw, fb, used, kinds)
    for _ in range(draw(st.integers(1, max_ops))):
        if draw(st.booleans()):
            with fb.scope(draw(ODD_TEXT)):
                g.step()
        else:
            g.step()
    results = draw(st.lists(st.sampled_from(g.values), min_size=1, max_size=3))
    fb.ret(g.values[-1], *results)
    return verify(mb.build(check=False))
