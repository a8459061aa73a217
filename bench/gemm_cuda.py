"""The cuda target's generated GEMM (`linear`, codegen/matmul.py) on the GPU, for every linear shape of
DeepSeek-V2-Lite at prefill (M = 2048 tokens) and decode (M = 32 rows): tile configurations and the two load paths
(pointer loads vs tensor descriptors) against cuBLAS (torch.nn.functional.linear) and the hardware floor.

    source bench/gpu_setup.sh && python3 bench/gemm_cuda.py      # writes $OUT/gemm_cuda.json (or bench/results/)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from gpu_floor import measure, median_ms  # bench/ is the script's folder, on sys.path

import r1c
from r1c.backends.cuda import kernel_cache
from r1c.backends.cuda.codegen import matmul
from r1c.backends.cuda.lower import lower
from r1c.ir.parser import parse_module

ROOT = Path(__file__).parents[1]
VARIANTS = [  # name, config, tma
    ("128x128x64 w8 s3", dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3), False),
    ("128x128x64 w8 s3 tma", dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3), True),
    ("128x256x64 w8 s3 tma", dict(BM=128, BN=256, BK=64, GROUP=8, num_warps=8, num_stages=3), True),
    ("128x128x64 w4 s4 tma", dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=4, num_stages=4), True),
    ("64x64x128 w4 s4", dict(BM=64, BN=64, BK=128, GROUP=8, num_warps=4, num_stages=4), False),
    ("64x64x128 w4 s4 tma", dict(BM=64, BN=64, BK=128, GROUP=8, num_warps=4, num_stages=4), True),
    ("64x128x128 w4 s3 tma", dict(BM=64, BN=128, BK=128, GROUP=8, num_warps=4, num_stages=3), True),
]


def linear_shapes() -> list[tuple[str, int, int]]:
    """(loc, N, K) of every distinct linear weight of DeepSeek-V2-Lite (2 layers: one dense, one MoE)."""
    module = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides={"num_layers": 2})
    seen: dict[tuple[int, int], str] = {}
    for op in module.main.body:
        if op.name == "linear":
            n, k = op.operands[1].type.shape
            seen.setdefault((int(n), int(k)), ".".join((op.loc or "?").split(".")[-2:]))
    return [(loc, n, k) for (n, k), loc in seen.items()]


def gemm_kernel(k: int):
    text = f"""module @m {{
  func @forward(%x: bf16[M,{k}], %w: bf16[N,{k}]) -> (bf16[M,N]) {{
    %0 = linear(%x, %w) : bf16[M,N]
    return %0
  }}
}}"""
    plan = lower(parse_module(text), "forward")
    return kernel_cache.load(next(src for name, src in plan["kernels"].items() if name.startswith("gemm")))


def time_shape(m: int, n: int, k: int, loc: str, floor) -> dict:
    """cuBLAS and every variant on one shape; a variant's entry is its ms, or why it has none."""
    torch.manual_seed(n * k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    ref = F.linear(x.float(), w.float())
    fl_ms = floor.seconds(2 * m * n * k, 2 * (m * k + n * k + m * n)) * 1e3
    row = {"m": m, "n": n, "k": k, "loc": loc, "floor_ms": fl_ms, "cublas_ms": median_ms(lambda: F.linear(x, w))}
    mod = gemm_kernel(k)
    a, b = x[None], w.t()[None]
    out = torch.empty(1, m, n, device="cuda", dtype=torch.bfloat16)
    for name, cfg, tma in VARIANTS:

        def run(cfg: dict = {**cfg, "PRECISION": "tf32"}, tma: bool = tma) -> None:  # noqa: B006 (bound per variant)
            matmul.launch(mod, a, b, [], [], [out], False, cfg=cfg, tma=tma)

        try:
            out.fill_(float("nan"))
            run()
            err = float((out[0].float() - ref).norm() / ref.norm())
            row[name] = median_ms(run) if err < 1e-2 else f"wrong: rel err {err:.2e}"
        except Exception as e:  # a config that does not compile is recorded, not fatal
            row[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main() -> None:
    floor = measure()
    print(f"floor: {floor}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    report: dict = {"device": floor.device, "floor": floor.as_dict(), "torch": torch.__version__}
    report["triton"], report["rows"] = triton.__version__, []
    for m in (2048, 32):
        for loc, n, k in linear_shapes():
            report["rows"].append(time_shape(m, n, k, loc, floor))
            (out_dir / "gemm_cuda.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'M':>5} {'N':>6} {'K':>6} {'loc':24} {'cuBLAS':>7} {'best r1c variant':22} {'ms':>7} "
          f"{'default':>7} {'floor':>7} {'vs cuBLAS':>9}")  # fmt: skip
    for r in report["rows"]:
        times = {nm: r[nm] for nm, _, _ in VARIANTS if isinstance(r[nm], float)}
        best = min(times, key=times.get) if times else "none"
        ms, default = times.get(best), r[VARIANTS[0][0]]
        d = f"{default:7.4f}" if isinstance(default, float) else "   fail"
        ratio = f"{r['cublas_ms'] / ms:8.2f}x" if ms else "-"
        print(f"{r['m']:5d} {r['n']:6d} {r['k']:6d} {r['loc'][:24]:24} {r['cublas_ms']:7.4f} {best:22} "
              f"{ms or 0:7.4f} {d} {r['floor_ms']:7.4f} {ratio}")  # fmt: skip
        bad = {nm: r[nm] for nm, _, _ in VARIANTS if not isinstance(r[nm], float)}
        if bad:
            print(f"  M={r['m']} N={r['n']} K={r['k']}: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
