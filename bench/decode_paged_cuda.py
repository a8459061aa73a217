"""Greedy generation through the paged MLA cache on one GPU: r1c's `paged_step` (cuda target, bf16) with a bf16,
int8 and fp8 latent pool, against HF transformers `generate` (eager; torch.compile with a static cache) and r1c's
non-paged `decode` step, DeepSeek-V2-Lite-shaped, 2 layers, random init, prompt 512, 64 new tokens, batch 1, 32, 128.

r1c paged: through r1c.inference.executor_cuda.CudaExecutor: one eager prefill step, then 64 decode steps, each a
CUDA graph replay (the pool is donated: written in place), the next token by torch.argmax on the device and a host
sync per token (`stream`, as decode_e2e_cuda.py and HF's generate). Pages of 64 tokens; each row's block table lists
its pages in a random order. `engine`: the same artifact driven by r1c.inference.Engine (host-side sampling: the
logits of every step come to the host as float32), decode seconds from its stats.
Floor: the bytes one decode step must read (decode_e2e_cuda.step_bytes' weights, plus each layer's latent pool at
the mean context: 576 channels a token, 2 bytes bf16 or 1 byte plus 9 f32 scales quantized) at the copy bandwidth
measured in the same run (bench/gpu_floor.py).
Checks in the same run: paged logits (prefill, then 4 decode steps from the graph) against r1c's own `forward` on
the same tokens (bf16; int8/fp8 reported too), and in f32 with weights scaled away from ties, the paged greedy
tokens against HF eager's (identical expected). `kernels`: the paged attention kernel alone at a few tilings.

    source bench/gpu_setup.sh && python3 bench/decode_paged_cuda.py --out $OUT/decode_paged_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import r1c
from r1c.backends.cuda.lower import DEFAULT_PIPELINE
from r1c.backends.cuda.runtime import _PROGRAMS, program
from r1c.inference import Engine, SamplingParams
from r1c.inference.executor_cuda import CudaExecutor
from r1c.ir.interpreter import init_weights

sys.path.insert(0, str(Path(__file__).parent))
from decode_e2e_cuda import hf_generate, r1c_generate, record, step_bytes  # noqa: E402
from e2e_cuda import hf_v2, tokens  # noqa: E402
from gpu_floor import measure  # noqa: E402

ROOT = Path(__file__).parents[1]
PROMPT, NEW, PAGE = 512, 64, 64
POOLS = {"bf16": None, "int8": "int8", "fp8": "fp8e4m3"}  # pool kind -> kv-quant dtype
WORK = Path("/tmp/r1c-decode-paged")


def compile_paged(module, weights, kind: str, dtype: str = "bf16") -> r1c.Artifact:
    opts: dict[str, Any] = {"dtype": dtype, "entry": "paged_step"}
    if POOLS[kind]:
        opts["passes"] = f"kv-quant{{dtype={POOLS[kind]}}},{DEFAULT_PIPELINE}"
    return r1c.compile(module, target="cuda", weights=weights, out_dir=WORK / f"paged-{kind}-{dtype}", options=opts)


def layout(bsz: int, ctx: int, seed: int) -> tuple[int, torch.Tensor]:
    """(pages, block table [B, M] on the device): each row's pages in a random order."""
    per_row = -(-ctx // PAGE)
    perm = np.random.default_rng(seed).permutation(bsz * per_row).astype(np.int32)
    return bsz * per_row, torch.from_numpy(perm.reshape(bsz, per_row)).cuda()


def paged_generate(ex: CudaExecutor, prompt: np.ndarray, new: int, sync: bool = True) -> tuple[np.ndarray, float]:
    """Greedy tokens [B, new] and ms per decode step (graph replays), as decode_e2e_cuda.r1c_generate."""
    bsz = prompt.shape[0]
    pages, table = layout(bsz, PROMPT + new, bsz)
    pools = ex.new_pools(pages, PAGE)
    zeros = torch.zeros(bsz, dtype=torch.int32, device="cuda")
    logits, pools = ex.step_device(torch.from_numpy(prompt).cuda(), pools, table, zeros)
    tok = logits[:, -1].argmax(-1).to(torch.int32)[:, None]
    out = [tok]
    start = torch.full((bsz,), PROMPT, dtype=torch.int32, device="cuda")
    ex.step_device(tok, pools, table, start)  # capture (and a first write of the same slot)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(new - 1):
        start.fill_(PROMPT + t)
        logits, pools = ex.step_device(tok, pools, table, start)
        tok = logits[:, -1].argmax(-1).to(torch.int32)[:, None]
        out.append(tok)
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return torch.cat(out, 1).cpu().numpy(), (time.perf_counter() - t0) / (new - 1) * 1e3


def engine_generate(art: r1c.Artifact, prompt: np.ndarray, new: int) -> tuple[np.ndarray, float]:
    """Greedy tokens through r1c.inference.Engine and its ms per decode call (host sampling)."""
    bsz = prompt.shape[0]
    eng = Engine(art, page_size=PAGE, num_pages=bsz * -(-(PROMPT + new) // PAGE), max_batch=bsz,
                 max_seq_len=PROMPT + new)  # fmt: skip
    rows = [list(map(int, p)) for p in prompt]
    eng.generate(rows, SamplingParams(max_new_tokens=2))  # warm-up: compiles, captures the decode graph of B rows
    secs, calls = eng.stats.decode_seconds, eng.stats.decode_calls
    out = eng.generate(rows, SamplingParams(max_new_tokens=new))
    return np.array(out), (eng.stats.decode_seconds - secs) / (eng.stats.decode_calls - calls) * 1e3


def floor_ms(module, bsz: int, kind: str) -> float:
    a = module.attrs
    ctx = PROMPT + NEW / 2
    per_token = (a["kv_lora_rank"] + a["qk_rope_head_dim"]) * (2 if kind == "bf16" else 1) + (
        0 if kind == "bf16" else 9 * 4
    )
    nbytes = step_bytes(module, bsz, 0) + a["num_layers"] * bsz * ctx * per_token
    return nbytes / (measure().hbm_tbps * 1e12) * 1e3


def check_vs_forward(lite, weights, arts: dict, results: dict, dtype: str = "bf16") -> None:
    """Paged logits (prefill 60 tokens, then 4 decode steps from the graph) against forward's on the same 64."""
    fwd_art = r1c.compile(lite, target="cuda", weights=weights, out_dir=WORK / f"fwd-{dtype}", options={"dtype": dtype})
    fwd = program(fwd_art)
    toks = tokens(lite.attrs["vocab_size"], 2, 64, 5)
    want = fwd.forward([torch.from_numpy(toks).cuda()])[0].float()
    for kind, art in arts.items():
        ex = CudaExecutor(art)
        pages, table = layout(2, 64, 3)
        pools = ex.new_pools(pages, PAGE)
        got, pools = ex.step_device(
            torch.from_numpy(toks[:, :60]).cuda(), pools, table, torch.zeros(2, dtype=torch.int32, device="cuda")
        )
        parts = [got.float()]
        for p in range(60, 64):
            start = torch.full((2,), p, dtype=torch.int32, device="cuda")
            step, pools = ex.step_device(torch.from_numpy(toks[:, p : p + 1]).cuda(), pools, table, start)
            parts.append(step.float().clone())
        got = torch.cat(parts, 1)
        pre = float((got[:, :60] - want[:, :60]).norm() / want[:, :60].norm())
        results[f"{dtype}.{kind}_paged_prefill_logits_rel_diff_vs_forward"] = pre
        results[f"{dtype}.{kind}_paged_logits_rel_diff_vs_forward"] = float((got - want).norm() / want.norm())
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        results[f"{dtype}.{kind}_paged_argmax_agreement_vs_forward"] = agree


def bench_kernels(results: dict) -> None:
    """The paged attention kernel alone (W_UK/W_UV excluded) at V2-Lite decode shapes, a few tilings, replayed from a
    CUDA graph (eager launches of these sizes are host-bound: ~0.15 ms whatever the context)."""
    from triton.testing import do_bench_cudagraph

    from r1c.backends.cuda.kernels.paged import paged_latent_attention

    h, c, dr = 16, 512, 64
    for bsz, ctx in ((32, 576), (128, 576), (32, 4096)):
        pages = bsz * ctx // PAGE
        table = torch.randperm(pages, dtype=torch.int32, device="cuda").view(bsz, -1)
        start = torch.full((bsz,), ctx - 1, dtype=torch.int32, device="cuda")
        q_lat = torch.randn(bsz, h, 1, c, device="cuda", dtype=torch.bfloat16)
        q_rope = torch.randn(bsz, h, 1, dr, device="cuda", dtype=torch.bfloat16)
        for kind in POOLS:
            x = torch.randn(pages, PAGE, c + dr, device="cuda")
            pool = x.to(torch.bfloat16) if kind == "bf16" else (x * 20).clamp(-127, 127).to(
                torch.int8 if kind == "int8" else torch.float8_e4m3fn)  # fmt: skip
            sc = None if kind == "bf16" else torch.rand(pages, PAGE, 9, device="cuda") * 0.01
            nbytes = pool.numel() * pool.element_size() + (0 if sc is None else sc.numel() * 4)
            for bn, warps in ((32, 8), (64, 8), (16, 4)):
                key = f"kernel.B{bsz}.ctx{ctx}.{kind}.n{bn}w{warps}"

                def run(bn=bn, warps=warps, args=(q_lat, q_rope, pool, sc, table, start)):
                    return paged_latent_attention(*args, scale=0.07, block_n=bn, num_warps=warps)

                ms = record(results, key, lambda run=run: do_bench_cudagraph(run, rep=20))
                if ms is not None:
                    results[f"{key}.ms"], results[f"{key}.tbps"] = ms, nbytes / ms / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode_paged_cuda.json")
    ap.add_argument("--batches", default="1,32,128")
    parts_help = "check, check32, paged, engine, decode (non-paged r1c), hf (eager), hfcompile, kernels, f32"
    ap.add_argument("--parts", default="check,paged,engine,decode,hf,kernels,f32", help=parts_help)
    ap.add_argument("--compile-batches", default="1,32")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "prompt": PROMPT, "new_tokens": NEW, "page_size": PAGE}  # fmt: skip
    results["floor"] = measure().as_dict()
    lite = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides={"num_layers": 2})
    weights = init_weights(lite, 0)
    vocab = lite.attrs["vocab_size"]
    save = lambda: out.write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731
    arts = {}
    if parts & {"check", "paged", "engine"}:
        for kind in POOLS:
            arts[kind] = record(results, f"compile paged {kind}", lambda kind=kind: compile_paged(lite, weights, kind))
    if "check" in parts:
        record(results, "logits vs forward", lambda: check_vs_forward(lite, weights, arts, results))
        save()
    if "check32" in parts:  # the same in f32: what the bf16 difference owes to rounding, not to the paged path
        art32 = record(results, "compile paged f32", lambda: compile_paged(lite, weights, "bf16", "f32"))
        record(
            results, "f32 logits vs forward", lambda: check_vs_forward(lite, weights, {"f32": art32}, results, "f32")
        )
        save()
    batches = [int(b) for b in args.batches.split(",")]
    greedy: dict[tuple[int, str], np.ndarray] = {}  # (batch, path) -> greedy tokens, for agreement between paths
    if "paged" in parts:
        for bsz in batches:
            prompt = tokens(vocab, bsz, PROMPT, 10 + bsz)
            for kind, art in arts.items():
                results[f"B{bsz}.{kind}.floor_ms_per_step"] = floor_ms(lite, bsz, kind)
                res = record(
                    results, f"B{bsz} paged {kind}", lambda art=art, p=prompt: paged_generate(CudaExecutor(art), p, NEW)
                )
                if res is not None:
                    results[f"B{bsz}.paged_{kind}_ms_per_step"] = res[1]
                    results[f"B{bsz}.paged_{kind}_tok_s"] = bsz / res[1] * 1e3
                    greedy[(bsz, kind)] = res[0]
            save()
            torch.cuda.empty_cache()
    if "decode" in parts:  # the non-paged decode step of decode_e2e_cuda.py, same run
        opts = {"dtype": "bf16", "entry": "decode"}
        dec_art = lambda: r1c.compile(lite, target="cuda", weights=weights, out_dir=WORK / "dec", options=opts)  # noqa: E731
        dec = record(results, "compile decode", lambda: program(dec_art()))
        for bsz in batches:
            res = record(
                results, f"B{bsz} decode", lambda b=bsz: r1c_generate(dec, tokens(vocab, b, PROMPT, 10 + b), NEW, True)
            )
            for kind in POOLS if res is not None else ():  # greedy bf16 paths agree until a near-tie flips one
                if (bsz, kind) in greedy:
                    results[f"B{bsz}.{kind}_token_agreement_vs_decode"] = float((greedy[bsz, kind] == res[0]).mean())
            if res is not None:
                results[f"B{bsz}.decode_bf16_ms_per_step"], results[f"B{bsz}.decode_bf16_tok_s"] = (
                    res[1],
                    bsz / res[1] * 1e3,
                )
            save()
            torch.cuda.empty_cache()
    arts_bf16 = arts.get("bf16")
    _PROGRAMS.clear()
    torch.cuda.empty_cache()
    if parts & {"hf", "hfcompile"}:
        model = record(results, "HF bf16 model", lambda: hf_v2(dict(lite.attrs), weights, torch.bfloat16, "cuda"))
        for bsz in batches:
            prompt = tokens(vocab, bsz, PROMPT, 10 + bsz)
            runs = [("hf_eager", {"disable_compile": True})] if "hf" in parts else []
            if "hfcompile" in parts and str(bsz) in args.compile_batches.split(","):
                record(results, f"B{bsz} HF compile warm-up",
                       lambda p=prompt: hf_generate(model, p, NEW, cache_implementation="static"))  # fmt: skip
                runs.append(("hf_compile", {"cache_implementation": "static"}))
            for name, kw in runs:
                res = record(results, f"B{bsz} {name}", lambda kw=kw, p=prompt: hf_generate(model, p, NEW, **kw))
                if res is not None:
                    results[f"B{bsz}.{name}_ms_per_step"], results[f"B{bsz}.{name}_tok_s"] = res[1], bsz / res[1] * 1e3
            save()
        model = None
        torch.cuda.empty_cache()
    if "f32" in parts:

        def f32_tokens_equal_hf() -> float:
            w = {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in weights.items()}
            ex = CudaExecutor(compile_paged(lite, w, "bf16", "f32"))
            m32 = hf_v2(dict(lite.attrs), w, torch.float32, "cuda")
            prompt = tokens(vocab, 2, PROMPT, 99)
            ours, _ = paged_generate(ex, prompt, 16)
            theirs, _ = hf_generate(m32, prompt, 16, disable_compile=True)
            results["f32_greedy_tokens_r1c_paged"], results["f32_greedy_tokens_hf"] = ours.tolist(), theirs.tolist()
            return float((ours == theirs).mean())

        results["f32_paged_greedy_token_agreement_vs_hf"] = record(results, "f32 greedy vs HF", f32_tokens_equal_hf)
    if "engine" in parts:
        for bsz in [b for b in batches if b <= 32]:  # the engine moves every prefill position's logits to the host
            prompt = tokens(vocab, bsz, PROMPT, 10 + bsz)
            res = record(results, f"B{bsz} engine bf16", lambda p=prompt: engine_generate(arts_bf16, p, NEW))
            if res is not None:
                results[f"B{bsz}.engine_bf16_ms_per_step"], results[f"B{bsz}.engine_bf16_tok_s"] = (
                    res[1],
                    bsz / res[1] * 1e3,
                )
            save()
    if "kernels" in parts:
        bench_kernels(results)
        save()
    save()
    print("\n=== decode_paged_cuda ===")
    for k, v in results.items():
        if k not in ("errors", "tokens", "f32_greedy_tokens_r1c_paged", "f32_greedy_tokens_hf"):
            print(f"{k:<48} {v:.4g}" if isinstance(v, float) else f"{k:<48} {v}")
    for k, v in results.get("errors", {}).items():
        print(f"ERROR {k}: {v[:300]}")


if __name__ == "__main__":
    main()
