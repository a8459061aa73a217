"""End-to-end bench of the cuda target on one GPU: r1-tiny and a DeepSeek-V2-Lite-shaped 2-layer model (random init).

(a) float32 logits of the cuda target vs the ref target (numpy interpreter), small S;
(b) bf16 prefill tokens/s at B=1,S=2048 and B=4,S=512, vs HF transformers `DeepseekV2ForCausalLM` built from the same
    config and weights, eager bf16 and under torch.compile;
(c) a one-token "decode-shaped" forward (B=32, S=1: the whole model on one position per row, no KV cache) replayed
    from a CUDA graph. KV-cached decode (the models' `decode` function) is bench/decode_e2e_cuda.py.

    source bench/gpu_setup.sh && python3 bench/e2e_cuda.py --out $OUT/e2e_cuda.json
Prints the table last; writes every number (and any error) to the JSON.
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
from r1c.backends.cuda.runtime import _PROGRAMS, program
from r1c.ir.interpreter import init_weights
from r1c.train.torch_ref import hf_config_dict, hf_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from gpu_floor import measure, median_ms  # noqa: E402

ROOT = Path(__file__).parents[1]
T0 = time.time()
OUT: Path | None = None
HF_COMPILE_BY_S = 90.0  # torch.compile of the HF model only if this much of the run is left (it compiles for minutes)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def hf_v2(attrs: dict[str, Any], weights: dict[str, np.ndarray], dtype: torch.dtype, device: str):
    import transformers

    cfg = {k: v for k, v in hf_config_dict(attrs).items() if k != "model_type"}
    with torch.device(device):
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg, attn_implementation="sdpa"))
    model = model.to(dtype).eval()
    state = {
        k: torch.from_numpy(np.asarray(v, np.float32)).to(device, dtype) for k, v in hf_state_dict(weights).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"HF model does not match the weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def tokens(vocab: int, b: int, s: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (b, s)).astype(np.int32)


def timed(label: str, results: dict, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    try:
        out = fn()
    except Exception as e:  # record and go on: one failure must not hide the other numbers
        results.setdefault("errors", {})[label] = f"{type(e).__name__}: {e}"
        traceback.print_exc(limit=-3)
        out = None
    print(f"[{time.time() - t0:7.1f}s] {label}", flush=True)
    if OUT is not None:  # after every item: a run cut off by its time limit still leaves what it measured
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    return out


PIPELINES = {"default": None, "no-expert-fusion": "canonicalize,cse,sparse-attention-tiling,dce"}


def options(pipeline: str, **kw: Any) -> dict[str, Any]:
    return kw if PIPELINES[pipeline] is None else {"passes": PIPELINES[pipeline], **kw}


def accuracy(name: str, module, weights, seq: int, out_dir: Path, results: dict) -> None:
    """cuda (f32 and f16) vs ref logits, with and without expert fusion (each failure recorded on its own)."""
    toks = tokens(module.attrs["vocab_size"], 1, seq, 1)
    ref = r1c.compile(module, target="ref", weights=weights).run([toks])[0]
    for pipeline in PIPELINES:
        for dtype in ("f32", "f16"):

            def check(pipeline: str = pipeline, dtype: str = dtype) -> None:
                opts = options(pipeline, dtype=dtype)
                art = r1c.compile(module, target="cuda", weights=weights, out_dir=out_dir / name, options=opts)
                got = art.run([toks])[0]
                results[f"{name}.{pipeline}.{dtype}_rel_err_vs_ref"] = rel(got, ref)
                results[f"{name}.{pipeline}.{dtype}_argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
                _PROGRAMS.clear()  # free the GPU copy of the weights

            timed(f"{name} accuracy {pipeline} {dtype}", results, check)


def gpu_busy_ms(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """GPU time of one call of fn (sum of its kernels' times, torch.profiler) and the 8 largest kernels by name:
    against the wall time it says how much of a forward is host overhead."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in rows) / 1e3
    top = sorted(rows, key=lambda e: -e.self_device_time_total)[:8]
    return total, {e.key[:60]: round(e.self_device_time_total / 1e3, 4) for e in top}


def prefill(key: str, prog, model, compiled, model32, toks: np.ndarray, results: dict) -> None:
    from r1c.backends.cuda.codegen import matmul
    from r1c.backends.cuda.kernels import flash_attention

    b, s = toks.shape
    flops = r1c.stats(prog.artifact.module, seq=s, batch=b).flops
    results[f"{key}.floor_tok_s"] = b * s / (flops / (measure().bf16_tflops * 1e12))  # bf16 matmul-rate bound
    x = prog.to_device([toks])
    xl = torch.from_numpy(toks).long().cuda()
    ms = timed(f"{key} r1c", results, lambda: median_ms(lambda: prog.forward(x)))
    results[f"{key}.r1c_tok_s"] = b * s / ms * 1e3 if ms else None
    ms = timed(f"{key} r1c graph", results, lambda: median_ms(lambda: prog.forward(x, cuda_graph=True)))
    results[f"{key}.r1c_graph_tok_s"] = b * s / ms * 1e3 if ms else None
    busy = timed(f"{key} r1c profile", results, lambda: gpu_busy_ms(lambda: prog.forward(x)))
    if busy:
        results[f"{key}.r1c_gpu_busy_ms"], results[f"{key}.r1c_top_kernels_ms"] = busy
    # the load paths of the GEMM template and of attention, A/B in the same run (graph replays: GPU time only)
    defaults = matmul.USE_TMA, flash_attention.USE_TMA
    for gemm_tma, attn_tma in ((None, False), (False, False), (True, False), (None, True)):  # None: by shape
        matmul.USE_TMA, flash_attention.USE_TMA = gemm_tma, attn_tma
        prog.graphs.clear()
        label = f"{key}.r1c_graph_gemm_tma={gemm_tma}_attn_tma={attn_tma}_ms"
        results[label] = timed(label, results, lambda: median_ms(lambda: prog.forward(x, cuda_graph=True)))
    matmul.USE_TMA, flash_attention.USE_TMA = defaults
    prog.graphs.clear()
    with torch.no_grad():
        if model is not None:
            ours = prog.forward(x)[0].float()
            theirs = model(xl).logits.float()
            results[f"{key}.bf16_rel_diff_vs_hf"] = float((ours - theirs).norm() / theirs.norm())
            if model32 is not None:  # both bf16 runs against the f32 model: how far each is from exact
                exact = model32(xl).logits.float()
                for who, got in (("r1c", ours), ("hf", theirs)):
                    results[f"{key}.{who}_bf16_rel_err_vs_hf_f32"] = float((got - exact).norm() / exact.norm())
            ms = timed(f"{key} HF eager", results, lambda: median_ms(lambda: model(xl)))
            results[f"{key}.hf_eager_tok_s"] = b * s / ms * 1e3 if ms else None
        if compiled is not None and time.time() - T0 < results["budget_s"] - HF_COMPILE_BY_S:
            timed(f"{key} HF compile warm-up", results, lambda: compiled(xl))
            ms = timed(f"{key} HF torch.compile", results, lambda: median_ms(lambda: compiled(xl)))
            results[f"{key}.hf_compile_tok_s"] = b * s / ms * 1e3 if ms else None


def throughput(name: str, module, weights, out_dir: Path, results: dict, shapes, compile_hf: bool) -> None:
    vocab = module.attrs["vocab_size"]
    prog = None
    for pipeline in PIPELINES:  # the first pipeline whose bf16 forward runs (the fused MoE templates may not yet)
        try:
            opts = options(pipeline, dtype="bf16")
            art = r1c.compile(module, target="cuda", weights=weights, out_dir=out_dir / f"{name}-bf16", options=opts)
            prog = program(art)
            prog.forward(prog.to_device([tokens(vocab, 1, 64, 0)]))
            results[f"{name}.throughput_pipeline"] = pipeline
            break
        except Exception as e:
            results.setdefault("errors", {})[f"{name} bf16 {pipeline}"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=-3)
            _PROGRAMS.clear()
            prog = None
    if prog is None:
        return
    model = timed(f"{name}: HF model", results, lambda: hf_v2(dict(module.attrs), weights, torch.bfloat16, "cuda"))
    compiled = torch.compile(model) if (model is not None and compile_hf) else None
    model32 = timed(f"{name}: HF f32", results, lambda: hf_v2(dict(module.attrs), weights, torch.float32, "cuda"))
    for b, s in shapes:
        prefill(f"{name}.prefill_B{b}_S{s}", prog, model, compiled, model32, tokens(vocab, b, s, 2), results)
    # (c) decode-shaped: B=32 rows of one token each, whole forward, CUDA graph replay
    x = prog.to_device([tokens(vocab, 32, 1, 3)])
    key = f"{name}.decode_shaped_B32_S1"
    ms = timed(f"{key} r1c graph", results, lambda: median_ms(lambda: prog.forward(x, cuda_graph=True)))
    results[f"{key}.r1c_graph_ms"] = ms
    ms = timed(f"{key} r1c eager", results, lambda: median_ms(lambda: prog.forward(x)))
    results[f"{key}.r1c_eager_ms"] = ms
    if model is not None:
        xl = x[0].long()
        with torch.no_grad():
            ms = timed(f"{key} HF eager", results, lambda: median_ms(lambda: model(xl)))
        results[f"{key}.hf_eager_ms"] = ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/e2e_cuda.json")
    ap.add_argument("--work", default="/tmp/r1c-e2e")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true", help="only the throughput part")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds this run may take (skips torch.compile late)")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.out)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["budget_s"] = args.budget
    results["floor"] = measure().as_dict()
    results["note"] = "decode_shaped = one full forward over B=32 single-token rows (no KV cache); not real decode"

    tiny = r1c.load(ROOT / "examples" / "r1-tiny.r1")
    tw = init_weights(tiny, 0)
    if not args.skip_accuracy:
        timed("r1-tiny accuracy", results, lambda: accuracy("r1-tiny", tiny, tw, 8, work, results))

    lite = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides={"num_layers": 2})
    lw = timed("v2-lite-2L init", results, lambda: init_weights(lite, 0))
    if not args.skip_accuracy:
        timed("v2-lite-2L accuracy", results, lambda: accuracy("v2-lite-2L", lite, lw, 16, work, results))
    shapes = [(1, 2048), (4, 512)]
    timed(
        "v2-lite-2L throughput",
        results,
        lambda: throughput("v2-lite-2L", lite, lw, work, results, shapes, not args.no_hf_compile),
    )

    OUT.write_text(json.dumps(results, indent=1) + "\n")
    width = max(len(k) for k in results)
    print("\n=== e2e_cuda summary ===")
    for k, v in results.items():
        if k != "errors":
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    for k, v in results.get("errors", {}).items():
        print(f"ERROR {k}: {v[:300]}")


if __name__ == "__main__":
    main()
