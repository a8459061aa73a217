"""The training-step ops against PyTorch's optimizers and clipping, run through the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.build import BuildError, ModuleBuilder, tensor
from r1c.ir import registry, run
from r1c.ir.core import Op
from r1c.ir.ops.optim import lr_at

RNG = np.random.default_rng(0)


def run_op(opname: str, inputs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    """Build a one-op function over `inputs` and run it with the interpreter."""
    mb = ModuleBuilder("t")
    types = {f"x{i}": tensor("int32" if x.dtype.kind == "i" else "f32", list(x.shape)) for i, x in enumerate(inputs)}
    fb = mb.function("f", **types)
    out = fb.op(opname, *fb.args, **attrs)
    fb.ret(*(out if isinstance(out, tuple) else (out,)))
    return run(mb.build(), inputs, {})


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_adamw_matches_torch_over_steps() -> None:
    p0 = randn(5, 7)
    hp = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([tp], lr=1.0, **hp)
    p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
    for step, lr in enumerate([1e-2, 3e-3, 5e-2, 1e-3], start=1):
        g = randn(5, 7)
        tp.grad = torch.tensor(g)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        p, m, v = run_op(
            "adamw_update",
            [p, g, m, v, np.float32(lr), np.int32(step)],
            beta1=0.8,
            beta2=0.95,
            eps=1e-6,
            weight_decay=0.1,
        )
        state = opt.state[tp]
        np.testing.assert_allclose(m, state["exp_avg"].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(p - p0).max() > 1e-3  # the parameter did move


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.05)])
def test_sgd_matches_torch(momentum: float, wd: float) -> None:
    p0 = randn(6)
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=momentum, weight_decay=wd)
    p, buf = p0, np.zeros_like(p0)
    for _ in range(3):
        g = randn(6)
        tp.grad = torch.tensor(g)
        opt.step()
        p, buf = run_op("sgd_update", [p, g, buf, np.float32(0.1)], momentum=momentum, weight_decay=wd)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    if momentum:
        np.testing.assert_allclose(buf, opt.state[tp]["momentum_buffer"].numpy(), rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_clip_grad_norm(max_norm: float) -> None:
    grads = [randn(3, 4), randn(5), randn(2, 2, 2)]
    (norm,) = run_op("global_norm", grads)
    (coef,) = run_op("clip_coef", [norm], max_norm=max_norm)
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for tp, g in zip(params, grads):
        tp.grad = torch.tensor(g)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    np.testing.assert_allclose(norm, total.item(), rtol=1e-6)
    for tp, g in zip(params, grads):
        np.testing.assert_allclose(g * coef, tp.grad.numpy(), rtol=1e-6)
    assert (coef < 1.0) == (float(norm) > max_norm)


def test_lr_schedule_warmup_then_cosine() -> None:
    attrs = dict(lr=1e-3, warmup=10, total=50, min_lr=1e-4, kind="cosine")
    got = [float(run_op("lr_schedule", [np.int32(s)], **attrs)[0]) for s in (1, 5, 10, 30, 50, 60)]
    want = [1e-4, 5e-4, 1e-3, (1e-3 + 1e-4) / 2, 1e-4, 1e-4]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert lr_at(20, 1.0, 0, 40, 0.0, "linear") == pytest.approx(0.5)
    assert lr_at(7, 2.0, 3, 40, 0.0, "constant") == 2.0


def test_bias_update_rule_matches_numpy() -> None:
    bias, load = randn(8), RNG.integers(0, 20, 8).astype(np.float32)
    (got,) = run_op("balance_bias_update", [bias, load], gamma=0.01)
    want = bias.astype(np.float64).copy()
    for e in range(8):  # the rule written out per expert
        if load[e] < load.mean():
            want[e] += 0.01
        elif load[e] > load.mean():
            want[e] -= 0.01
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_type_errors_are_named() -> None:
    mb = ModuleBuilder("t")
    fb = mb.function("f", p=tensor("f32", [4]), g=tensor("f32", [5]), lr=tensor("f32", []))
    with pytest.raises(BuildError, match="param and grad"):
        fb.op("sgd_update", fb.args[0], fb.args[1], fb.args[0], fb.args[2])
    with pytest.raises(BuildError, match="step must be int32"):
        fb.op("lr_schedule", fb.args[2], lr=1.0)


@pytest.mark.parametrize(
    "name", ["adamw_update", "sgd_update", "global_norm", "clip_coef", "lr_schedule", "balance_bias_update"]
)
def test_training_ops_refuse_differentiation(name: str) -> None:
    opdef = registry.get(name)
    assert opdef.vjp is not None
    with pytest.raises(ValueError, match="not differentiable"):
        opdef.vjp(None, Op(name, (), ()), [None])
