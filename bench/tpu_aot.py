"""AOT compiles for TPU topologies with libtpu on a machine without a TPU (docs/tpu.md): compile time, the Pallas
custom calls and collectives in the compiled HLO, XLA's flop count and memory analysis. No run time: there is no
TPU here. Writes bench/results/tpu_aot.json.

    python bench/tpu_aot.py [--quick]     # --quick: r1-tiny only (the V2-Lite-shaped compiles take minutes each)
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import r1c
from r1c.backends.tpu.target import collectives, custom_calls, lower_for_tpu
from r1c.train.config import TrainConfig
from r1c.train.step import build_train_step

ROOT = Path(__file__).parents[1]


def aot(module, target: str, what: str, **options) -> dict:
    t0 = time.perf_counter()
    traced, plan, _ = lower_for_tpu(module, options, target)
    t1 = time.perf_counter()
    compiled = traced.compile()
    t2 = time.perf_counter()
    cost, mem, hlo = compiled.cost_analysis(), compiled.memory_analysis(), compiled.as_text()
    row = {
        "what": what,
        "target": target,
        "device_kind": plan["device_kind"],
        "options": {k: v for k, v in options.items() if k != "entry"},
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "pallas_custom_calls": custom_calls(hlo),
        "collectives": collectives(hlo),
        "gflop": round(cost["flops"] / 1e9, 3),
        "argument_mb": round(mem.argument_size_in_bytes / 2**20, 1),
        "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import jax

    tiny = r1c.load(str(ROOT / "examples" / "r1-tiny.r1"))
    rows = [
        aot(tiny, "tpu", "r1-tiny forward", shapes={"B": 1, "S": 128}),
        aot(tiny, "tpu", "r1-tiny forward, xla kernels", shapes={"B": 1, "S": 128}, kernels="xla"),
        aot(tiny, "tpu:v5p", "r1-tiny forward", shapes={"B": 8, "S": 1024}),
        aot(tiny, "tpu", "r1-tiny decode", entry="decode", shapes={"B": 8, "S": 1, "C": 1024}),
        aot(
            build_train_step(tiny, TrainConfig()),
            "tpu",
            "r1-tiny train step",
            entry="train_step",
            shapes={"B": 8, "S": 128},
        ),  # fmt: skip
        aot(tiny, "tpu", "r1-tiny forward, 2x2 mesh", shapes={"B": 8, "S": 1024}, mesh="data=2,expert=2"),
    ]
    if not args.quick:
        v2 = r1c.load(str(ROOT / "examples" / "deepseek-v2-lite.r1"), overrides={"num_layers": 2})
        rows += [
            aot(v2, "tpu:v6e", "V2-Lite 2 layers forward", shapes={"B": 1, "S": 2048}),
            aot(
                v2, "tpu:v6e", "V2-Lite 2 layers forward, 2x2 mesh", shapes={"B": 4, "S": 2048}, mesh="data=2,expert=2"
            ),
        ]
    out = {"jax": jax.__version__, "rows": rows}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "tpu_aot.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
