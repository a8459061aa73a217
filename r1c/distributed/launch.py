"""Starting pipeline training and pipelined inference: one process per stage, under `torchrun` (`init_from_env`) or
spawned by `spawn` on a free loopback port (tests, notebooks), each running `train_rank` (or `infer_rank`).

Failure handling: every rank uses gloo (or NCCL for GPU stages, `PipelineConfig.comm`) with
`PipelineConfig.timeout_s`; a rank whose peer dies gets a `PeerError`
(at once when the peer's sockets close, at the latest after the timeout) and stops, which closes its own sockets
and stops its other neighbour in turn, so the whole job ends with a clear error on every rank instead of a hang.
`spawn` reports each rank's outcome (result, error message, or exit code when it died without one).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

import numpy as np

from r1c.distributed.program import DistributedError, PipelineConfig
from r1c.train.config import TrainConfig
from r1c.train.runtime import StepResult


@dataclass(frozen=True)
class TrainSpec:
    """Everything a rank needs to build the same pipeline program as every other rank."""

    model: str  # .r1 or .ir file
    cfg: TrainConfig
    pipeline: PipelineConfig
    tokens: np.ndarray  # the training token stream (every rank samples the same batches from it)
    overrides: dict[str, Any] = field(default_factory=dict)
    out: str | None = None  # directory for per-stage checkpoints (None: save nothing)
    resume: str | None = None  # a pipeline checkpoint directory, saved at any stage count
    save_every: int = 0
    keep_grads: bool = False  # return the first step's gradients (tests compare them with the single process)
    # Fault injection for tests: (rank, step): that rank exits abruptly (os._exit, no cleanup, like a crash or
    # an OOM kill) after its first forward of that step, while its peers are waiting on it.
    crash_at: tuple[int, int] | None = None


@dataclass
class RankResult:
    rank: int
    history: list[StepResult]
    state: dict[str, np.ndarray]  # this rank's parameters and optimizer state after the last step
    first_loss: float | None = None
    first_grads: dict[str, np.ndarray] | None = None
    # Expert parallelism: the tensors of `state` that are a row block of the whole, with its rows [start, stop).
    expert_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per step: seconds computing (the stage's forwards and backwards) and in all (benchmarks: the bubble)
    busy_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)


def train_rank(rank: int, world: int, spec: TrainSpec, log: Callable[[StepResult], None] | None = None) -> RankResult:
    """Run rank `rank`'s stage for the steps of `spec.cfg` (from the resumed step); the process group is up."""
    import r1c
    from r1c.distributed import checkpoint as ckpt
    from r1c.distributed.expert_shard import take_blocks
    from r1c.distributed.program import build_pipeline
    from r1c.distributed.runtime import StageRunner
    from r1c.train.data import Batches
    from r1c.train.runtime import initial_state

    cfg, pc = spec.cfg, spec.pipeline
    if world != pc.world:
        raise DistributedError(f"{pc.flags} needs {pc.world} processes, the job has {world}")
    replica, stage, dp_group = place(rank, pc)
    base = r1c.load(spec.model, overrides=spec.overrides or None)
    module, plans = build_pipeline(base, cfg, pc)
    data = Batches(spec.tokens, cfg.batch, cfg.seq, cfg.seed)
    channel = stage_channel(rank, world, pc)
    history: list[StepResult] = []
    if spec.resume:
        state, manifest = ckpt.load_tensors(spec.resume, list(plans[stage].state))
        step = int(manifest["step"])
        data.restore(manifest["data"])
        history = ckpt.history(manifest)
    else:
        state, step = initial_state(base, module, cfg.seed), 0
    blocks = plans[stage].experts
    if blocks:  # the base model and checkpoints hold every expert's rows: keep this replica's block
        state = take_blocks(state, module, blocks, replica, pc.expert_parallel)
    runner = StageRunner(module, plans, cfg, pc, stage, channel, state, step, replica, dp_group)
    runner.keep_grads = spec.keep_grads
    if runner.step >= cfg.steps:
        raise DistributedError(f"the checkpoint is at step {runner.step}; ask for more --steps than that to continue")
    rows = {n: module.params[n].type.shape[0] for n in blocks}
    result = RankResult(rank, history, {}, expert_rows={n: (replica * k, (replica + 1) * k) for n, k in rows.items()})
    while runner.step < cfg.steps:
        tokens, labels = data.next()
        runner.crash_now = spec.crash_at == (rank, runner.step + 1)
        t0 = time.perf_counter()
        r = runner.run_step(tokens, labels)
        result.wall_s.append(time.perf_counter() - t0)
        result.busy_s.append(runner.busy_s)
        history.append(r)
        if spec.keep_grads and result.first_grads is None and runner.last_grads is not None:
            result.first_loss, result.first_grads = runner.last_grads.loss, dict(runner.last_grads.grads)
        if log is not None and rank == 0:
            log(r)
        last = runner.step == cfg.steps
        if spec.out and (last or (spec.save_every and runner.step % spec.save_every == 0)):
            directory = Path(spec.out) / ("checkpoint" if last else f"checkpoint-{runner.step}")
            _save(directory, runner, plans, data, history, channel, rank)
    result.history, result.state = history, runner.state
    return result


def stage_channel(rank: int, world: int, pc: PipelineConfig) -> Any:
    """The rank's channel: numpy arrays on the ref target, tensors on the rank's device on the cuda target."""
    from r1c.distributed.comm import Channel

    if pc.target != "cuda":
        return Channel(rank, world, pc.timeout_s)
    from r1c.backends.cuda.runtime import pick_device

    return Channel(rank, world, pc.timeout_s, pick_device(), nccl=pc.comm == "nccl")


def use_gpu(comm: str, local_rank: int) -> None:
    """NCCL ranks each own one GPU: local rank i uses device i (before the process group starts)."""
    if comm == "nccl":
        import torch

        if torch.cuda.device_count() <= local_rank:
            raise DistributedError(
                f"--comm nccl: local rank {local_rank} needs GPU {local_rank}, this host has "
                f"{torch.cuda.device_count()} (NCCL refuses two ranks on one GPU; use --comm gloo to share one)"
            )
        torch.cuda.set_device(local_rank)


def _save(
    directory: Path, runner: Any, plans: list, data: Any, history: list[StepResult], channel: Any, rank: int
) -> None:
    from r1c.distributed import checkpoint as ckpt

    meta = {
        "step": runner.step,
        "data": data.state(),
        "history": [[r.step, r.loss, r.lr, r.grad_norm, r.tokens] for r in history],
    }
    # A directory saved over (the final checkpoint/ of an earlier, shorter run) must not look complete while its
    # files change, or `--resume auto` could load new stage files with the old step and sampler state: every rank
    # removes the manifest before the barrier, rank 0 writes the new one after it.
    (directory / ckpt.MANIFEST).unlink(missing_ok=True)
    if runner.replica == 0:  # the replicas hold the same state: replica 0 writes it, in the pipeline format
        ckpt.save_stage(directory, runner.rank, runner.state, meta)
    elif runner.plan.experts:  # expert parallelism: each replica holds its own block of the experts
        blocks = {n: runner.state[n] for n in runner.plan.experts}
        ckpt.save_expert_block(directory, runner.rank, runner.replica, blocks, meta)
    # Barrier (an all-reduce every rank joins): the manifest is written only once every stage file exists.
    channel.all_reduce_sum(np.zeros(1), f"the checkpoint barrier of {directory}")
    if rank == 0:
        blocks = [list(p.experts) for p in plans]
        ckpt.save_manifest(directory, [list(p.state) for p in plans], meta, blocks, runner.pc.expert_parallel)


# ---- process groups ----


def place(rank: int, pc: PipelineConfig) -> tuple[int, int, Any]:
    """(replica, stage, group) of global rank `rank`: replica r holds global ranks r*S .. r*S + S-1, and `group` is
    its stage's group over every replica (None without replicas): the gradient all-reduce and the expert
    all-to-alls. Every rank must call it, at the same point, since it creates every group."""
    replica, stage = divmod(rank, pc.stages)
    return replica, stage, _replica_groups(pc)[stage] if pc.data_parallel > 1 else None


def _replica_groups(pc: PipelineConfig) -> list[Any]:
    """Per stage, the gloo group of that stage in every replica (its gradient all-reduce). Every rank creates
    every group, in the same order, as torch.distributed requires."""
    import torch.distributed as dist

    return [
        dist.new_group([r * pc.stages + k for r in range(pc.data_parallel)], timeout=timedelta(seconds=pc.timeout_s))
        for k in range(pc.stages)
    ]


def init_from_env(
    timeout_s: float, command: str = "train", layout: PipelineConfig | None = None, comm: str = "gloo"
) -> tuple[int, int]:
    """Join the job `torchrun` started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); returns (rank, world).
    `layout`: its process count is checked before joining, so a wrong one fails on every rank at once."""
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"--pipeline / --data-parallel / --expert-parallel run one process per rank (S x R): start it with "
            f"`torchrun --nproc-per-node N r1c {command} ...` (the environment has no {', '.join(missing)})"
        )
    timeout = timedelta(seconds=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if layout is not None and world != layout.world:
        raise DistributedError(f"{layout.flags} needs {layout.world} processes, the job has {world}")
    use_gpu(comm, int(os.environ.get("LOCAL_RANK", rank)))
    store = _attempt_store(world, timeout) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
    dist.init_process_group(comm, store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def _attempt_store(world: int, timeout: timedelta) -> Any:
    """torchrun's store, with keys of this attempt's own. The agent keeps one store for every restart of the job
    and `init_process_group` puts no attempt number in its keys, so a restarted group's gloo would read the dead
    group's addresses and fail to connect ("Connection refused", torch 2.13, with the static and c10d rendezvous
    alike); a prefix per TORCHELASTIC_RESTART_COUNT keeps the groups apart."""
    import torch.distributed as dist

    from r1c.train.resume import restart_count

    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout)
    return dist.PrefixStore(f"r1c-attempt-{restart_count()}", agent)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    ok: bool
    result: Any = None
    error: str | None = None  # the rank's error message, or how it ended without one
    seconds: float = 0.0  # from the start of `spawn` to this rank's report or death


def _child(
    fn: Callable, rank: int, world: int, port: int, timeout_s: float, args: tuple, conn: Connection, comm: str
) -> None:
    import torch.distributed as dist

    try:
        use_gpu(comm, rank)
        dist.init_process_group(
            comm,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world, *args)
    except BaseException as e:  # report any failure to the parent, then end without gloo's teardown
        detail = traceback.format_exc() if os.environ.get("R1C_TRACEBACK") else ""
        conn.send((False, f"{type(e).__name__}: {e}{detail and chr(10) + detail}"))
        conn.close()
        os._exit(1)  # a clean destroy_process_group could wait on dead peers; the sockets close with the process
    conn.send((True, result))
    conn.close()
    dist.destroy_process_group()


def spawn(fn: Callable, world: int, args: tuple = (), timeout_s: float = 60.0, comm: str = "gloo") -> list[RankOutcome]:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined by a `comm` (gloo or nccl: rank i on GPU i)
    group on a free loopback port.

    Every rank's outcome comes back; none is left running: a rank still alive `timeout_s + 10` s after another
    failed, or `2 * timeout_s + 60` s after the start, is terminated and reported as hung."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], {}
    start = time.perf_counter()
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world, port, timeout_s, args, child, comm), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns[parent] = rank
    outcomes: dict[int, RankOutcome] = {}
    deadline = start + 2 * timeout_s + 60
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    while len(outcomes) < world and time.perf_counter() < deadline:
        if any(not o.ok for o in outcomes.values()):
            # After a failure the others must stop within their gloo timeout; one that does not is hung (e.g.
            # stuck outside a transfer) and is terminated rather than waited on.
            deadline = min(deadline, start + min(o.seconds for o in outcomes.values() if not o.ok) + timeout_s + 10)
        ready = wait(list(conns) + list(sentinels), timeout=max(0.0, deadline - time.perf_counter()))
        for r in ready:
            now = time.perf_counter() - start
            if r in conns:
                rank = conns.pop(r)
                try:
                    ok, payload = r.recv()
                except EOFError:  # the pipe closed without a report: the process died
                    continue
                outcomes[rank] = RankOutcome(rank, ok, payload if ok else None, None if ok else payload, now)
            elif r in sentinels:
                rank = sentinels.pop(r)
                p = procs[rank]
                p.join()
                # A report may still sit in the pipe of a process that just exited: read it first.
                conn = next((c for c, k in conns.items() if k == rank), None)
                if conn is not None and conn.poll():
                    try:
                        ok, payload = conn.recv()
                        outcomes[rank] = RankOutcome(rank, ok, payload if ok else None, None if ok else payload, now)
                        del conns[conn]
                        continue
                    except EOFError:
                        del conns[conn]
                if rank not in outcomes:
                    outcomes[rank] = RankOutcome(rank, False, error=f"died with exit code {p.exitcode}", seconds=now)
    for rank, p in enumerate(procs):
        if rank not in outcomes:
            outcomes[rank] = RankOutcome(
                rank, False, error="hung: terminated by spawn", seconds=time.perf_counter() - start
            )
        if p.is_alive():
            p.terminate()
        p.join()
    return [outcomes[r] for r in range(world)]


def spawn_training(spec: TrainSpec, timeout_s: float | None = None) -> list[RankOutcome]:
    """`train_rank` on `spec.pipeline.world` (stages * data-parallel replicas) spawned processes."""
    t = spec.pipeline.timeout_s if timeout_s is None else timeout_s
    return spawn(train_rank, spec.pipeline.world, (spec,), t, spec.pipeline.comm)


def spawn_inference(spec: Any, timeout_s: float | None = None) -> list[RankOutcome]:
    """`r1c.distributed.inference.infer_rank` on `spec.pipeline.world` spawned processes (a `RunSpec`); the result
    of the last stage of replica 0 is the entry function's results for the whole batch."""
    from r1c.distributed.inference import infer_rank

    t = spec.pipeline.timeout_s if timeout_s is None else timeout_s
    return spawn(infer_rank, spec.pipeline.world, (spec,), t, spec.pipeline.comm)
