"""The cpu target (TVM, this machine) against PyTorch on the CPU in the same run: r1-tiny and a one-layer
DeepSeek-V2-Lite-shaped model (its layer is the MoE one), float32, batch 1, seq 128; torch eager and
torch.compile (Inductor) run HF transformers' DeepseekV3/V2 models built from the same config and weights.

r1c runs three ways: the symbolic-shape build (one library for every B and S), the static-shape build
(`--shapes B=1,S=128`) with default schedules only, and the static build with the MetaSchedule records of
`r1c tune` (run first, --tune-trials; 0 uses what the database already has). This VM's speed drifts (up to 2x
from one minute to the next), so contenders are timed interleaved: rounds of a ~50 ms block of calls each (the
first two of a block dropped: the other runtime's threads are still spinning), medians per contender; untuned vs
tuned in one set of rounds, tuned r1c vs torch eager vs torch.compile in another.

    python bench/cpu_bench.py --tune-trials 64     # writes bench/results/cpu.json (or --out)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import r1c
from r1c.backends.cpu import target as cpu_target
from r1c.ir.interpreter import init_weights
from r1c.train.torch_ref import hf_model

sys.path.insert(0, str(Path(__file__).parent))
from e2e_cuda import hf_v2  # noqa: E402

ROOT = Path(__file__).parents[1]
V2_BLOCK = {"num_layers": 1, "first_k_dense": 0}


BLOCK_S = 0.05  # seconds of calls per contender per round


def interleaved_ms(fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float) -> dict[str, float]:
    """Median milliseconds per contender over interleaved rounds. Each round runs a block of calls per contender
    (about BLOCK_S, at least 3) and keeps the median of all but the block's first two: the thread pools of torch
    (OpenMP) and TVM spin for a while after a call, so the first calls after the other runtime's share the cores
    with its spinning threads (with one call per round that cost r1c up to 4x on r1-tiny)."""
    blocks = {}
    for k, fn in fns.items():  # warm-up, and the block size from one call
        fn()
        t0 = time.perf_counter()
        fn()
        blocks[k] = max(3, int(BLOCK_S / max(time.perf_counter() - t0, 1e-6)) + 2)
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    while len(times[next(iter(fns))]) < rounds and (time.perf_counter() < t_end or not times[next(iter(fns))]):
        for k, fn in fns.items():
            block = []
            for _ in range(blocks[k]):
                t0 = time.perf_counter()
                fn()
                block.append(time.perf_counter() - t0)
            times[k].append(float(np.median(block[2:])))
    return {k: float(np.median(v) * 1e3) for k, v in times.items()} | {"rounds": len(times[next(iter(fns))])}


def tune_model(module, shapes: dict, trials: int) -> dict:
    """`r1c tune` for the cpu target: the kernels' default-schedule and tuned milliseconds."""
    import tvm

    from r1c.backends.cpu import tune
    from r1c.backends.cpu.target import build_relax

    mod, plan, _ = build_relax(module, {"shapes": shapes}, "cpu")
    t0 = time.time()
    report = tune.tune(mod, tvm.target.Target(plan["target"]), tune.default_dir(plan["target"]), trials)
    kernels = [report["kernels"][name] for name in report["this_model"]]
    return {"trials": trials, "seconds": time.time() - t0, "kernels_tuned": len(kernels),
            "records_kept": sum(k["hash"] not in report["rejected"] for k in kernels),
            "kernel_ms_default": sum(k["default_ms"] * k["calls"] for k in kernels),
            "kernel_ms_tuned": sum(min(k["tuned_ms"], k["default_ms"]) * k["calls"] for k in kernels)}  # fmt: skip


def bench(name: str, module, hf, args: argparse.Namespace, out: Path, results: dict) -> None:
    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    w = init_weights(module, 0)
    toks = np.random.default_rng(0).integers(0, module.attrs["vocab_size"], (1, args.seq)).astype(np.int32)
    shapes = {"B": 1, "S": args.seq}
    r = results.setdefault(name, {})
    if args.tune_trials:
        r["tune"] = tune_model(module, shapes, args.tune_trials)
        save()

    def build(options: dict) -> Any:
        t0 = time.time()
        art = r1c.compile(module, target="cpu", weights=w, options=options)
        r.setdefault("compile_s", {})[json.dumps(options)] = time.time() - t0
        return art

    dynamic = build({"tuning": ""})
    r["r1c_dynamic_ms"] = interleaved_ms({"dynamic": lambda: dynamic.run([toks])}, args.rounds, args.budget)["dynamic"]
    cpu_target.unload(dynamic)  # one loaded copy of the V2-Lite weights (4 GB) at a time, or two
    static, tuned = build({"tuning": "", "shapes": shapes}), build({"shapes": shapes})
    r["tuned_kernels"] = len(json.loads((tuned.path / "cpu_plan.json").read_text())["tuned"])
    pair = {"r1c_static_untuned": lambda: static.run([toks]), "r1c_tuned": lambda: tuned.run([toks])}
    r["untuned_vs_tuned"] = interleaved_ms(pair, args.rounds, args.budget)
    ours = tuned.run([toks])[0]
    cpu_target.unload(static)
    gc.collect()
    save()
    model = hf(module, w).eval()
    x = torch.from_numpy(toks).long()
    with torch.no_grad():
        theirs = model(x).logits.numpy()
        r["r1c_vs_hf_rel_err"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        compiled = torch.compile(model)
        t0 = time.time()
        compiled(x)
        r["torch_compile_warmup_s"] = time.time() - t0
        contenders = {
            "r1c_tuned": lambda: tuned.run([toks]),
            "torch_eager": lambda: model(x),
            "torch_compile": lambda: compiled(x),
        }
        r["side_by_side"] = interleaved_ms(contenders, args.rounds, args.budget)
    s = r["side_by_side"]
    r["r1c_vs_best_torch"] = min(s["torch_eager"], s["torch_compile"]) / s["r1c_tuned"]
    print(json.dumps({name: r}, indent=1), flush=True)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu.json"))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per comparison (at most)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per comparison (at least one round)")
    ap.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per model first (0: none)")
    ap.add_argument("--only", choices=("r1-tiny", "v2-lite"), help="run one of the two models")
    args = ap.parse_args()
    from tvm.target import codegen

    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    results.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "seq": args.seq, "dtype": "f32",
                    "mcpu": codegen.llvm_get_system_cpu(), "date": time.strftime("%Y-%m-%d")})  # fmt: skip
    if args.only != "v2-lite":
        tiny = r1c.load(ROOT / "examples" / "r1-tiny.r1")
        bench("r1-tiny", tiny, lambda m, w: hf_model(m.attrs, w), args, out, results)
    if args.only != "r1-tiny":
        lite = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides=V2_BLOCK)
        v2 = lambda m, w: hf_v2(dict(m.attrs), w, torch.float32, "cpu")  # noqa: E731
        bench("v2-lite-1L-moe", lite, v2, args, out, results)


if __name__ == "__main__":
    main()
