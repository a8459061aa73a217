"""The training step as one IR function: loss (plus the expert balance loss of the `moe-aux-loss` pass when
`aux_loss_alpha > 0`) and gradients (the `grad` pass), clipping, the optimizer update and the MoE balancing-bias rule.

Convention (recorded in module attrs so a runtime needs no guessing):
- `@train_step(tokens, labels, step: int32[])`, `step` counting updates from 1;
- it returns the metrics named in `train_step.metrics` ("loss,lr,grad_norm"; the loss is the one before the
  update), then the new value of every state tensor named in `train_step.state`, in that order;
- state tensors are module params (weights, optimizer moments `adamw.exp_avg.<param>`..., balancing biases): the
  runtime feeds them as weights and replaces each with its new value after the step;
- `train_step.trainable` names the params that get gradient updates.
Name lists are comma-joined strings.
"""

from __future__ import annotations

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.types import DType, TensorType
from r1c.ir.verifier import verify
from r1c.passes import PassManager
from r1c.passes.grad import grad_function
from r1c.passes.moe_aux_loss import moe_aux_loss
from r1c.passes.rewrite import clone_module, erase_dead
from r1c.train.config import TrainConfig
from r1c.train.lora import LORA_MARK, apply_lora
from r1c.train.mixed_precision import to_mixed_precision

STEP_FUNCTION = "train_step"
METRICS = ("loss", "lr", "grad_norm")
BALANCE_BIAS = "e_score_correction_bias"  # a routing buffer, moved by the balancing rule and never by gradients


class TrainStepError(ValueError):
    pass


def names_attr(module: Module, key: str) -> list[str]:
    text = module.attrs.get(f"train_step.{key}", "")
    return text.split(",") if text else []


def optimizer_state_names(cfg: TrainConfig, param: str) -> list[str]:
    if cfg.optimizer == "adamw":
        return [f"adamw.exp_avg.{param}", f"adamw.exp_avg_sq.{param}"]
    return [f"sgd.momentum.{param}"]


def build_train_step(module: Module, cfg: TrainConfig, loss: str = "loss", loss_passes: str = "") -> Module:
    """`module` plus the LoRA adapters/casts `cfg` asks for, `@<loss>_grad` and `@train_step` (see the docstring).
    `loss_passes`: a pipeline run on the loss after those and before differentiation (a target's preferred form,
    e.g. expert fusion, whose grouped GEMMs have GEMM-shaped gradients)."""
    if loss not in module.functions:
        raise TrainStepError(
            f"training needs a loss function @{loss}; module @{module.name} has {sorted(module.functions)}"
        )
    if cfg.aux_loss_alpha > 0:
        module = moe_aux_loss(clone_module(module), alpha=cfg.aux_loss_alpha, function=loss)
    if cfg.lora_rank:
        module = apply_lora(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), function=loss)
    if cfg.precision == "bf16":
        module = to_mixed_precision(module, function=loss, dtype=DType.bf16)
    if loss_passes:
        module = PassManager(loss_passes).run(module)
    module = grad_function(module, function=loss, checkpoint=cfg.recompute)
    src = module.functions[f"{loss}_grad"]
    grad_names = list(module.attrs[f"grad_params.{loss}"])

    mb = ModuleBuilder(module.name)
    mb.module = module
    fb = mb.function(STEP_FUNCTION, **{a.name: a.type for a in src.args}, step=TensorType(DType.int32, ()))
    env = copy_body(fb, src)
    loss_value, grads = env[src.results[0]], dict(zip(grad_names, (env[r] for r in src.results[1:])))
    trainable = [n for n in grad_names if is_trainable(n, cfg)]
    if not trainable:
        raise TrainStepError("nothing to train: no parameter the loss reads is trainable")

    step = fb.args[-1]
    lr = fb.lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, min_lr=cfg.min_lr, kind=cfg.schedule)
    norm = fb.global_norm(*(grads[n] for n in trainable))
    if cfg.clip > 0:
        coef = fb.clip_coef(norm, max_norm=cfg.clip)
        grads = {n: fb.mul(grads[n], coef) for n in trainable}

    new_values = emit_updates(fb, cfg, trainable, grads, lr, step)
    state = [n for name in trainable for n in (name, *optimizer_state_names(cfg, name))]
    if cfg.bias_gamma > 0:
        for bias, value in balance_biases(fb, src, env, cfg.bias_gamma):
            state.append(bias)
            new_values.append(value)

    fb.ret(loss_value, lr, norm, *new_values)
    # The gradients of frozen params (LoRA) are dead here: drop their backward ops.
    erase_dead(fb.function)
    module.attrs.update(
        {
            "train_step.metrics": ",".join(METRICS),
            "train_step.state": ",".join(state),
            "train_step.trainable": ",".join(trainable),
            **cfg.to_attrs(),
        }
    )
    return verify(module)


def emit_updates(
    fb: FunctionBuilder, cfg: TrainConfig, trainable: list[str], grads: dict[str, Value], lr: Value, step: Value
) -> list[Value]:
    """The optimizer step of every trainable parameter: (new param, new optimizer state...) per name, in order."""
    new_values: list[Value] = []
    for name in trainable:
        p = fb.param(name)
        opt = [fb.param(s, p.type, "zeros") for s in optimizer_state_names(cfg, name)]
        with fb.scope(name):
            if cfg.optimizer == "adamw":
                out = fb.adamw_update(
                    p, grads[name], *opt, lr, step, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                )  # fmt: skip
            else:
                out = fb.sgd_update(p, grads[name], *opt, lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        new_values += list(out)
    return new_values


def is_trainable(name: str, cfg: TrainConfig) -> bool:
    """Whether `cfg` trains parameter `name` (not a routing bias; with LoRA, only the adapters)."""
    if name.endswith(BALANCE_BIAS):
        return False
    return LORA_MARK in name if cfg.lora_rank else True


def copy_body(fb: FunctionBuilder, src: Function) -> dict[Value, Value]:
    """Re-emit `src`'s ops into `fb` (whose first args stand for `src`'s); returns the value mapping."""
    env: dict[Value, Value] = dict(zip(src.args, fb.args))
    for op in src.body:
        if op.name == "param":
            env[op.result] = fb.param(op.attrs["name"])
            continue
        with fb.scope(op.loc) if op.loc else _no_scope():
            out = fb.op(op.name, *(env[v] for v in op.operands), **op.attrs)
        env.update(zip(op.results, out if isinstance(out, tuple) else (out,)))
    return env


class _no_scope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def balance_biases(
    fb: FunctionBuilder, src: Function, env: dict[Value, Value], gamma: float
) -> list[tuple[str, Value]]:
    """Per MoE layer: the expert load of this batch (tokens routed to each expert) and the updated routing bias."""
    out = []
    for bias, load in expert_loads(fb, src, env, require=True):
        with fb.scope(bias.rsplit(".gate.", 1)[0]):
            out.append((bias, fb.balance_bias_update(fb.param(bias), load, gamma=gamma)))
    return out


def expert_loads(
    fb: FunctionBuilder, src: Function, env: dict[Value, Value], require: bool = False
) -> list[tuple[str, Value]]:
    """Per MoE layer of `src` (emitted into `fb`, `env` mapping src's values to fb's): its routing bias's name and
    the tokens routed to each of its routed experts, f32 [E]. `require`: no MoE layer is an error."""
    out = []
    params = {op.attrs["name"]: op.result for op in src.body if op.name == "param"}
    for op in _moe_ops(src):
        prefix = (op.loc or "").rsplit(".experts", 1)[0]
        bias = f"{prefix}.gate.{BALANCE_BIAS}"
        if bias not in params:
            raise TrainStepError(
                f"balancing-bias update: the MoE layer at {op.loc!r} has no routing bias @{bias} "
                "(set use_score_bias = true, or train.bias_gamma = 0)"
            )
        n_routed = params[bias].type.shape[0]  # the bias's, not the weights': expert parallelism splits those
        # expert fusion's moe_permute counts the shared experts too: their ids (n_routed, ...) follow the routed
        depth = op.attrs["num_experts"] if op.name == "moe_permute" else n_routed
        with fb.scope(prefix):
            load = fb.reduce_sum(fb.one_hot(env[op.operands[1]], depth=depth), axes=(0, 1))
            if depth != n_routed:
                load = fb.slice(load, axis=0, start=0, stop=n_routed)
        out.append((bias, load))
    if require and not out:
        raise TrainStepError("train.bias_gamma > 0 but the loss has no MoE layers (moe_experts or moe_permute ops)")
    return out


def _moe_ops(f: Function) -> list[Op]:
    """The MoE layers' dispatch ops, unfused or after expert fusion (their second operand holds the expert ids)."""
    return [op for op in f.body if op.name in ("moe_experts", "moe_permute")]
