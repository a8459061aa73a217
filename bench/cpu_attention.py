"""Tiled (block-map, flash-style) attention against the dense `attention` lowering on the cpu target: S=1024,
H=16, D=128, B=1, float32, causal and causal + window 256 (static shapes, 64 x 64 tiles). Both read the same
inputs; contenders are timed interleaved (rounds of one call each, medians), as this VM's speed drifts.

    python bench/cpu_attention.py          # writes bench/results/cpu_attention.json (or --out)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import r1c
from r1c.ir.ops.attention_tiled import visited_tiles
from r1c.ir.parser import parse_module

ROOT = Path(__file__).parents[1]
S, H, D, B, TILE = 1024, 16, 128, 1, 64


def module(window: int) -> str:
    t = f"f32[{B},{H},{S},{D}]"
    return f"""module @m {{
  func @forward(%q: {t}, %k: {t}, %v: {t}) -> ({t}) {{
    %0 = attention(%q, %k, %v) {{scale={D**-0.5}, causal=true, window={window}, sinks=0}} : {t}
    return %0
  }}
}}"""


def interleaved_ms(fns: dict, rounds: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: float(np.median(t)) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench/results/cpu_attention.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(3)]
    results = {"shape": {"B": B, "H": H, "S": S, "D": D, "tile": TILE}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, window in (("causal", 0), ("causal+window256", 256)):
            m = parse_module(module(window))
            arts = {
                kind: r1c.compile(
                    m,
                    target="cpu",
                    weights={},
                    out_dir=Path(tmp) / f"{name}-{kind}",
                    options={"passes": passes, "tuning": ""},
                )  # fmt: skip
                for kind, passes in (
                    ("dense", ""),
                    ("tiled", f"sparse-attention-tiling{{block_q={TILE},block_k={TILE}}}"),
                )
            }
            ops = [op.name for op in arts["tiled"].module.functions["forward"].body]
            assert "tiled_attention" in ops, ops
            out = {k: a.run(x)[0] for k, a in arts.items()}
            err = float(np.abs(out["tiled"] - out["dense"]).max() / np.abs(out["dense"]).max())
            ms = interleaved_ms({k: (lambda a=a: a.run(x)) for k, a in arts.items()}, args.rounds)
            a = {"causal": True, "window": window, "sinks": 0, "block_q": TILE, "block_k": TILE}
            n = -(-S // TILE)
            visited = visited_tiles(S, S, a)
            results["cases"][name] = {
                "dense_ms": ms["dense"],
                "tiled_ms": ms["tiled"],
                "speedup": ms["dense"] / ms["tiled"],
                "tiles_visited": visited,
                "tiles_total": n * n,
                "tiles_skipped_fraction": 1 - visited / (n * n),
                "tiled_vs_dense_rel_err": err,
            }
            print(name, json.dumps(results["cases"][name]))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
