"""The IR of pipeline-parallel training: the stages of `@loss` (`pipeline-partition`), each stage's backward
(`stage_vjp`) and each stage's optimizer update, all in one module that every rank builds identically.

Per stage k the module holds
- `@loss.stage<k>`: the forward (from `pipeline-partition`; its results are stage k+1's received arguments),
- `@loss.stage<k>.vjp`: its vector-Jacobian product (`r1c.distributed.stage_grad`),
- `@loss.stage<k>.update(step, norm, grads...)`: clipping by the global norm (computed across ranks by the
  runtime and passed in), the learning-rate schedule and `adamw_update`/`sgd_update` for the stage's own
  trainable parameters: the same ops, attributes and optimizer state names `@train_step` uses
  (`r1c.train.step`), so the state is interchangeable with the single-process trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.distributed.stage_grad import VJP_SUFFIX, float_values, stage_vjp
from r1c.ir.core import Function, Module, Value
from r1c.ir.types import DType, TensorType
from r1c.ir.verifier import verify
from r1c.passes import PassManager
from r1c.passes.pipeline_partition import pipeline_partition, stage_functions
from r1c.passes.pipeline_schedule import SCHEDULES
from r1c.train.config import TrainConfig
from r1c.train.lora import apply_lora
from r1c.train.mixed_precision import to_mixed_precision
from r1c.train.step import emit_updates, expert_loads, is_trainable, optimizer_state_names
from r1c.train.step_runner import loss_passes

LOSS = "loss"
UPDATE_SUFFIX = ".update"


class DistributedError(ValueError):
    """A pipeline setup r1c does not support, or a bad option: raised before any process talks to another."""


@dataclass(frozen=True)
class PipelineConfig:
    stages: int
    micro_batches: int = 1
    schedule: str = "gpipe"
    timeout_s: float = 300.0  # gloo: how long a rank waits for a peer before it stops with an error
    data_parallel: int = 1  # R pipeline replicas, each on 1/R of the batch: S * R processes
    # E > 1: the routed experts are split over the R = E replicas of each stage (expert_parallel.py); then one
    # stage (no --pipeline) is allowed: E processes, each a data-parallel replica holding 1/E of the experts.
    expert_parallel: int = 1
    target: str = "ref"  # where each stage runs: ref (numpy interpreter) or cuda (Triton kernels on the rank's GPU)
    comm: str = "gloo"  # the process-group backend: gloo (host transfers) or nccl (GPU to GPU; needs target cuda)

    @property
    def world(self) -> int:
        return self.stages * self.data_parallel

    @property
    def flags(self) -> str:
        """The command-line options that ask for this layout (error messages)."""
        out = f"--pipeline {self.stages}" if self.stages > 1 or self.expert_parallel == 1 else ""
        if self.data_parallel > 1 and self.data_parallel != self.expert_parallel:
            out += f" --data-parallel {self.data_parallel}"
        if self.expert_parallel > 1:
            out += f" --expert-parallel {self.expert_parallel}"
        return out.strip()

    def __post_init__(self) -> None:
        if self.data_parallel < 1:
            raise DistributedError(f"--data-parallel must be >= 1, got {self.data_parallel}")
        if self.expert_parallel < 1:
            raise DistributedError(f"--expert-parallel must be >= 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and self.data_parallel != self.expert_parallel:
            raise DistributedError(
                f"--expert-parallel {self.expert_parallel} splits the experts over the data-parallel replicas: "
                f"it needs --data-parallel {self.expert_parallel} (or none), got {self.data_parallel}"
            )
        if self.stages < (1 if self.expert_parallel > 1 else 2):
            raise DistributedError(f"--pipeline needs at least 2 stages, got {self.stages}")
        if self.micro_batches < 1:
            raise DistributedError(f"--micro-batches must be >= 1, got {self.micro_batches}")
        if self.schedule not in SCHEDULES:
            raise DistributedError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.target not in ("ref", "cuda"):
            raise DistributedError(f"--target must be ref or cuda, got {self.target!r}")
        if self.comm not in ("gloo", "nccl"):
            raise DistributedError(f"--comm must be gloo or nccl, got {self.comm!r}")
        if self.comm == "nccl" and self.target != "cuda":
            raise DistributedError("--comm nccl moves GPU tensors: it needs --target cuda")
        if self.target == "cuda" and self.expert_parallel > 1:
            raise DistributedError(
                "--expert-parallel runs on the reference interpreter only (no GPU all-to-all dispatch yet)"
            )
        if self.timeout_s <= 0:
            raise DistributedError(f"the timeout must be > 0 seconds, got {self.timeout_s}")


@dataclass(frozen=True)
class StagePlan:
    """What rank k runs: its functions, which of the stage's arguments come from rank k-1, and its parameters."""

    index: int
    forward: Function
    vjp: Function
    update: Function | None  # None: the stage reads no trainable parameter
    inputs: tuple[str, ...]  # the original arguments of @loss the stage reads (each rank has the batch)
    received: tuple[str, ...]  # arguments sent by stage k-1, in order (= its results)
    grad_params: tuple[str, ...]  # the parameters whose gradients @vjp returns, in order
    trainable: tuple[str, ...]
    state: tuple[str, ...]  # tensors this rank owns and updates: params + optimizer state, in the update's order
    # With expert parallelism: the tensors of `state` that are a row block of the whole (expert weights and their
    # optimizer state): each replica holds its own block, and their gradients are not all-reduced.
    experts: tuple[str, ...] = ()
    # With bias_gamma > 0: the routing biases the update moves, in order; @vjp returns each one's expert load after
    # the gradients (summed over micro-batches and replicas by the runner) and @update takes them after the grads.
    biases: tuple[str, ...] = ()

    @property
    def n_received_float(self) -> int:
        return len(float_values([a for a in self.forward.args if a.name in self.received]))


def check_supported(cfg: TrainConfig, pc: PipelineConfig) -> None:
    """Options of `r1c train` the pipeline runtime does not implement: a clear error instead of a wrong result."""
    if cfg.batch % (pc.micro_batches * pc.data_parallel):
        raise DistributedError(
            f"the batch ({cfg.batch}) must be a multiple of --micro-batches ({pc.micro_batches})"
            + (
                f" times --{'expert' if pc.expert_parallel > 1 else 'data'}-parallel ({pc.data_parallel})"
                if pc.data_parallel > 1
                else ""
            )
            + ": micro-batches of equal size"
        )
    unsupported = {
        "aux_loss_alpha": (cfg.aux_loss_alpha, 0.0, "the expert balance loss (its per-sequence terms cross stages)"),
        "recompute": (cfg.recompute, "none", "recompute=layer (each stage already recomputes its forward)"),
    }
    for key, (value, default, what) in unsupported.items():
        if value != default:
            raise DistributedError(
                f"pipeline training does not support {what} yet: train.{key} = {value!r} (only {default!r})"
            )


def loss_ignore_index(module: Module) -> int:
    """Micro-batch losses combine exactly into the batch loss only for a mean cross-entropy over kept rows:
    loss = sum_m kept_m / kept * loss_m. Returns that op's ignore_index; anything else is an error."""
    f = module.functions[LOSS]
    (result,) = f.results
    producer = next((op for op in f.body if result in op.results), None)
    if producer is None or producer.name != "cross_entropy":
        raise DistributedError(
            f"pipeline training needs @{LOSS} to return a cross_entropy (a mean over tokens, so micro-batch losses "
            f"can be combined exactly); @{module.name}'s returns {producer.name if producer else 'an argument'}"
        )
    return int(producer.attrs["ignore_index"])


def build_pipeline(base: Module, cfg: TrainConfig, pc: PipelineConfig) -> tuple[Module, list[StagePlan]]:
    """The module with every stage's forward, VJP and update functions, and the per-stage plans."""
    check_supported(cfg, pc)
    if LOSS not in base.functions:
        raise DistributedError(f"training needs a loss function @{LOSS}; @{base.name} has {sorted(base.functions)}")
    loss_ignore_index(base)
    experts: list[str] = []
    if pc.expert_parallel > 1:
        from r1c.distributed.expert_shard import shard_module  # it raises this module's DistributedError

        base, experts = shard_module(base, LOSS, pc.expert_parallel)
    # As `build_train_step` does before differentiating, here before partitioning: each stage holds its own
    # adapters and casts, in the target's preferred form (expert fusion on cuda).
    if cfg.lora_rank:
        base = apply_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), function=LOSS)
    if cfg.precision == "bf16":
        base = to_mixed_precision(base, function=LOSS, dtype=DType.bf16)
    if passes := loss_passes(pc.target):
        base = PassManager(passes).run(base)
    module = pipeline_partition(
        base,
        stages=pc.stages,
        function=LOSS,
        batch=cfg.batch // (pc.micro_batches * pc.data_parallel),
        seq=cfg.seq,
        micro_batches=pc.micro_batches,
    )
    stages = stage_functions(module, LOSS)
    owner: dict[str, int] = {}
    for k, f in enumerate(stages):
        for op in f.body:
            if op.name == "param":
                name = op.attrs["name"]
                if owner.setdefault(name, k) != k:
                    # A tied weight (e.g. tie_embeddings) would need its gradient summed across the two ranks.
                    raise DistributedError(
                        f"parameter @{name} is read by stages {owner[name]} and {k} (a tied weight); pipeline "
                        "training needs each parameter on one stage"
                    )
    io = stage_io(stages, [a.name for a in base.functions[LOSS].args], LOSS)
    plans = []
    for k, (f, (inputs, received_names)) in enumerate(zip(stages, io)):
        received = [a for a in f.args if a.name in received_names]
        # With LoRA the frozen weights get no gradient at all (the VJP skips their weight-gradient GEMMs).
        biases: list[str] = []  # filled by the VJP's load results, in their order
        wrt = (lambda n: is_trainable(n, cfg)) if cfg.lora_rank else None
        vjp, grad_names = stage_vjp(module, f, received, wrt, _load_results(f, biases) if cfg.bias_gamma > 0 else None)
        trainable = [n for n in grad_names if is_trainable(n, cfg)]
        update = _build_update(module, f.name + UPDATE_SUFFIX, cfg, trainable, biases) if trainable else None
        state = [s for n in trainable for s in (n, *optimizer_state_names(cfg, n))] + biases
        # Parameters without a gradient (the routing bias) still belong to this rank: it reads them.
        state += [n for n in grad_names if n not in trainable]
        state += [op.attrs["name"] for op in f.body if op.name == "param" and op.attrs["name"] not in state]
        blocks = [s for n in experts if n in state for s in (n, *optimizer_state_names(cfg, n)) if s in state]
        plans.append(
            StagePlan(
                k, f, vjp, update, inputs, tuple(a.name for a in received), tuple(grad_names), tuple(trainable),
                tuple(state), tuple(blocks), tuple(biases),
            )
        )  # fmt: skip
    return verify(module), plans


def _load_results(f: Function, biases: list[str]) -> Callable[[FunctionBuilder, dict[Value, Value]], list[Value]]:
    """`stage_vjp`'s `extra`: the expert load of each MoE layer of stage `f`; appends their biases to `biases`."""

    def loads(fb: FunctionBuilder, env: dict[Value, Value]) -> list[Value]:
        found = expert_loads(fb, f, env)
        biases.extend(name for name, _ in found)
        return [load for _, load in found]

    return loads


def stage_io(
    stages: list[Function], original: list[str], function: str
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per stage: (the original inputs it reads, the arguments stage k-1 sends it, in order).

    The partition's contract, which the wire format relies on: stage k-1's results, in order, are stage k's
    received arguments; everything else a stage reads is an original input that every rank has."""
    out = []
    for k, f in enumerate(stages):
        sent = [r.name for r in stages[k - 1].results] if k else []
        received = tuple(a.name for a in f.args if a.name in sent)
        inputs = tuple(a.name for a in f.args if a.name not in sent)
        if list(received) != sent or not set(inputs) <= set(original):
            raise DistributedError(
                f"@{f.name}: its arguments {[a.name for a in f.args]} are not @{function}'s inputs followed by what "
                f"stage {k - 1} sends ({sent})"
            )
        out.append((inputs, received))
    return out


def _build_update(module: Module, name: str, cfg: TrainConfig, trainable: list[str], biases: list[str]) -> Function:
    """`@name(step, norm, grad..., load...)` -> new (param, optimizer state...) per trainable param, as
    `@train_step`, then each routing bias moved by its expert load (the balancing rule)."""
    mb = ModuleBuilder(module.name)
    mb.module = module
    scalar = TensorType(DType.f32, ())
    grads_t = {f"grad.{n}": module.params[n].type for n in trainable}
    loads_t = {f"load.{n}": TensorType(DType.f32, module.params[n].type.shape) for n in biases}
    fb = mb.function(name, step=TensorType(DType.int32, ()), norm=scalar, **grads_t, **loads_t)
    step, norm, grads = fb.args[0], fb.args[1], dict(zip(trainable, fb.args[2:]))
    loads = fb.args[2 + len(trainable) :]
    lr = fb.lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, min_lr=cfg.min_lr, kind=cfg.schedule)
    if cfg.clip > 0:
        coef = fb.clip_coef(norm, max_norm=cfg.clip)
        grads = {n: fb.mul(grads[n], coef) for n in trainable}
    new_biases = []
    for bias, load in zip(biases, loads):
        with fb.scope(bias.rsplit(".gate.", 1)[0]):
            new_biases.append(fb.balance_bias_update(fb.param(bias), load, gamma=cfg.bias_gamma))
    fb.ret(*emit_updates(fb, cfg, trainable, grads, lr, step), *new_biases)
    return fb.function


__all__ = [
    "DistributedError",
    "PipelineConfig",
    "StagePlan",
    "VJP_SUFFIX",
    "build_pipeline",
    "check_supported",
    "stage_io",
]
