"""Training-step ops: optimizer updates (AdamW, SGD), global-norm gradient clipping, the learning-rate schedule and
the bias update of auxiliary-loss-free MoE balancing.

They follow PyTorch's definitions (torch.optim.AdamW/SGD, torch.nn.utils.clip_grad_norm_) so an r1c training run can
be compared step by step with a PyTorch one. None of them is differentiated: they run after the backward pass.
"""

from __future__ import annotations

import math

import numpy as np

from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, elementwise_cost, numel, register
from r1c.ir.types import DType, TensorType

SCALAR = TensorType(DType.f32, ())


def _not_differentiable(fb, op, cotangents):
    raise OpError(f"{op.name} is an optimizer/training-step op and is not differentiable; differentiate the loss")


def _require_scalar(op: str, t: TensorType, what: str) -> None:
    if t.rank != 0:
        raise OpError(f"{op}: {what} must be a scalar [], got {t}")


def _same_shape(op: str, a: TensorType, b: TensorType, what: str) -> None:
    if a.rank != b.rank:
        raise OpError(f"{op}: {what} shapes differ: {a} vs {b}")
    for x, y in zip(a.shape, b.shape):
        same_dim(op, x, y, what)


def _require_f32(op: str, t: TensorType, what: str) -> None:
    if t.dtype != DType.f32:
        raise OpError(f"{op}: {what} must be f32 (master copies and optimizer state stay in f32), got {t}")


# ---- AdamW ----


def _adamw_rule(ins, a):
    p, g, m, v, lr, step = ins
    for t, what in ((p, "param"), (m, "exp_avg"), (v, "exp_avg_sq")):
        _require_f32("adamw_update", t, what)
    require_float("adamw_update", g)
    for t, what in ((g, "grad"), (m, "exp_avg"), (v, "exp_avg_sq")):
        _same_shape("adamw_update", p, t, f"param and {what}")
    _require_scalar("adamw_update", lr, "lr")
    _require_f32("adamw_update", lr, "lr")
    _require_scalar("adamw_update", step, "step")
    require_int("adamw_update", step, "step")
    return [p, m, v]


def _adamw_ref(ins, a):
    p, g, m, v, lr, step = (np.asarray(x) for x in ins)
    t, lr = int(step), float(lr)
    if t < 1:
        raise OpError(f"adamw_update: step counts updates from 1, got {t}")
    b1, b2 = a["beta1"], a["beta2"]
    g = g.astype(np.float64)
    # torch.optim.AdamW: decoupled decay first, then the moments (stored in f32), then the bias-corrected step.
    p = p.astype(np.float64) * (1.0 - lr * a["weight_decay"])
    m = (b1 * m.astype(np.float64) + (1.0 - b1) * g).astype(np.float32)
    v = (b2 * v.astype(np.float64) + (1.0 - b2) * g * g).astype(np.float32)
    denom = np.sqrt(v.astype(np.float64)) / math.sqrt(1.0 - b2**t) + a["eps"]
    p = p - (lr / (1.0 - b1**t)) * m.astype(np.float64) / denom
    return [p, m, v]


register(
    OpDef(
        "adamw_update",
        "One torch.optim.AdamW step for one tensor: returns (param, exp_avg, exp_avg_sq) after the update "
        "with learning rate `lr` at update number `step` (from 1).",
        ("param", "grad", "exp_avg", "exp_avg_sq", "lr", "step"),
        _adamw_rule,
        _adamw_ref,
        lambda ins, outs, a: Cost(14 * numel(ins[0]), bytes_of(ins) + bytes_of(outs)),
        {
            "beta1": AttrSpec("float", 0.9),
            "beta2": AttrSpec("float", 0.999),
            "eps": AttrSpec("float", 1e-8),
            "weight_decay": AttrSpec("float", 0.01),
        },
        vjp=_not_differentiable,
    )
)


# ---- SGD ----


def _sgd_rule(ins, a):
    p, g, buf, lr = ins
    _require_f32("sgd_update", p, "param")
    _require_f32("sgd_update", buf, "momentum buffer")
    require_float("sgd_update", g)
    _same_shape("sgd_update", p, g, "param and grad")
    _same_shape("sgd_update", p, buf, "param and momentum buffer")
    _require_scalar("sgd_update", lr, "lr")
    _require_f32("sgd_update", lr, "lr")
    return [p, buf]


def _sgd_ref(ins, a):
    p, g, buf, lr = (np.asarray(x) for x in ins)
    p64 = p.astype(np.float64)
    # torch.optim.SGD (dampening 0): weight decay is added to the gradient; the buffer starts at zero, so its first
    # value is the gradient, as torch's first step sets it.
    d = g.astype(np.float64) + a["weight_decay"] * p64
    if a["momentum"]:
        d = (a["momentum"] * buf.astype(np.float64) + d).astype(np.float32)
        buf = d
    return [p64 - float(lr) * d.astype(np.float64), buf]


register(
    OpDef(
        "sgd_update",
        "One torch.optim.SGD step (momentum, weight decay, no dampening) for one tensor: returns (param, "
        "momentum buffer); the buffer passes through unchanged when momentum is 0.",
        ("param", "grad", "momentum_buf", "lr"),
        _sgd_rule,
        _sgd_ref,
        lambda ins, outs, a: Cost(4 * numel(ins[0]), bytes_of(ins) + bytes_of(outs)),
        {"momentum": AttrSpec("float", 0.0), "weight_decay": AttrSpec("float", 0.0)},
        vjp=_not_differentiable,
    )
)


# ---- gradient clipping ----


def _global_norm_rule(ins, a):
    if not ins:
        raise OpError("global_norm needs at least one operand")
    for t in ins:
        require_float("global_norm", t)
    return [SCALAR]


register(
    OpDef(
        "global_norm",
        "sqrt of the sum of squares of every element of every operand (the norm clip_grad_norm_ clips).",
        ("*xs",),
        _global_norm_rule,
        lambda ins, a: [np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in ins))],
        lambda ins, outs, a: Cost(2 * sum(numel(t) for t in ins), bytes_of(ins) + bytes_of(outs)),
        vjp=_not_differentiable,
    )
)


def _clip_coef_rule(ins, a):
    (norm,) = ins
    _require_scalar("clip_coef", norm, "norm")
    _require_f32("clip_coef", norm, "norm")
    if a["max_norm"] <= 0:
        raise OpError(f"clip_coef: max_norm must be > 0, got {a['max_norm']}")
    return [SCALAR]


register(
    OpDef(
        "clip_coef",
        "min(1, max_norm / (norm + eps)): the factor clip_grad_norm_ multiplies every gradient by.",
        ("norm",),
        _clip_coef_rule,
        lambda ins, a: [np.minimum(1.0, a["max_norm"] / (float(ins[0]) + a["eps"]))],
        elementwise_cost(2),
        {"max_norm": AttrSpec("float"), "eps": AttrSpec("float", 1e-6)},
        vjp=_not_differentiable,
    )
)


# ---- learning-rate schedule ----


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float, kind: str) -> float:
    """The learning rate of update number `step` (from 1): linear warmup over `warmup` updates, then `kind` decay
    from `lr` to `min_lr` at update `total`."""
    if step < 1:
        raise OpError(f"lr_schedule: step counts updates from 1, got {step}")
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if kind == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_lr + (lr - min_lr) * shape


def _lr_rule(ins, a):
    (step,) = ins
    _require_scalar("lr_schedule", step, "step")
    require_int("lr_schedule", step, "step")
    if a["warmup"] < 0 or a["total"] < 1:
        raise OpError(f"lr_schedule: needs warmup >= 0 and total >= 1, got warmup={a['warmup']}, total={a['total']}")
    return [SCALAR]


register(
    OpDef(
        "lr_schedule",
        "Learning rate of update `step` (from 1): linear warmup to `lr` over `warmup` updates, then constant, "
        "cosine or linear decay to `min_lr` at update `total`.",
        ("step",),
        _lr_rule,
        lambda ins, a: [np.float64(lr_at(int(ins[0]), a["lr"], a["warmup"], a["total"], a["min_lr"], a["kind"]))],
        elementwise_cost(8),
        {
            "lr": AttrSpec("float"),
            "warmup": AttrSpec("int", 0),
            "total": AttrSpec("int", 1),
            "min_lr": AttrSpec("float", 0.0),
            "kind": AttrSpec("str", "cosine", ("constant", "cosine", "linear")),
        },
        vjp=_not_differentiable,
    )
)


# ---- auxiliary-loss-free balancing ----


def _bias_rule(ins, a):
    bias, load = ins
    require_rank("balance_bias_update", bias, 1, "bias [E]")
    require_rank("balance_bias_update", load, 1, "expert load [E]")
    _require_f32("balance_bias_update", bias, "bias")
    require_float("balance_bias_update", load)
    same_dim("balance_bias_update", bias.shape[0], load.shape[0], "experts")
    return [bias]


def _bias_ref(ins, a):
    bias, load = (x.astype(np.float64) for x in ins)
    # DeepSeek-V3: under-loaded experts (load below the mean) get their bias raised by gamma, over-loaded lowered.
    return [bias + a["gamma"] * np.sign(load.mean() - load)]


register(
    OpDef(
        "balance_bias_update",
        "DeepSeek-V3 auxiliary-loss-free balancing: bias + gamma * sign(mean(load) - load), where load[e] counts "
        "the tokens routed to expert e in this step. A rule, not a gradient.",
        ("bias", "load"),
        _bias_rule,
        _bias_ref,
        elementwise_cost(3),
        {"gamma": AttrSpec("float", 0.001)},
        vjp=_not_differentiable,
    )
)
