"""How much the kv-quant pass changes r1-tiny's logits, per KV format, against full precision.

For each seed: random weights (the model's initializers), random tokens [1, S], the reference interpreter on
the model before and after `kv-quant{...}`. Reported per format: max |logit error| / max |logit| (the numerics
check's metric), top-1 next-token agreement over all positions, and the ratio of the relative error to the
format's unit error (ir/ops/quant.py: worst element error / group amax).

The same is measured on r1-tiny with a dense FFN in every layer (`n_routed_experts=0`): there the logits are
a smooth function of the KV cache, so error / unit error is the amplification that passes/kv_quant.py's
AMPLIFICATION bounds. With MoE, a perturbation that flips a token's top-k expert choice changes its output by
a whole expert's contribution, a jump no error-proportional tolerance covers; those seeds show up as outliers
of the MoE column.

    python bench/kv_quant_error.py [--seeds 8] [--seq 32] [-o bench/results/kv_quant_tiny.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import r1c
from r1c.ir.interpreter import init_weights, run
from r1c.ir.ops.quant import unit_error
from r1c.passes import get_pass, parse_pipeline, run_pipeline
from r1c.passes.numerics import max_rel_error

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {
    "int8": "kv-quant{dtype=int8}",
    "int4": "kv-quant{dtype=int8,bits=4}",
    "fp8e4m3": "kv-quant{dtype=fp8e4m3}",
}


def errors(overrides: dict, seeds: int, seq: int) -> dict[str, list[dict]]:
    """Per format, per seed: relative logit error and top-1 agreement of the quantized model."""
    model = r1c.load(str(ROOT / "examples" / "r1-tiny.r1"), overrides=overrides)
    quantized = {name: run_pipeline(model, pipeline) for name, pipeline in FORMATS.items()}
    rows: dict[str, list[dict]] = {name: [] for name in FORMATS}
    for seed in range(seeds):
        weights = init_weights(model, seed)
        tokens = np.random.default_rng(seed).integers(0, model.attrs["vocab_size"], (1, seq)).astype(np.int32)
        (want,) = run(model, [tokens], weights)
        for name, m in quantized.items():
            (got,) = run(m, [tokens], weights)
            rows[name].append(
                {
                    "seed": seed,
                    "rel_logit_error": max_rel_error([got], [want]),
                    "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
                }
            )
    return rows


def summary(rows: list[dict], unit: float) -> dict:
    errs = [r["rel_logit_error"] for r in rows]
    agree = [r["top1_agreement"] for r in rows]
    return {
        "max_rel_logit_error": max(errs),
        "mean_rel_logit_error": float(np.mean(errs)),
        "max_amplification": max(errs) / unit,
        "min_top1_agreement": min(agree),
        "mean_top1_agreement": float(np.mean(agree)),
        "per_seed": rows,
    }


def measure(seeds: int, seq: int) -> dict:
    moe, dense = errors({}, seeds, seq), errors({"n_routed_experts": 0}, seeds, seq)
    out = {"model": "examples/r1-tiny.r1", "batch": 1, "seq": seq, "seeds": seeds, "formats": {}}
    info = get_pass("kv-quant")
    for name, pipeline in FORMATS.items():
        options = info.bind_options(dict(parse_pipeline(pipeline)[0][1]))
        unit = unit_error(options["dtype"], options["bits"])
        out["formats"][name] = {
            "pipeline": pipeline,
            "unit_error": unit,
            "tolerance": info.tolerance_for(options),
            "r1_tiny": summary(moe[name], unit),
            "r1_tiny_dense_ffn": summary(dense[name], unit),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "kv_quant_tiny.json"))
    args = ap.parse_args()
    result = measure(args.seeds, args.seq)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, f in result["formats"].items():
        print(f"{name} (unit error {f['unit_error']:.3g}, tolerance {f['tolerance']:.3g})")
        for variant in ("r1_tiny", "r1_tiny_dense_ffn"):
            r = f[variant]
            print(
                f"  {variant:18s} max rel logit error {r['max_rel_logit_error']:.3g} "
                f"(mean {r['mean_rel_logit_error']:.3g}, {r['max_amplification']:.2f} x unit error); "
                f"top-1 agreement min {r['min_top1_agreement']:.3f} mean {r['mean_top1_agreement']:.3f}"
            )


if __name__ == "__main__":
    main()
