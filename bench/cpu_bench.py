"""The cpu target (TVM, this machine) against PyTorch on the CPU in the same run: r1-tiny and a one-layer
DeepSeek-V2-Lite-shaped model (its layer is the MoE one), float32, batch 1, seq 128; torch eager and
torch.compile (Inductor) run HF transformers' DeepseekV3/V2 models built from the same config and weights.

    python bench/cpu_bench.py            # writes bench/results/cpu.json (or --out)
Each item has a time budget; one that fails or runs past it is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import r1c
from r1c.ir.interpreter import init_weights
from r1c.train.torch_ref import hf_model

sys.path.insert(0, str(Path(__file__).parent))
from e2e_cuda import hf_v2  # noqa: E402

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results" / "cpu.json"
V2_BLOCK = {"num_layers": 1, "first_k_dense": 0}


def median_ms(fn: Callable[[], Any], reps: int, budget_s: float) -> float:
    """Median of up to `reps` timed calls after a warm-up call; a warm-up longer than the budget is the result."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first * 1e3
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def record(results: dict, key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    try:
        results[key] = fn()
    except Exception as e:  # recorded, and the other items still run
        results.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=-3)
    print(f"[+{time.time() - t0:6.1f}s] {key}: {results.get(key)}", flush=True)
    return results.get(key)


def bench(name: str, module, hf, results: dict, seq: int, reps: int, budget: float) -> None:
    w = init_weights(module, 0)
    toks = np.random.default_rng(0).integers(0, module.attrs["vocab_size"], (1, seq)).astype(np.int32)
    t0 = time.time()
    art = r1c.compile(module, target="cpu", weights=w)
    results[f"{name}.r1c_compile_s"] = time.time() - t0
    t0 = time.perf_counter()
    ours = art.run([toks])[0]
    first = time.perf_counter() - t0
    if first > budget:  # one call is all the budget allows: it is the measurement
        results[f"{name}.r1c_ms"] = first * 1e3
    else:
        record(results, f"{name}.r1c_ms", lambda: median_ms(lambda: art.run([toks]), reps, budget))
    Path(OUT).write_text(json.dumps(results, indent=1) + "\n")
    model = hf(module, w).eval()
    x = torch.from_numpy(toks).long()
    with torch.no_grad():
        theirs = model(x).logits.numpy()
        results[f"{name}.r1c_vs_hf_rel_err"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        record(results, f"{name}.torch_eager_ms", lambda: median_ms(lambda: model(x), reps, budget))
        compiled = torch.compile(model)
        record(results, f"{name}.torch_compile_warmup_s", lambda: _seconds(lambda: compiled(x)))
        record(results, f"{name}.torch_compile_ms", lambda: median_ms(lambda: compiled(x), reps, budget))


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.time()
    fn()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu.json"))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per item")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.out)
    from tvm.target import codegen

    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "seq": args.seq,
                               "mcpu": codegen.llvm_get_system_cpu(), "dtype": "f32"}  # fmt: skip
    tiny = r1c.load(ROOT / "examples" / "r1-tiny.r1")
    bench("r1-tiny", tiny, lambda m, w: hf_model(m.attrs, w), results, args.seq, args.reps, args.budget)
    lite = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides=V2_BLOCK)
    v2 = lambda m, w: hf_v2(dict(m.attrs), w, torch.float32, "cpu")  # noqa: E731
    bench("v2-lite-1L-moe", lite, v2, results, args.seq, args.reps, args.budget)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
