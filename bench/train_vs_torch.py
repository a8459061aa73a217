"""r1-tiny trained for 50 steps on the bundled corpus by r1c (reference interpreter) and by PyTorch (HF
DeepseekV3ForCausalLM, torch AdamW) from the same init on the same batches: both loss curves, their largest
per-step difference and seconds per step. Writes bench/results/train_tiny.json.

python bench/train_vs_torch.py [--steps 50] [--out bench/results/train_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

import r1c
from r1c.train.config import TrainConfig
from r1c.train.data import load_tokens
from r1c.train.torch_ref import compare_with_torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench/results/train_tiny.json"))
    args = parser.parse_args()
    base = r1c.load(ROOT / "examples/r1-tiny.r1")
    cfg = TrainConfig.from_attrs(base.attrs, steps=args.steps, bias_gamma=0.0)
    tokens = load_tokens(ROOT / "examples/data/tiny-corpus.txt", base.attrs["vocab_size"])
    result = compare_with_torch(base, cfg, tokens)
    first, last = np.mean(result["r1c_loss"][:5]), np.mean(result["r1c_loss"][-5:])
    report = {
        "model": "examples/r1-tiny.r1",
        "data": "examples/data/tiny-corpus.txt",
        "config": {k.removeprefix("train."): v for k, v in cfg.to_attrs().items()},
        "r1c_runtime": "reference interpreter (numpy)",
        "torch": f"torch {torch.__version__}, transformers DeepseekV3ForCausalLM (eager, float32), CPU",
        "machine": platform.processor() or platform.machine(),
        **result,
        "first5_mean_loss": float(first),
        "last5_mean_loss": float(last),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.steps} steps: loss {first:.3f} -> {last:.3f} (first/last 5 mean), max |r1c - torch| = "
        f"{result['max_abs_diff']:.2e}; s/step r1c {result['r1c_seconds_per_step']:.3f}, "
        f"torch {result['torch_seconds_per_step']:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
