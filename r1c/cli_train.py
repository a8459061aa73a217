"""`r1c train`: train a model's `func loss` on a text or token file, on the reference interpreter or the cuda
backend (`--target`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1c.api import InputError
from r1c.cli_common import add_set_flag, console, load_model
from r1c.train.step_runner import TARGETS


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a text or token file",
        description="Train a .r1 model's `func loss(tokens, labels)` with the settings of its `train { }` block "
        "(flags override them); writes checkpoints, losses.json and loss.png to --out.",
    )
    p.add_argument("model", help="model file (.r1) with `func loss(tokens, labels)`")
    p.add_argument("--data", required=True, metavar="FILE", help="text file (byte-level tokens) or .npy token array")
    p.add_argument("--steps", type=int, help="total number of steps (default: train.steps)")
    p.add_argument("--out", default="out/train", metavar="DIR", help="output directory (default: out/train)")
    p.add_argument(
        "--resume", metavar="CKPT", help="continue from a checkpoint written by an earlier run; `auto`: from the "
        "newest complete checkpoint under --out, or from step 0 when there is none (for restarts)",
    )  # fmt: skip
    p.add_argument("--save-every", type=int, metavar="K", help="also save a checkpoint every K steps")
    p.add_argument(
        "--target", choices=TARGETS, default="ref", help="where the train step runs: ref (numpy reference "
        "interpreter, float64 inside ops) or cuda (Triton kernels on the GPU; state stays on the device)",
    )  # fmt: skip
    for flag, kind, what in (
        ("--lr", float, "peak learning rate"),
        ("--batch", int, "sequences per step"),
        ("--seq", int, "tokens per sequence"),
        ("--seed", int, "seed of the weight init and batch sampling"),
        ("--precision", str, "f32, or bf16 (bf16 compute, f32 master weights)"),
        ("--bias-gamma", float, "aux-loss-free balancing bias step (0: off)"),
        ("--aux-loss-alpha", float, "weight of the sequence-wise expert balance loss (0: off)"),
        ("--lora-rank", int, "train LoRA adapters of this rank only (0: full training)"),
        ("--lora-alpha", float, "LoRA scale numerator (scale = alpha / rank)"),
        ("--lora-targets", str, "comma-separated projections to adapt, e.g. q_b_proj,kv_b_proj,o_proj"),
    ):
        p.add_argument(flag, type=kind, help=f"{what} (default: from the train block)")
    p.add_argument(
        "--pipeline", type=int, metavar="S", help="pipeline-parallel over S stages (one process per stage, gloo): "
        "start with `torchrun --nproc-per-node S r1c train ...`; see docs/distributed.md",
    )  # fmt: skip
    p.add_argument(
        "--comm", choices=("gloo", "nccl"), help="with --pipeline: the process-group backend (default: nccl for "
        "--target cuda, one GPU per rank; gloo otherwise, or to run several cuda ranks on one GPU)",
    )  # fmt: skip
    p.add_argument("--micro-batches", type=int, metavar="M", help="with --pipeline: micro-batches per step (1)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), help="with --pipeline: the schedule (gpipe)")
    p.add_argument("--timeout", type=float, metavar="SEC", help="with --pipeline: gloo timeout in seconds (300)")
    p.add_argument(
        "--data-parallel", type=int, metavar="R", help="with --pipeline: R pipeline replicas, each on 1/R of the "
        "batch, gradients all-reduced per stage (S * R processes; default 1)",
    )  # fmt: skip
    p.add_argument(
        "--expert-parallel", type=int, metavar="E", help="split the routed experts over E data-parallel replicas, "
        "tokens sent to their experts by all-to-all (E processes, S * E with --pipeline S; E divides the experts)",
    )  # fmt: skip
    add_set_flag(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from r1c.distributed.program import DistributedError
    from r1c.passes import PipelineError
    from r1c.train.checkpoint import CheckpointError
    from r1c.train.config import TrainConfig, TrainConfigError
    from r1c.train.data import DataError, load_tokens
    from r1c.train.lora import LoRAError
    from r1c.train.mixed_precision import MixedPrecisionError
    from r1c.train.resume import AUTO, describe, newest_file
    from r1c.train.runtime import Trainer
    from r1c.train.step import TrainStepError

    try:
        base = load_model(args.model, args.sets)
        flags = {
            k: getattr(args, k)
            for k in ("steps", "lr", "batch", "seq", "seed", "precision", "bias_gamma", "aux_loss_alpha", "save_every")
            + ("lora_rank", "lora_alpha", "lora_targets")
        }
        cfg = TrainConfig.from_attrs(base.attrs, **flags)
        tokens = load_tokens(args.data, int(base.attrs.get("vocab_size", 0)))
        if args.pipeline is not None or args.expert_parallel is not None:
            from r1c.distributed.cli import run_pipeline_train

            return run_pipeline_train(args, cfg, tokens)
        given = [
            f for f in ("micro_batches", "schedule", "timeout", "data_parallel", "comm") if getattr(args, f) is not None
        ]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise InputError(f"{flags} apply to --pipeline training only")
        trainer = Trainer.create(base, cfg, tokens, args.target)
        if args.resume == AUTO:
            found, step = newest_file(args.out) or (None, 0)
            print(describe(found, step, args.out))
            if found is not None:
                trainer.restore(found)
            if trainer.step >= cfg.steps:  # as with --pipeline: a finished run started again is not an error
                print(f"nothing to train: {found} is at step {trainer.step} (--steps {cfg.steps})")
                return 0
        elif args.resume:
            trainer.restore(args.resume)
        return _loop(trainer, cfg, Path(args.out), base.name)
    except (
        TrainConfigError,
        DataError,
        CheckpointError,
        LoRAError,
        MixedPrecisionError,
        TrainStepError,
        PipelineError,
        DistributedError,
    ) as e:
        raise InputError(str(e)) from None


def _loop(trainer, cfg, out: Path, name: str) -> int:
    from r1c.train.plot import plot_losses

    out.mkdir(parents=True, exist_ok=True)
    if trainer.step >= cfg.steps:
        raise InputError(f"the checkpoint is at step {trainer.step}; ask for more --steps than that to continue")
    start, t0 = trainer.step, time.perf_counter()
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(), transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=start, loss=float("nan"), lr=0.0, tps=0.0)
        tokens = 0
        while trainer.step < cfg.steps:
            r = trainer.run_step()
            tokens += r.tokens
            progress.update(task, advance=1, loss=r.loss, lr=r.lr, tps=tokens / (time.perf_counter() - t0))
            if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
                trainer.save(out / f"checkpoint-{trainer.step}.safetensors")
    tps = tokens / (time.perf_counter() - t0)
    ckpt = trainer.save(out / "checkpoint.safetensors")
    hist = trainer.history
    (out / "losses.json").write_text(
        json.dumps([{"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm} for r in hist], indent=1)
    )
    plot = plot_losses([r.step for r in hist], [r.loss for r in hist], out / "loss.png", f"@{name} training loss")
    print(
        f"trained @{name} to step {trainer.step}: loss {hist[0].loss:.4f} -> {hist[-1].loss:.4f}; "
        f"{tps:,.0f} tokens/s; checkpoint {ckpt}, curve {plot}"
    )
    return 0
