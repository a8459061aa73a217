"""Pipelined inference (`r1c run --pipeline S`): the entry function of a model (`forward`) split by
`pipeline-partition` into S stages, one process per stage, micro-batches streamed through the stages.

Every rank loads the same artifact (or model file) and builds the same partition, so only activations travel:
rank k runs F(0) .. F(M-1) (the forward-only GPipe order; `stage_orders(..., training=False)`), receiving each
micro-batch's activations from rank k-1 and sending its results to rank k+1 without waiting for the receiver
(`isend`), so rank 0 streams ahead while later stages work. The last rank concatenates the micro-batches'
results (split and joined along the batch axis) into the entry function's results.

With `--expert-parallel E` the pipeline is replicated E times (S*E ranks, `launch.place`): replica r runs rows
r*B/E .. (r+1)*B/E - 1, and each rank holds one block of its stage's routed experts (`expert_shard`), so
`moe_experts` runs through the training side's `ExpertDispatch` (all-to-all within the stage's replicas). The last
stage of replica 0 gathers every replica's results, in replica order, into the whole batch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from r1c.artifact import Artifact
from r1c.distributed.program import DistributedError, PipelineConfig, stage_io
from r1c.ir.core import Function, Module

if TYPE_CHECKING:
    from r1c.distributed.comm import Channel


@dataclass(frozen=True)
class RunSpec:
    """What every rank needs to run the same pipelined forward: the source is loaded by each rank itself."""

    source: str  # an artifact directory of target ref, or a .r1 / .ir model file
    tokens: np.ndarray  # int32 [B, S]: every rank has the batch (any stage may read the original input)
    pipeline: PipelineConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # model files only: --set
    seed: int | None = None  # model files only: weights drawn from the initializers with this seed (default 0)
    weights: str | None = None  # model files only: a .safetensors file instead


@dataclass(frozen=True)
class InferStage:
    index: int
    forward: Function
    inputs: tuple[str, ...]  # original arguments of the entry function the stage reads
    received: tuple[str, ...]  # arguments sent by stage k-1, in order (= its results)
    experts: tuple[str, ...] = ()  # expert parallelism: the parameters the stage reads that are expert row blocks


def load_source(
    source: str, overrides: dict[str, Any] | None = None, seed: int | None = None, weights: str | None = None
) -> Artifact:
    """An artifact directory as `r1c.artifact.load` reads it, or a model file as an in-memory ref artifact (the
    same module and weights `r1c compile --target ref --seed N` would write), so both run the same way."""
    import r1c
    from r1c.api import InputError, load_weights
    from r1c.artifact import check_weights, load
    from r1c.ir.interpreter import init_weights

    path = Path(source)
    if path.is_dir() or path.suffix not in (".r1", ".ir"):  # `load` says what is wrong with a bad directory
        if overrides or weights is not None or seed is not None:
            raise InputError("--set, --seed and --weights apply to a model file; an artifact holds its weights")
        return load(path)
    module = r1c.load(path, overrides=overrides or None)
    values = load_weights(weights) if weights is not None else init_weights(module, seed or 0)
    check_weights(module, values)
    entry = module.main.name
    return Artifact(path, {"target": "ref", "entry": entry, "source": "model file"}, module, values)


def check_runnable(art: Artifact, tokens: np.ndarray, pc: PipelineConfig) -> None:
    """What makes a pipelined run impossible, found before any process talks to another."""
    if art.target not in ("ref", "cuda"):
        raise DistributedError(
            f"--pipeline runs the stages on the reference interpreter or on GPUs: it needs an artifact of target "
            f"'ref' or 'cuda' (`r1c compile --target ref|cuda`) or a model file, not target '{art.target}'"
        )
    art.check_inputs([tokens])
    b, parts = tokens.shape[0], pc.micro_batches * pc.data_parallel
    if b % parts:
        ways = f" times --expert-parallel ({pc.data_parallel})" if pc.data_parallel > 1 else ""
        raise DistributedError(
            f"the batch ({b} --tokens rows) must be a multiple of --micro-batches ({pc.micro_batches}){ways}: "
            "micro-batches of equal size"
        )
    f = art.module.functions[art.entry]
    if parts > 1 and any(r.type.rank == 0 for r in f.results):
        raise DistributedError(
            f"@{f.name} returns a scalar, which cannot be joined from micro-batches or replicas: use "
            "--micro-batches 1 without --expert-parallel"
        )


def build_inference(
    module: Module, entry: str, pc: PipelineConfig, batch: int, seq: int
) -> tuple[Module, list[InferStage]]:
    """`module` with the stages of `@entry` for micro-batches of `batch // (M * E)` rows (its expert weights
    declared as one block of E with expert parallelism), and each stage's plan."""
    from r1c.distributed.expert_shard import shard_module
    from r1c.passes.pipeline_partition import pipeline_partition, stage_functions

    experts: list[str] = []
    if pc.expert_parallel > 1:
        module, experts = shard_module(module, entry, pc.expert_parallel)
    m = batch // (pc.micro_batches * pc.data_parallel)
    partitioned = pipeline_partition(
        module, stages=pc.stages, function=entry, batch=m, seq=seq, micro_batches=pc.micro_batches
    )
    stages = stage_functions(partitioned, entry)
    io = stage_io(stages, [a.name for a in module.functions[entry].args], entry)
    plans = []
    for k, (f, (inputs, received)) in enumerate(zip(stages, io)):
        read = {op.attrs["name"] for op in f.body if op.name == "param"}
        plans.append(InferStage(k, f, inputs, received, tuple(n for n in experts if n in read)))
    return partitioned, plans


def infer_rank(rank: int, world: int, spec: RunSpec) -> list[np.ndarray] | None:
    """Run rank `rank`'s stage over every micro-batch of its replica; the process group is up. The last stage of
    replica 0 returns the entry function's results for the whole batch, the others None."""
    art = load_source(spec.source, spec.overrides, spec.seed, spec.weights)
    return run_stage(rank, world, art, spec.tokens, spec.pipeline)


def run_stage(
    rank: int,
    world: int,
    art: Artifact,
    tokens: np.ndarray,
    pc: PipelineConfig,
    built: tuple[Module, list[InferStage]] | None = None,
) -> list[np.ndarray] | None:
    """`infer_rank` for a loaded source; `built`: the result of `build_inference` when the caller already has it
    (the CLI builds it before joining the job, so a partition error stops every rank before any transfer)."""
    from r1c.distributed.comm import FORWARD
    from r1c.distributed.expert_parallel import expert_overrides
    from r1c.distributed.expert_shard import take_blocks
    from r1c.distributed.launch import place, stage_channel
    from r1c.ir.interpreter import bind_dims
    from r1c.passes.pipeline_schedule import stage_orders

    if world != pc.world:
        raise DistributedError(f"{pc.flags} needs {pc.world} processes, the job has {world}")
    check_runnable(art, tokens, pc)
    pc = replace(pc, target="cuda" if art.target == "cuda" else "ref")  # the artifact says where stages run
    module, plans = built or build_inference(art.module, art.entry, pc, tokens.shape[0], tokens.shape[1])
    replica, stage, group = place(rank, pc)
    plan, last = plans[stage], stage == pc.stages - 1
    # A rank keeps only the weights its stage reads (of the experts, its replica's block): the point of a pipeline
    # and of expert parallelism is that no rank holds the whole model.
    read = {op.attrs["name"] for op in plan.forward.body if op.name == "param"}
    weights = take_blocks({n: art.weights[n] for n in read}, module, plan.experts, replica, pc.expert_parallel)
    share = tokens.shape[0] // pc.data_parallel
    tokens = tokens[replica * share : (replica + 1) * share]
    entry = module.functions[art.entry]
    b = share // pc.micro_batches
    env = bind_dims(entry, [tokens[:b]])  # every micro-batch has the same shape, so the same received shapes
    prev = plans[stage - 1].forward if stage else None
    channel = stage_channel(rank, world, pc)
    run = _stage_runner(art, module, plan.forward, weights, expert_overrides(pc, channel, group, stage))
    specs = [(r.type.concrete(env), run.wire_dtype(r)) for r in prev.results] if prev else []
    results: list[list[np.ndarray]] = []
    for _, mb in stage_orders(pc.schedule, pc.stages, pc.micro_batches, training=False)[stage]:
        original = {a.name: tokens[mb * b : (mb + 1) * b] for a in entry.args}
        received = channel.recv(specs, rank - 1, FORWARD, mb) if prev else []
        by_name = {**original, **dict(zip(plan.received, received))}
        outs = run([by_name[a.name] for a in plan.forward.args])
        if last:
            results.append(run.to_host(outs))
        else:
            channel.send(outs, rank + 1, FORWARD, mb)
    channel.flush()
    if not last:
        return None
    joined = _join(results)
    return joined if pc.data_parallel == 1 else _gather(channel, joined, replica, pc)


class _RefStage:
    """The stage's forward on the reference interpreter (expert parallelism hooks in through `overrides`)."""

    def __init__(self, module: Module, f: Function, weights: dict[str, np.ndarray], overrides: Any) -> None:
        self.module, self.f, self.weights, self.overrides = module, f, weights, overrides

    def __call__(self, args: list) -> list:
        from r1c.ir.interpreter import run_function

        return run_function(self.module, self.f, args, self.weights, self.overrides)

    def wire_dtype(self, value: Any) -> Any:
        return value.type.dtype.numpy

    def to_host(self, outs: list) -> list[np.ndarray]:
        return [np.asarray(x) for x in outs]


class _CudaStage:
    """The stage's forward compiled for the cuda target with the artifact's dtype, on the rank's device."""

    def __init__(self, art: Artifact, module: Module, f: Function, weights: dict[str, np.ndarray]) -> None:
        import json

        from r1c.backends.cuda.runtime import PLAN_FILE
        from r1c.distributed.stage_exec import stage_program

        dtype = json.loads((Path(art.path) / PLAN_FILE).read_text()).get("dtype")
        self.program = stage_program(module, f, weights, dtype)

    def __call__(self, args: list) -> list:
        return self.program.forward(self.program.to_device(args))

    def wire_dtype(self, value: Any) -> Any:
        """The torch dtype the previous stage sends this value in (bf16 under the artifact's dtype=bf16)."""
        return self.program.dtype_of(value.type.dtype)

    def to_host(self, outs: list) -> list[np.ndarray]:
        from r1c.backends.cuda.runtime import host_arrays

        return host_arrays(outs)


def _stage_runner(art: Artifact, module: Module, f: Function, weights: dict[str, np.ndarray], overrides: Any) -> Any:
    return _CudaStage(art, module, f, weights) if art.target == "cuda" else _RefStage(module, f, weights, overrides)


def _join(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each result of consecutive parts of the batch (micro-batches, replicas), joined along the batch axis."""
    if len(parts) == 1:  # a scalar result (allowed with one part only) has no batch axis
        return parts[0]
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def _gather(channel: Channel, mine: list[np.ndarray], replica: int, pc: PipelineConfig) -> list[np.ndarray] | None:
    """The last stage of every replica sends its results to replica 0's, which returns the whole batch's: every
    replica's joined in replica order (replica r ran rows r*B/E ..); the others return None."""
    from r1c.distributed.comm import GATHER

    last = pc.stages - 1  # global rank of replica 0's last stage; replica r's is r*S + last
    if replica:
        channel.send(mine, last, GATHER, replica)
        channel.flush()
        return None
    specs = [(x.shape, x.dtype) for x in mine]  # every replica ran the same function on as many rows
    return _join([mine] + [channel.recv(specs, r * pc.stages + last, GATHER, r) for r in range(1, pc.data_parallel)])


__all__ = ["InferStage", "RunSpec", "build_inference", "check_runnable", "infer_rank", "load_source", "run_stage"]
