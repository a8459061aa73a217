"""moe-aux-loss: the added term equals DeepSeek's balance loss computed independently in torch, and its gradient
reaches the router through the affinities only (training with it: tests/train/test_balancing.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c import build
from r1c.ir import run
from r1c.ir.interpreter import init_weights
from r1c.passes import PipelineError, run_pipeline
from r1c.passes.grad import grad_function

B, S, D, E, K, V = 3, 5, 8, 6, 2, 11


def _logits(fb: build.FunctionBuilder, tokens, scoring: str):
    """tokens -> embedding -> router (sigmoid or softmax, top-K) -> moe_experts -> logits [B*S, V]."""
    table = fb.param("embed", build.tensor("f32", [V, D]), "normal(0.5)")
    x = fb.reshape(fb.embedding(table, tokens), shape=["B*S", D])
    with fb.scope("mlp.gate"):
        logits = fb.linear(x, fb.param("gate", build.tensor("f32", [E, D]), "normal(0.5)"))
        scores = fb.sigmoid(logits) if scoring == "sigmoid" else fb.softmax(logits, axis=-1)
        _, ids = fb.topk(scores, k=K)
        weights = fb.gather(scores, ids, axis=-1)
        weights = fb.div(weights, fb.reduce_sum(weights, axes=[-1], keepdims=True))
    with fb.scope("mlp.experts"):
        w = [fb.param(n, build.tensor("f32", shape), "normal(0.3)") for n, shape in
             [("g", [E, 4, D]), ("u", [E, 4, D]), ("d", [E, D, 4])]]  # fmt: skip
        y = fb.moe_experts(x, ids, weights, *w)
    return fb.linear(y, fb.param("head", build.tensor("f32", [V, D]), "normal(0.5)"))


def _moe_loss_module(scoring: str):
    """A model with `forward` (logits) and `loss` (cross-entropy against labels), like the stdlib's."""
    mb = build.ModuleBuilder("m")
    tokens_t = build.tensor("int32", ["B", "S"])
    fb = mb.function("forward", tokens=tokens_t)
    fb.ret(_logits(fb, fb.args[0], scoring))
    fb = mb.function("loss", tokens=tokens_t, labels=tokens_t)
    tokens, labels = fb.args
    fb.ret(fb.cross_entropy(_logits(fb, tokens, scoring), fb.reshape(labels, shape=["B*S"])))
    return mb.build()


def _torch_balance_loss(wts: dict, tokens: np.ndarray, scoring: str, per_sequence: bool) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20 (per sequence) / V2's expert-level loss (whole batch), written out directly."""
    gate = torch.tensor(wts["gate"], requires_grad=True)
    x = torch.tensor(wts["embed"])[torch.tensor(tokens).long()].reshape(-1, D)
    logits = x @ gate.T
    s = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, -1)
    ids = torch.topk(s, K, dim=-1).indices
    groups = s.reshape(B, S, E) if per_sequence else s.reshape(1, B * S, E)
    chosen = torch.zeros(B * S, E).scatter_(1, ids, 1.0).reshape(groups.shape)
    t = groups.shape[1]
    f = E / (K * t) * chosen.sum(1)
    p = (groups / groups.sum(-1, keepdim=True)).mean(1)
    loss = (f * p).sum(-1).mean()
    loss.backward()
    return loss.detach(), gate.grad


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("per_sequence", [True, False])
def test_added_term_and_its_gradient_match_torch(scoring: str, per_sequence: bool) -> None:
    m = _moe_loss_module(scoring)
    rng = np.random.default_rng(0)
    wts = init_weights(m, seed=1)
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    alpha = 0.3
    aux = run_pipeline(m, f"moe-aux-loss{{alpha={alpha}, per_sequence={str(per_sequence).lower()}}}")
    (base,) = run(m, [tokens, labels], wts, function="loss")
    (total,) = run(aux, [tokens, labels], wts, function="loss")
    want, want_grad = _torch_balance_loss(wts, tokens, scoring, per_sequence)
    assert abs((total - base) - alpha * float(want)) < 1e-6
    assert float(want) > 0.5  # roughly 1 when balanced: the check is not comparing two zeros

    def gate_grad(module):
        g = grad_function(module, "loss")
        names = list(g.attrs["grad_params.loss"])
        return run(g, [tokens, labels], wts, function="loss_grad")[1 + names.index("gate")]

    np.testing.assert_allclose(gate_grad(aux) - gate_grad(m), alpha * want_grad.numpy(), atol=1e-6, rtol=1e-4)


def test_errors_name_the_problem() -> None:
    m = _moe_loss_module("sigmoid")
    with pytest.raises(PipelineError, match="alpha must be > 0"):
        run_pipeline(m, "moe-aux-loss{alpha=0.0}")
    with pytest.raises(PipelineError, match="no function @train"):
        run_pipeline(m, 'moe-aux-loss{function="train"}')
    with pytest.raises(PipelineError, match="no MoE layer"):
        run_pipeline(m, "expert-fusion,moe-aux-loss")
