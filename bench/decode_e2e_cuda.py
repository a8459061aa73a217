"""KV-cached greedy generation on one GPU: r1c's `decode` function (cuda target, bf16) against HF transformers
`generate` (eager with its DynamicCache, and torch.compile with a static cache), DeepSeek-V2-Lite-shaped, 2 layers,
random init, prompt 512 tokens, 64 new tokens, batch 1, 32 and 128.

r1c: one prefill step (eager) then 64 decode steps replayed from one CUDA graph (the caches are donated: updated in
place), the next token by torch.argmax of the logits (the sampler is not part of r1c yet). Two timings:
- `stream`: a host sync after every token, as a streaming server needs and as HF's generate does (its stopping check
  reads the device every step);
- `async`: the 64 replays queued back to back.
HF: the time per token from a streamer's timestamps (after the first new token, so prefill is excluded).
Floor: the bytes one decode step must read at the copy bandwidth measured in the same run (bench/gpu_floor.py):
every non-embedding weight except routed experts, the experts a batch is expected to touch (1 - (1 - k/E)^B of
them), B embedding rows and each layer's cached K/V at the mean context (FLOPs are far below the matmul rate).
Checks in the same run: r1c's decode logits against r1c's own `forward` on the same tokens (bf16), and in f32 with
weights scaled away from ties, r1c's greedy tokens against HF eager's (identical expected).

    source bench/gpu_setup.sh && python3 bench/decode_e2e_cuda.py --out $OUT/decode_e2e_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

import r1c
from r1c.backends.cuda.runtime import _PROGRAMS, program
from r1c.ir.interpreter import init_weights

sys.path.insert(0, str(Path(__file__).parent))
from e2e_cuda import hf_v2, tokens  # noqa: E402
from gpu_floor import measure  # noqa: E402

ROOT = Path(__file__).parents[1]
PROMPT, NEW = 512, 64
T0 = time.time()


class Stamps:
    """A generate() streamer that records when each new token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() puts the prompt first
            self.first = False
            return
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        t = self.times[1:]  # from the second new token: the first one comes out of the prefill
        return (t[-1] - t[0]) / (len(t) - 1) * 1e3


def step_bytes(module, bsz: int, ctx: float, elem: int = 2) -> float:
    """Bytes one decode step of `bsz` rows at mean context `ctx` reads at least (see the module docstring)."""
    a = module.attrs
    touched = 1 - (1 - a["experts_per_tok"] / a["n_routed_experts"]) ** bsz
    weights = 0.0
    for name, p in module.params.items():
        n = float(np.prod(p.type.shape))
        if name == "model.embed_tokens.weight":
            n = bsz * a["hidden_size"]
        elif ".experts." in name:
            n *= touched
        weights += n
    kv = (
        a["num_layers"] * bsz * a["num_heads"] * ctx * (a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"])
    )
    return (weights + kv) * elem


def caches(prog, bsz: int, slots: int) -> list[torch.Tensor]:
    k, v = prog.fn.args[1:3]
    shape = lambda t: [bsz if d == "B" else slots if d == "C" else d for d in t.type.shape]  # noqa: E731
    return [torch.zeros(shape(t), dtype=prog.dtype_of(t.type.dtype), device="cuda") for t in (k, v)]


def r1c_generate(prog, prompt: np.ndarray, new: int, sync: bool) -> tuple[np.ndarray, float, list[torch.Tensor]]:
    """Greedy tokens [B, new] and ms per decode step (graph replays; `sync`: a host sync after every token)."""
    bsz = prompt.shape[0]
    kc, vc = caches(prog, bsz, PROMPT + new)
    prog.graphs.clear()  # a graph captured over other caches would copy them in on every replay
    zeros = torch.zeros(bsz, dtype=torch.int32, device="cuda")
    logits, kc, vc = prog.forward([torch.from_numpy(prompt).cuda(), kc, vc, zeros])
    tok = logits[:, -1].argmax(-1).to(torch.int32)[:, None]
    out = [tok]
    start = torch.full((bsz,), PROMPT, dtype=torch.int32, device="cuda")
    prog.forward([tok, kc, vc, start], cuda_graph=True)  # capture (and a first write of the same slot)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in range(new - 1):
        start.fill_(PROMPT + t)
        logits, kc, vc = prog.forward([tok, kc, vc, start], cuda_graph=True)
        tok = logits[:, -1].argmax(-1).to(torch.int32)[:, None]
        out.append(tok)
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / (new - 1) * 1e3
    return torch.cat(out, 1).cpu().numpy(), ms, [kc, vc]


def hf_generate(model, prompt: np.ndarray, new: int, **kw: Any) -> tuple[np.ndarray, float]:
    stamps = Stamps()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt).long().cuda(), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, streamer=stamps, **kw)  # fmt: skip
    return out[:, prompt.shape[1] :].cpu().numpy(), stamps.ms_per_token()


def bench_batch(results: dict, prog, model, prompt: np.ndarray, compile_hf: bool) -> None:
    bsz = prompt.shape[0]
    key = f"B{bsz}"
    nbytes = step_bytes(prog.artifact.module, bsz, PROMPT + NEW / 2)
    results[f"{key}.floor_ms_per_step"] = nbytes / (measure().hbm_tbps * 1e12) * 1e3
    for mode, sync in (("stream", True), ("async", False)):
        res = record(results, f"{key} r1c {mode}", lambda sync=sync: r1c_generate(prog, prompt, NEW, sync))
        if res is not None:
            results[f"{key}.r1c_{mode}_ms_per_step"], results[f"{key}.r1c_{mode}_tok_s"] = res[1], bsz / res[1] * 1e3
    runs = [("hf_eager", {"disable_compile": True})]
    if compile_hf:  # generate() compiles the forward when the cache is static; the first call pays the compile
        record(
            results, f"{key} HF compile warm-up", lambda: hf_generate(model, prompt, NEW, cache_implementation="static")
        )
        runs.append(("hf_compile", {"cache_implementation": "static"}))
    for name, kw in runs:
        res = record(results, f"{key} {name}", lambda kw=kw: hf_generate(model, prompt, NEW, **kw))
        if res is not None:
            results[f"{key}.{name}_ms_per_step"], results[f"{key}.{name}_tok_s"] = res[1], bsz / res[1] * 1e3


def record(results: dict, key: str, fn) -> Any:
    t0 = time.time()
    try:
        val = fn()
    except Exception as e:  # one failure must not hide the other numbers
        results.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc(limit=-4)
        val = None
    print(f"[{time.time() - T0:6.0f}s +{time.time() - t0:5.1f}s] {key}", flush=True)
    return val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode_e2e_cuda.json")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--compile-batches", default="32", help="batches for HF torch.compile (it compiles per shape)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; HF compile is skipped when late")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "prompt": PROMPT, "new_tokens": NEW}  # fmt: skip
    import transformers

    results["transformers"] = transformers.__version__
    results["floor"] = measure().as_dict()
    lite = r1c.load(ROOT / "examples" / "deepseek-v2-lite.r1", overrides={"num_layers": 2})
    weights = init_weights(lite, 0)
    vocab = lite.attrs["vocab_size"]
    work = Path("/tmp/r1c-decode-e2e")

    def compile_decode(dtype: str, w) -> Any:
        opts = {"dtype": dtype, "entry": "decode"}
        return program(r1c.compile(lite, target="cuda", weights=w, out_dir=work / f"dec-{dtype}", options=opts))

    prog = record(results, "r1c compile bf16", lambda: compile_decode("bf16", weights))
    model = record(results, "HF bf16 model", lambda: hf_v2(dict(lite.attrs), weights, torch.bfloat16, "cuda"))

    def logits_vs_forward() -> float:  # decode's prefill logits against forward's, same artifact dtype
        art = r1c.compile(lite, target="cuda", weights=weights, out_dir=work / "fwd", options={"dtype": "bf16"})
        fwd = program(art)
        toks = tokens(vocab, 2, 64, 5)
        kc, vc = caches(prog, 2, 80)
        got = prog.forward([torch.from_numpy(toks).cuda(), kc, vc, torch.zeros(2, dtype=torch.int32, device="cuda")])
        want = fwd.forward([torch.from_numpy(toks).cuda()])[0].float()
        return float((got[0].float() - want).norm() / want.norm())

    results["bf16_decode_prefill_logits_rel_diff_vs_forward"] = record(results, "logits vs forward", logits_vs_forward)
    for bsz in (int(b) for b in args.batches.split(",")):
        compile_hf = str(bsz) in args.compile_batches.split(",") and time.time() - T0 < args.budget - 150
        bench_batch(results, prog, model, tokens(vocab, bsz, PROMPT, 10 + bsz), compile_hf)
        out.write_text(json.dumps(results, indent=1) + "\n")
        torch.cuda.empty_cache()
    model = None
    _PROGRAMS.clear()
    torch.cuda.empty_cache()

    def f32_tokens_equal_hf() -> float:
        w = {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in weights.items()}
        p32 = compile_decode("f32", w)
        m32 = hf_v2(dict(lite.attrs), w, torch.float32, "cuda")
        prompt = tokens(vocab, 2, PROMPT, 99)
        ours, _, _ = r1c_generate(p32, prompt, 16, True)
        theirs, _ = hf_generate(m32, prompt, 16, disable_compile=True)
        results["f32_greedy_tokens_r1c"], results["f32_greedy_tokens_hf"] = ours.tolist(), theirs.tolist()
        return float((ours == theirs).mean())

    results["f32_greedy_token_agreement_vs_hf"] = record(results, "f32 greedy vs HF", f32_tokens_equal_hf)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n=== decode_e2e_cuda ===")
    for k, v in results.items():
        if k not in ("errors", "f32_greedy_tokens_r1c", "f32_greedy_tokens_hf"):
            print(f"{k:<48} {v:.4g}" if isinstance(v, float) else f"{k:<48} {v}")
    for k, v in results.get("errors", {}).items():
        print(f"ERROR {k}: {v[:300]}")


if __name__ == "__main__":
    main()
