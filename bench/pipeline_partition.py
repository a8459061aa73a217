"""Per-stage cost of `pipeline-partition` on DeepSeek-V3 (examples/deepseek-v3.r1) for 4, 8 and 16 stages.

Writes bench/results/pipeline_partition_v3.json: for the forward pass (inference) and the training loss, at
B=1, S=4096, 8 (forward) / 32 (training) micro-batches on the default H100 device model, the plan of each
stage count (per-stage FLOPs, bytes, params, activation memory, sends, cost), its imbalance (max/mean stage
cost, goal < 1.1) and the GPipe/1F1B bubble, predicted and ideal. The schedules' action lists are dropped
from the file to keep it small; `r1c partition --json` writes them.

    python bench/pipeline_partition.py [--out bench/results/pipeline_partition_v3.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from r1c.frontends.dsl import load
from r1c.passes.pipeline_plan import plan_partition

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_partition_v3.json"))
    args = ap.parse_args()
    module = load(ROOT / "examples" / "deepseek-v3.r1")
    results = []
    for function, micro_batches in (("forward", 8), ("loss", 32)):
        for stages in (4, 8, 16):
            start = time.perf_counter()
            plan, _ = plan_partition(module, stages=stages, function=function, micro_batches=micro_batches)
            seconds = time.perf_counter() - start
            entry = plan.to_json()
            for sch in entry["schedules"].values():
                del sch["actions"]
            entry.update(num_stages=stages, partition_seconds=seconds)
            results.append(entry)
            print(
                f"{function:8s} S={stages:2d} M={micro_batches:2d}  imbalance {plan.imbalance:.4f}  "
                f"1f1b bubble {plan.schedules['1f1b'].bubble:.4f} (ideal {plan.schedules['1f1b'].ideal_bubble:.4f})"
                f"  [{seconds:.2f} s]"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "examples/deepseek-v3.r1", "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
