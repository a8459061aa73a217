"""The same transformer written in the DSL and with the Python builder gives identical IR and identical results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from r1c import build
from r1c.frontends.dsl import load
from r1c.ir import DType, Module, init_weights, print_module, random_inputs, run

CASE = Path(__file__).parent / "dsl_cases" / "transformer.r1"
CONFIG = dict(vocab=64, hidden=16, heads=2, head_dim=8, ffn=32, layers=2, eps=1e-5, std=0.05)


def python_transformer() -> Module:
    c = CONFIG
    mb = build.ModuleBuilder("transformer", dict(CONFIG))
    f = mb.function("forward", tokens=build.tensor("int32", ["B", "S"]))
    D = c["hidden"]

    def w(name, shape, init="normal(0.05)"):
        # inside f.scope(...), f.loc is the instance path that the DSL prefixes param names with
        return f.param(f"{f.loc}.{name}" if f.loc else name, build.tensor("f32", shape), init=init)

    def norm(x, name):
        with f.scope(name):
            return f.rmsnorm(x, w("weight", [D], "ones"), eps=c["eps"])

    def heads(x, weight):
        return f.transpose(
            f.reshape(f.linear(x, weight), shape=["B", "S", c["heads"], c["head_dim"]]), perm=[0, 2, 1, 3]
        )

    def attn(x):
        with f.scope("attn"):
            wq, wk, wv, wo = (w(n, [D, D]) for n in ("wq", "wk", "wv", "wo"))
            q, k, v = heads(x, wq), heads(x, wk), heads(x, wv)
            o = f.attention(q, k, v, scale=c["head_dim"] ** -0.5, causal=True)
            o = f.reshape(f.transpose(o, perm=[0, 2, 1, 3]), shape=["B", "S", D])
            return f.linear(o, wo)

    def mlp(x):
        with f.scope("mlp"):
            gate, up, down = w("gate", [c["ffn"], D]), w("up", [c["ffn"], D]), w("down", [D, c["ffn"]])
            return f.linear(f.swiglu(f.linear(x, gate), f.linear(x, up)), down)

    embed = w("embed", [c["vocab"], D])
    x = f.mul(f.embedding(embed, f.args[0]), f.constant(value=2.0, dtype=DType.f32, shape=[]))
    for i in range(c["layers"]):
        with f.scope(f"layers.{i}"):
            h = f.add(x, attn(norm(x, "attn_norm")))
            x = f.add(h, mlp(norm(h, "mlp_norm")))
    x = norm(x, "final_norm")
    f.ret(f.linear(x, embed))
    return mb.build()


def test_dsl_and_builder_give_identical_ir():
    a, b = load(CASE), python_transformer()
    assert print_module(a) == print_module(b)
    assert a == b


def test_dsl_and_builder_give_identical_results():
    a, b = load(CASE), python_transformer()
    weights = init_weights(a, seed=3)
    assert weights.keys() == init_weights(b, seed=3).keys()
    inputs = random_inputs(a, a.main, {"B": 2, "S": 5}, seed=4)
    assert inputs[0].any()
    (ya,), (yb,) = run(a, inputs, weights), run(b, inputs, weights)
    assert ya.shape == (2, 5, 64) and np.isfinite(ya).all() and np.abs(ya).max() > 0
    np.testing.assert_array_equal(ya, yb)
    # causal: the first position's logits do not depend on later tokens
    changed = [inputs[0].copy()]
    changed[0][:, 1:] = (changed[0][:, 1:] + 1) % 64
    (yc,) = run(a, changed, weights)
    np.testing.assert_allclose(yc[:, 0], ya[:, 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(yc[:, 1:], ya[:, 1:])
