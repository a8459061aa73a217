"""`r1c train MODEL --pipeline S` and `r1c run ARTIFACT --pipeline S`: this process is one rank of a
`torchrun --nproc-per-node S` job."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from r1c.artifact import Artifact
from r1c.train.config import TrainConfig
from r1c.train.resume import AUTO
from r1c.train.runtime import StepResult

if TYPE_CHECKING:
    from r1c.distributed.comm import Channel
    from r1c.distributed.program import PipelineConfig


def run_pipeline_train(args: argparse.Namespace, cfg: TrainConfig, tokens: np.ndarray) -> int:
    import torch.distributed as dist

    from r1c.distributed import checkpoint as ckpt
    from r1c.distributed.comm import PeerError
    from r1c.distributed.launch import TrainSpec, init_from_env, stage_channel, train_rank
    from r1c.distributed.program import DistributedError, PipelineConfig, check_supported
    from r1c.train.checkpoint import CheckpointError

    # --expert-parallel E alone: one stage, E replicas (the experts are split over the replicas).
    ep = args.expert_parallel if args.expert_parallel is not None else 1
    pc = PipelineConfig(
        args.pipeline if args.pipeline is not None else 1,
        args.micro_batches if args.micro_batches is not None else 1,
        args.schedule or "gpipe",
        args.timeout if args.timeout is not None else 300.0,
        args.data_parallel if args.data_parallel is not None else ep,
        ep,
        args.target,
        args.comm or ("nccl" if args.target == "cuda" else "gloo"),
    )
    check_supported(cfg, pc)  # before joining the job: a bad option fails at once on every rank
    if pc.expert_parallel > 1:  # as is a model whose experts do not split E ways
        import r1c
        from r1c.distributed.expert_shard import expert_params
        from r1c.distributed.program import LOSS

        expert_params(r1c.load(args.model, overrides=_overrides(args.sets) or None), LOSS, pc.expert_parallel)
    if args.resume and args.resume != AUTO and not Path(args.resume).is_dir():
        raise DistributedError(
            f"--resume {args.resume}: with --pipeline, resume from a pipeline checkpoint directory "
            "(OUT/checkpoint or OUT/checkpoint-K, written by a --pipeline run at any stage count), or `auto`"
        )
    rank, world = init_from_env(pc.timeout_s, comm=pc.comm)
    out = Path(args.out)
    spec = TrainSpec(
        args.model, cfg, pc, tokens, overrides=_overrides(args.sets), out=str(out), resume=args.resume,
        save_every=cfg.save_every,
    )  # fmt: skip
    t0 = time.perf_counter()

    def log(r: StepResult) -> None:
        elapsed = time.perf_counter() - t0
        print(
            f"step {r.step}/{cfg.steps}  loss {r.loss:.4f}  lr {r.lr:.2e}  grad_norm {r.grad_norm:.3f}  {elapsed:.1f} s"
        )

    try:
        done = False
        if args.resume == AUTO:
            found, step = _agree_on_resume(out, stage_channel(rank, world, pc))
            spec, done = replace(spec, resume=found), step >= cfg.steps
        # A job restarted after its last save (a rank failed while exiting) has nothing left to train: it ends
        # well, so that torchrun does not restart it again.
        hist = ckpt.history(ckpt.read_manifest(spec.resume)) if done else train_rank(rank, world, spec, log).history
    except (PeerError, DistributedError, CheckpointError) as e:
        print(f"r1c: error: rank {rank}: {e}" if not str(e).startswith("rank") else f"r1c: error: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # Without gloo's teardown, which may wait on a dead peer: the exit closes the sockets, which stops the
        # neighbours at once, and torchrun reports the failed ranks.
        os._exit(1)
    if rank == 0:
        from r1c.train.plot import plot_losses

        (out / "losses.json").write_text(
            json.dumps([{"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm} for r in hist], indent=1)
        )
        plot_losses([r.step for r in hist], [r.loss for r in hist], out / "loss.png", f"{args.model} training loss")
        if done:
            print(f"nothing to train: {spec.resume} is at step {hist[-1].step} (--steps {cfg.steps})")
        else:
            print(
                f"trained with {_layout(pc)} to step {hist[-1].step}: loss {hist[0].loss:.4f} -> "
                f"{hist[-1].loss:.4f}; checkpoint {out / 'checkpoint'}"
            )
    dist.destroy_process_group()
    return 0


def _layout(pc: PipelineConfig) -> str:
    if pc.stages == 1:  # expert parallelism alone
        return f"{pc.expert_parallel}-way expert parallelism ({pc.micro_batches} micro-batches)"
    extra = f", {pc.data_parallel} data-parallel replicas" if pc.data_parallel > 1 else ""
    extra += f", experts split {pc.expert_parallel} ways" if pc.expert_parallel > 1 else ""
    return f"{pc.stages} pipeline stages ({pc.schedule}, {pc.micro_batches} micro-batches{extra})"


def _agree_on_resume(out: Path, channel: Channel) -> tuple[str | None, int]:
    """`--resume auto`: the newest complete checkpoint under `out` (None: start at step 0) and its step, the same
    on every rank; rank 0 prints the choice.

    Rank 0 alone reads the directory and broadcasts its choice. No one writes there while it reads: torchrun
    starts a restarted group only after every worker of the failed one has exited (a save they left half done has
    no manifest and is skipped), and in this group the first manifest is written after the barrier of the first
    save, which no rank reaches before this broadcast. Ranks choosing for themselves could still disagree on a
    file system that shows new files late on other hosts, and would then resume from different steps."""
    from r1c.distributed.checkpoint import newest_complete
    from r1c.train.resume import describe

    choice = None
    if channel.rank == 0:
        found = newest_complete(out)
        choice = (str(found[0]), int(found[1]["step"])) if found else (None, 0)
        print(describe(choice[0], choice[1], out), flush=True)
    return channel.broadcast(choice, f"agreeing on the checkpoint under {out} to resume from")


def run_pipeline_infer(args: argparse.Namespace, art: Artifact, tokens: np.ndarray) -> list[np.ndarray] | None:
    """This rank's part of the pipelined (and/or expert-parallel) forward; the last stage of replica 0 returns the
    entry function's results, the others None (they print nothing: that rank prints what `r1c run` prints)."""
    import torch.distributed as dist

    from r1c.distributed.comm import PeerError
    from r1c.distributed.inference import build_inference, check_runnable, run_stage
    from r1c.distributed.launch import init_from_env
    from r1c.distributed.program import DistributedError, PipelineConfig

    # --expert-parallel E alone: one stage, E replicas (the experts are split over the replicas).
    ep = args.expert_parallel if args.expert_parallel is not None else 1
    pc = PipelineConfig(
        args.pipeline if args.pipeline is not None else 1,
        args.micro_batches if args.micro_batches is not None else 1,
        "gpipe",  # forward only: both schedules are the same stream of forwards
        args.timeout if args.timeout is not None else 300.0,
        ep,
        ep,
        "cuda" if art.target == "cuda" else "ref",
        args.comm or ("nccl" if art.target == "cuda" else "gloo"),
    )
    # Before joining the job: a bad option, a partition that cannot be made (more stages than layers), experts
    # that do not split E ways or the wrong process count fails at once on every rank, without a transfer.
    check_runnable(art, tokens, pc)
    built = build_inference(art.module, art.entry, pc, tokens.shape[0], tokens.shape[1])
    rank, world = init_from_env(pc.timeout_s, "run", pc, pc.comm)
    try:
        outputs = run_stage(rank, world, art, tokens, pc, built)
    except (PeerError, DistributedError) as e:
        print(f"r1c: error: rank {rank}: {e}" if not str(e).startswith("rank") else f"r1c: error: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # as in training: no gloo teardown that could wait on a dead peer
    dist.destroy_process_group()
    return outputs


def _overrides(sets: list[str] | None) -> dict:
    from r1c.cli_common import parse_sets

    return parse_sets(sets or []) or {}
