"""The cpu target's two MoE paths at DeepSeek-V2-Lite's routed-expert shapes (D=2048, 64 experts, F=1408, k=6,
float32): `moe_experts` lowered as one op (counting sort, grouped GEMMs against weights packed at load) against the
`expert-fusion` pipeline (moe_permute, grouped GEMMs over natural-layout weights, moe_unpermute). One symbolic
build each, timed interleaved (this VM's speed drifts) at a prefill of T tokens and at one token.

    python bench/cpu_moe_fused.py            # writes bench/results/cpu_moe_fused.json (or --out)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import r1c
from r1c.ir.parser import parse_module

sys.path.insert(0, str(Path(__file__).parent))
from cpu_bench import interleaved_ms  # noqa: E402  (imports torch too; only its timing helper is used)

ROOT = Path(__file__).parents[1]
MOE = """module @m {{
  param @g : f32[{e},{f},{d}] = normal(0.02)
  param @u : f32[{e},{f},{d}] = normal(0.02)
  param @dn : f32[{e},{d},{f}] = normal(0.02)
  func @forward(%x: f32[T,{d}], %ids: int32[T,{k}], %wt: f32[T,{k}]) -> (f32[T,{d}]) {{
    %g = param() {{name="g"}} : f32[{e},{f},{d}]
    %u = param() {{name="u"}} : f32[{e},{f},{d}]
    %dn = param() {{name="dn"}} : f32[{e},{d},{f}]
    %0 = moe_experts(%x, %ids, %wt, %g, %u, %dn) : f32[T,{d}]
    return %0
  }}
}}"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench/results/cpu_moe_fused.json"))
    args = ap.parse_args()
    d, e, f, k = 2048, 64, 1408, 6
    m = parse_module(MOE.format(d=d, e=e, f=f, k=k))
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal(p.type.shape) * 0.02).astype(np.float32) for n, p in m.params.items()}
    tmp = Path(tempfile.mkdtemp(prefix="r1c_moe_bench"))
    try:
        arts, compile_s = {}, {}
        for name, passes in (
            ("moe_experts", "canonicalize,cse,dce"),
            ("expert_fusion", "canonicalize,expert-fusion,cse,dce"),
        ):
            t0 = time.perf_counter()
            arts[name] = r1c.compile(m, target="cpu", weights=w, out_dir=tmp / name, options={"passes": passes})
            compile_s[name] = round(time.perf_counter() - t0, 1)
        result: dict = {"shapes": dict(D=d, experts=e, F=f, k=k, dtype="f32"), "compile_s": compile_s}
        for t in (args.tokens, 1):
            ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
            wt = rng.random((t, k)).astype(np.float32)
            inputs = [rng.standard_normal((t, d)).astype(np.float32), ids, wt]
            a, b = (arts[n].run(inputs)[0] for n in ("moe_experts", "expert_fusion"))
            diff = float(np.abs(a - b).max() / np.abs(a).max())
            ms = interleaved_ms(
                {n: (lambda art=art, inputs=inputs: art.run(inputs)) for n, art in arts.items()}, args.rounds, 60
            )
            flops = 2 * t * k * 3 * d * f
            result[f"T={t}"] = ms | {"rel_diff": diff, "gflops_fused": flops / ms["expert_fusion"] / 1e6,
                                     "gflops_moe_experts": flops / ms["moe_experts"] / 1e6}  # fmt: skip
            print(f"T={t}: {json.dumps(result[f'T={t}'])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
