"""Pipeline-parallel training on GPUs: `r1c train --pipeline S --target cuda` (spawned ranks, GPipe) for S = 2 and 4
against one GPU (the single-process cuda trainer), same model, init and batches: tokens/s, the measured bubble
(per rank 1 - compute seconds / step seconds, averaged over ranks and timed steps) next to the schedule's ideal
(S-1)/(M+S-1), and the loss curves (equal up to f32 rounding). DeepSeek-V2-Lite-shaped, 4 layers (one dense, three
64-expert MoE), random init, f32, batch 8 x 256 tokens in M = 4 or 8 micro-batches.

Ranks talk over NCCL when the host has a GPU per rank; otherwise they share the GPUs over gloo (NCCL refuses two
ranks on one GPU), and the result says `shared_gpus`: the ranks then compete for one device, so tokens/s does not
measure scaling (the bubble still measures the schedule, since a rank's compute time includes waiting for the
shared GPU only while others compute).

    source bench/gpu_setup.sh && python3 bench/pipeline_cuda.py --out $OUT/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import r1c
from r1c.distributed.launch import TrainSpec, spawn_training
from r1c.distributed.program import PipelineConfig
from r1c.passes.pipeline_schedule import ideal_bubble
from r1c.train.config import TrainConfig
from r1c.train.runtime import Trainer

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "examples/deepseek-v2-lite.r1"
OVERRIDES = {"num_layers": 4}
BATCH, SEQ, STEPS, WARMUP = 8, 256, 6, 2


def config(base: r1c.ir.Module) -> TrainConfig:
    return TrainConfig.from_attrs(base.attrs, steps=STEPS, batch=BATCH, seq=SEQ, bias_gamma=0.0, aux_loss_alpha=0.0)


def single(base: r1c.ir.Module, stream: np.ndarray) -> dict[str, Any]:
    trainer = Trainer.create(base, config(base), stream, "cuda")
    losses, times = [], []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        losses.append(trainer.run_step().loss)
        times.append(time.perf_counter() - t0)
    s = float(np.mean(times[WARMUP:]))
    return {"losses": losses, "seconds_per_step": s, "tok_s": BATCH * SEQ / s}


def pipelined(base: r1c.ir.Module, stream: np.ndarray, stages: int, micro: int) -> dict[str, Any]:
    comm = "nccl" if torch.cuda.device_count() >= stages else "gloo"
    pc = PipelineConfig(stages, micro, "gpipe", 600.0, target="cuda", comm=comm)
    spec = TrainSpec(str(MODEL), config(base), pc, stream, overrides=OVERRIDES)
    outcomes = spawn_training(spec, timeout_s=600.0)
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"pipeline S={stages} M={micro}: {failed}")
    results = [o.result for o in outcomes]
    walls = np.array([r.wall_s[WARMUP:] for r in results])  # [ranks, steps]
    busy = np.array([r.busy_s[WARMUP:] for r in results])
    step_s = float(walls.max(axis=0).mean())
    return {
        "comm": comm,
        "shared_gpus": comm == "gloo",
        "losses": [r.loss for r in results[0].history],
        "seconds_per_step": step_s,
        "tok_s": BATCH * SEQ / step_s,
        "bubble_measured": float(1.0 - (busy / walls).mean()),
        "bubble_ideal": ideal_bubble(stages, micro),
        "busy_s_per_rank": busy.mean(axis=1).round(4).tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/pipeline.json"))
    p.add_argument("--layouts", default="2x4,4x4,4x8", help="SxM pairs, comma-separated")
    args = p.parse_args()
    out = Path(args.out)
    base = r1c.load(MODEL, overrides=OVERRIDES)
    stream = np.random.default_rng(0).integers(0, base.attrs["vocab_size"], 1 << 20).astype(np.int32)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "config": dict(model="deepseek-v2-lite.r1", **OVERRIDES, batch=BATCH, seq=SEQ, steps=STEPS, timed=STEPS - 2),
    }

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    t0 = time.time()
    results["1gpu"] = single(base, stream)
    print(f"[{time.time() - t0:6.1f}s] 1 GPU: {results['1gpu']['tok_s']:,.0f} tok/s", flush=True)
    save()
    torch.cuda.empty_cache()
    for layout in args.layouts.split(","):
        stages, micro = (int(x) for x in layout.split("x"))
        try:
            r = pipelined(base, stream, stages, micro)
            r["loss_max_abs_diff_vs_1gpu"] = float(np.max(np.abs(np.array(r["losses"]) - results["1gpu"]["losses"])))
            results[f"S{stages}xM{micro}"] = r
            print(f"[{time.time() - t0:6.1f}s] S={stages} M={micro}: {r}", flush=True)
        except Exception as e:  # one failure must not hide the other numbers
            results.setdefault("errors", {})[layout] = f"{type(e).__name__}: {str(e)[:600]}"
            print(f"[{time.time() - t0:6.1f}s] S={stages} M={micro}: {e}", flush=True)
        save()


if __name__ == "__main__":
    main()
