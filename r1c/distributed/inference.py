"""Pipelined inference (`r1c run --pipeline S`): the entry function of a model (`forward`) split by
`pipeline-partition` into S stages, one process per stage, micro-batches streamed through the stages.

Every rank loads the same artifact (or model file) and builds the same partition, so only activations travel:
rank k runs F(0) .. F(M-1) (the forward-only GPipe order; `stage_orders(..., training=False)`), receiving each
micro-batch's activations from rank k-1 and sending its results to rank k+1 without waiting for the receiver
(`isend`), so rank 0 streams ahead while later stages work. The last rank concatenates the micro-batches'
results (split and joined along the batch axis) into the entry function's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from r1c.artifact import Artifact
from r1c.distributed.program import DistributedError, PipelineConfig, stage_io
from r1c.ir.core import Function, Module


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
    if art.target != "ref":
        raise DistributedError(
            f"--pipeline runs the stages on the reference interpreter: it needs an artifact of target 'ref' "
            f"(`r1c compile --target ref`) or a model file, not target '{art.target}'"
        )
    art.check_inputs([tokens])
    b = tokens.shape[0]
    if b % pc.micro_batches:
        raise DistributedError(
            f"the batch ({b} --tokens rows) must be a multiple of --micro-batches ({pc.micro_batches}): "
            "micro-batches of equal size"
        )
    f = art.module.functions[art.entry]
    if pc.micro_batches > 1 and any(r.type.rank == 0 for r in f.results):
        raise DistributedError(
            f"@{f.name} returns a scalar, which cannot be joined from micro-batches: use --micro-batches 1"
        )


def build_inference(
    module: Module, entry: str, pc: PipelineConfig, batch: int, seq: int
) -> tuple[Module, list[InferStage]]:
    """`module` with the stages of `@entry` for micro-batches of `batch // pc.micro_batches` rows, and each
    stage's plan."""
    from r1c.passes.pipeline_partition import pipeline_partition, stage_functions

    m = batch // pc.micro_batches
    partitioned = pipeline_partition(
        module, stages=pc.stages, function=entry, batch=m, seq=seq, micro_batches=pc.micro_batches
    )
    stages = stage_functions(partitioned, entry)
    io = stage_io(stages, [a.name for a in module.functions[entry].args], entry)
    plans = [InferStage(k, f, inputs, received) for k, (f, (inputs, received)) in enumerate(zip(stages, io))]
    return partitioned, plans


def infer_rank(rank: int, world: int, spec: RunSpec) -> list[np.ndarray] | None:
    """Run rank `rank`'s stage over every micro-batch; the process group is up. The last rank returns the entry
    function's results for the whole batch, the others None."""
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
    from r1c.distributed.comm import FORWARD, Channel
    from r1c.ir.interpreter import bind_dims, run_function
    from r1c.passes.pipeline_schedule import stage_orders

    if world != pc.stages:
        raise DistributedError(f"--pipeline {pc.stages} needs {pc.stages} processes, the job has {world}")
    check_runnable(art, tokens, pc)
    module, plans = built or build_inference(art.module, art.entry, pc, tokens.shape[0], tokens.shape[1])
    plan, last = plans[rank], rank == world - 1
    # A rank keeps only the weights its stage reads: the point of a pipeline is that no rank holds the model.
    read = {op.attrs["name"] for op in plan.forward.body if op.name == "param"}
    weights = {n: art.weights[n] for n in read}
    entry = module.functions[art.entry]
    b = tokens.shape[0] // pc.micro_batches
    env = bind_dims(entry, [tokens[:b]])  # every micro-batch has the same shape, so the same received shapes
    prev = plans[rank - 1].forward if rank else None
    specs = [(r.type.concrete(env), r.type.dtype.numpy) for r in prev.results] if prev else []
    channel = Channel(rank, world, pc.timeout_s)
    results: list[list[np.ndarray]] = []
    for _, mb in stage_orders(pc.schedule, pc.stages, pc.micro_batches, training=False)[rank]:
        original = {a.name: tokens[mb * b : (mb + 1) * b] for a in entry.args}
        received = channel.recv(specs, rank - 1, FORWARD, mb) if prev else []
        by_name = {**original, **dict(zip(plan.received, received))}
        outs = run_function(module, plan.forward, [by_name[a.name] for a in plan.forward.args], weights)
        if last:
            results.append([np.asarray(x) for x in outs])
        else:
            channel.send(outs, rank + 1, FORWARD, mb)
    channel.flush()
    if not last:
        return None
    if pc.micro_batches == 1:
        return results[0]
    return [np.concatenate([r[i] for r in results], axis=0) for i in range(len(results[0]))]


__all__ = ["InferStage", "RunSpec", "build_inference", "check_runnable", "infer_rank", "load_source", "run_stage"]
