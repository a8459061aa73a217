"""The `grad` transform itself: naming and order of its results, pruning, errors, the pipeline form,
IR round-trip, and layer checkpointing (identical results, fewer values live across the backward)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from r1c import build
from r1c.frontends import dsl
from r1c.ir import init_weights, registry, run, verify
from r1c.ir.parser import parse_module
from r1c.ir.printer import print_module
from r1c.ir.types import tensor
from r1c.passes import run_pipeline
from r1c.passes.grad import GradError, grad_function
from r1c.passes.grad_liveness import live_across_backward

TINY = Path(__file__).parents[2] / "examples" / "r1-tiny.r1"
ENV = {"B": 2, "S": 8}


@pytest.fixture(scope="module")
def tiny():
    m = dsl.load(str(TINY))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, m.params["model.embed_tokens.weight"].type.shape[0], (ENV["B"], ENV["S"]))
    labels = np.concatenate([tokens[:, 1:], np.full((ENV["B"], 1), -100)], axis=1)
    weights = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_weights(m).items()}
    return m, [tokens.astype(np.int32), labels.astype(np.int32)], weights


def small_module():
    """loss = sum(tanh(x @ w1^T) * c); `unused` is read by a branch that does not reach the loss."""
    mb = build.ModuleBuilder("small")
    fb = mb.function("loss", x=tensor("f32", ["N", 3]), c=tensor("f32", ["N", 4]))
    b = fb.param("b", tensor("f32", [4]))
    w1 = fb.param("w1", tensor("f32", [4, 3]))
    unused = fb.param("unused", tensor("f32", [3]))
    fb.exp(fb.mul(fb.args[0], unused))  # dead branch
    h = fb.tanh(fb.add(fb.linear(fb.args[0], w1), b))
    fb.ret(fb.reduce_sum(fb.mul(h, fb.args[1]), axes=(0, 1)))
    return mb.build()


def test_results_follow_module_param_order_and_are_recorded():
    m = grad_function(small_module(), "loss")
    f = m.functions["loss_grad"]
    assert m.attrs["grad_params.loss"] == ("b", "w1", "unused")
    assert [a.name for a in f.args] == ["x", "c"]
    assert [r.type for r in f.results] == [tensor("f32", []), *(p.type for p in m.params.values())]
    verify(m)
    assert "loss" in m.functions and "loss_grad" not in small_module().functions  # the input is not changed


def test_small_gradients_and_pruning():
    m = grad_function(small_module(), "loss")
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    w = {"b": rng.standard_normal(4), "w1": rng.standard_normal((4, 3)), "unused": rng.standard_normal(3)}
    loss, gb, gw1, gunused = run(m, [x, c], w, function="loss_grad")
    dh = c * (1 - np.tanh(x @ w["w1"].T + w["b"]) ** 2)
    np.testing.assert_allclose(gb, dh.sum(0), rtol=1e-5)
    np.testing.assert_allclose(gw1, dh.T @ x, rtol=1e-5)
    assert not gunused.any()
    # The branch that does not reach the loss is neither copied nor differentiated.
    names = [op.name for op in m.functions["loss_grad"].body]
    assert "exp" not in names and names.count("tanh") == 1


def test_pipeline_form_and_ir_round_trip():
    m = run_pipeline(small_module(), 'grad{function="loss",checkpoint="none"}')
    assert "loss_grad" in m.functions
    assert parse_module(print_module(m)) == m


def test_errors_name_the_problem(monkeypatch):
    m = small_module()
    with pytest.raises(GradError, match="no function @nope"):
        grad_function(m, "nope")
    with pytest.raises(GradError, match="checkpoint must be one of"):
        grad_function(m, "loss", checkpoint="op")
    with pytest.raises(GradError, match="already has a function @loss_grad"):
        grad_function(grad_function(m, "loss"), "loss")
    mb = build.ModuleBuilder("vec")
    fb = mb.function("loss", x=tensor("f32", [3]))
    fb.ret(fb.mul(fb.args[0], fb.param("w", tensor("f32", [3]))))
    with pytest.raises(GradError, match="must return one float scalar"):
        grad_function(mb.build(), "loss")
    monkeypatch.setitem(registry._REGISTRY, "tanh", dataclasses.replace(registry.get("tanh"), vjp=None))
    with pytest.raises(GradError, match=r"'tanh' defining %\w+ has no VJP rule"):
        grad_function(m, "loss")


def test_second_order_is_a_clear_error():
    m = grad_function(small_module(), "loss")
    f = m.functions["loss_grad"]
    m.functions["again"] = dataclasses.replace(f, name="again", results=[f.results[1]], body=list(f.body))
    m.functions["again"].results = [m.functions["again"].body[-1].results[0]]
    with pytest.raises((GradError, NotImplementedError)):
        grad_function(m, "again")


@pytest.mark.parametrize("mode", ["none", "layer"])
def test_tiny_grad_matches_finite_differences_on_smooth_params(tiny, mode):
    """Spot-check against central differences in float64 on parameters away from routing decisions."""
    m, inputs, weights = tiny
    g = grad_function(m, "loss", checkpoint=mode)
    names = g.attrs["grad_params.loss"]
    _, *grads = run(g, inputs, weights, function="loss_grad")
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.2.self_attn.kv_b_proj.weight"):
        grad = grads[names.index(name)]
        idx = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
        eps = 1e-3
        plus, minus = dict(w64), dict(w64)
        plus[name], minus[name] = w64[name].copy(), w64[name].copy()
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (run(m, inputs, plus, function="loss")[0] - run(m, inputs, minus, function="loss")[0]) / (2 * eps)
        assert abs(grad[idx] - fd) <= 2e-3 * abs(fd), (name, grad[idx], fd)


def test_layer_checkpointing_is_bit_identical_and_keeps_fewer_values_live(tiny):
    m, inputs, weights = tiny
    plain = grad_function(m, "loss", checkpoint="none")
    ckpt = grad_function(m, "loss", checkpoint="layer")
    for a, b in zip(
        run(plain, inputs, weights, function="loss_grad"), run(ckpt, inputs, weights, function="loss_grad")
    ):
        np.testing.assert_array_equal(a, b)
    live_plain = live_across_backward(plain.functions["loss_grad"], ENV)
    live_ckpt = live_across_backward(ckpt.functions["loss_grad"], ENV)
    layers = m.attrs.get("num_layers", 3)
    # Checkpointed: the layer inputs (and a few values outside the layers) stay; far fewer than all activations.
    assert live_ckpt.values < live_plain.values / 4
    assert live_ckpt.bytes() < live_plain.bytes() / 2
    assert live_ckpt.values >= layers
    # Every layer's forward is recomputed: each rmsnorm of a layer appears twice.
    ops = ckpt.functions["loss_grad"].body
    norms = [op for op in ops if op.name == "rmsnorm" and (op.loc or "").startswith("model.layers.1.")]
    assert len(norms) == 2 * len(
        [op for op in m.functions["loss"].body if op.name == "rmsnorm" and (op.loc or "").startswith("model.layers.1.")]
    )
