"""r1-tiny decode steps on the cpu target: `paged_step` (paged latent pool, absorbed MLA over the row's pages)
against `decode` (the per-layer K/V cache, cached_attention), batch 1 and 8, after a prefill of 128 tokens into a
cache of 192 slots (12 pages of 16), and of 1024 into 1088 (68 pages); then one layer's decode attention at
DeepSeek-V2-Lite's shapes (paged_mla_attention vs cached_attention). Symbolic-shape builds; caches and pools stay
in the VM's tensors between steps (target.program(...).run with tvm.runtime.Tensor arguments: in-place writes, no
copy per step). Contenders are timed interleaved, in rounds of ~50 ms blocks of calls (the first two of a block
dropped), medians: this VM is shared and drifts, so the numbers are rough.

    python bench/cpu_paged.py          # writes bench/results/cpu_paged.json (or --out)
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tvm

import r1c
from r1c.backends.cpu.target import program
from r1c.ir.interpreter import init_weights
from r1c.ir.parser import parse_module

ROOT = Path(__file__).parents[1]
PAGE = 16
CONTEXTS = ((128, 192), (1024, 1088))  # (prefill, cache slots)


def paged_stepper(art, m, batch: int, prefill: int, slots: int) -> Callable[[], None]:
    prog, rng = program(art), np.random.default_rng(0)
    pages = slots // PAGE
    pool = tvm.runtime.tensor(rng.standard_normal((3, batch * pages, PAGE, 40)).astype(np.float32))
    table = rng.permutation(batch * pages).astype(np.int32).reshape(batch, pages)
    prompt = rng.integers(0, 512, (batch, prefill)).astype(np.int32)
    prog.run([prompt, pool, table, np.zeros(batch, np.int32)])
    tok, start = prompt[:, -1:].copy(), np.full(batch, prefill, np.int32)
    return lambda: prog.run([tok, pool, table, start])  # rewrites slot prefill each time: the same work per step


def decode_stepper(art, m, batch: int, prefill: int, slots: int) -> Callable[[], None]:
    prog, rng = program(art), np.random.default_rng(0)
    k, v = m.functions["decode"].args[1:3]
    shape = lambda t: [batch if d == "B" else slots if d == "C" else d for d in t.type.shape]  # noqa: E731
    kc, vc = (tvm.runtime.tensor(rng.standard_normal(shape(t)).astype(np.float32)) for t in (k, v))
    prompt = rng.integers(0, 512, (batch, prefill)).astype(np.int32)
    prog.run([prompt, kc, vc, np.zeros(batch, np.int32)])
    tok, start = prompt[:, -1:].copy(), np.full(batch, prefill, np.int32)
    return lambda: prog.run([tok, kc, vc, start])


V2_HEADS, V2_CONTEXT = 16, 4096  # DeepSeek-V2-Lite's attention: latent 512 + rotary 64, nope 128, v 128
V2_PAGED = f"""module @m {{
  func @forward(%q: f32[B,{V2_HEADS},1,192], %pool: f32[1,P,16,576], %table: int32[B,M], %start: int32[B],
                %w: f32[{V2_HEADS * 256},512]) -> (f32[B,{V2_HEADS},1,128]) {{
    %o = paged_mla_attention(%q, %pool, %table, %start, %w) {{layer=0, scale=0.07, qk_nope_head_dim=128,
        v_head_dim=128}} : f32[B,{V2_HEADS},1,128]
    return %o
  }}
}}"""
V2_CACHED = f"""module @m {{
  func @forward(%q: f32[B,{V2_HEADS},1,192], %k: f32[1,B,{V2_HEADS},C,192], %v: f32[1,B,{V2_HEADS},C,128],
                %start: int32[B]) -> (f32[B,{V2_HEADS},1,128]) {{
    %o = cached_attention(%q, %k, %v, %start) {{layer=0, scale=0.07}} : f32[B,{V2_HEADS},1,128]
    return %o
  }}
}}"""


def v2_lite_attention(tmp: Path, batch: int) -> dict[str, Callable[[], None]]:
    """One layer's decode attention at V2-Lite's shapes after 4095 tokens: paged_mla_attention (absorbed, with its
    two GEMMs) against cached_attention over the expanded per-head K/V."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    start, pages = np.full(batch, V2_CONTEXT - 1, np.int32), batch * V2_CONTEXT // 16
    paged, cached = (program(r1c.compile(parse_module(t, "bench.ir"), target="cpu", weights={}, out_dir=tmp / n,
                                         options={"passes": ""}))
                     for n, t in (("v2_paged", V2_PAGED), ("v2_cached", V2_CACHED)))  # fmt: skip
    p_in = [f(batch, V2_HEADS, 1, 192), tvm.runtime.tensor(f(1, pages, 16, 576)),
            np.arange(pages, dtype=np.int32).reshape(batch, -1), start, f(V2_HEADS * 256, 512)]  # fmt: skip
    c_in = [f(batch, V2_HEADS, 1, 192), tvm.runtime.tensor(f(1, batch, V2_HEADS, V2_CONTEXT, 192)),
            tvm.runtime.tensor(f(1, batch, V2_HEADS, V2_CONTEXT, 128)), start]  # fmt: skip
    return {"paged_mla_attention": lambda: paged.run(p_in), "cached_attention": lambda: cached.run(c_in)}


def interleaved(fns: dict[str, Callable[[], None]], rounds: int = 20, block_s: float = 0.05) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t_end, calls = time.perf_counter() + block_s, []
            while time.perf_counter() < t_end or len(calls) < 4:
                t0 = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t0)
            times[name] += calls[2:]
    return {n: float(np.median(t)) * 1e3 for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_paged.json"))
    args = ap.parse_args()
    m = r1c.load(ROOT / "examples" / "r1-tiny.r1")
    w = init_weights(m, 0)
    with tempfile.TemporaryDirectory() as tmp:
        arts = {e: r1c.compile(m, target="cpu", weights=w, out_dir=Path(tmp) / e, options={"entry": e})
                for e in ("paged_step", "decode")}  # fmt: skip
        result = {}
        for (prefill, slots), batch in itertools.product(CONTEXTS, (1, 8)):
            fns = {"paged_step": paged_stepper(arts["paged_step"], m, batch, prefill, slots),
                   "decode": decode_stepper(arts["decode"], m, batch, prefill, slots)}  # fmt: skip
            key = f"context={prefill},B={batch}"
            result[key] = ms = interleaved(fns)
            print(f"{key}: " + ", ".join(f"{n} {t:.3f} ms/step" for n, t in ms.items()))
        for batch in (1, 8):
            key = f"v2-lite attention, context={V2_CONTEXT},B={batch}"
            result[key] = ms = interleaved(v2_lite_attention(Path(tmp), batch), rounds=8)
            print(f"{key}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in ms.items()))
    Path(args.out).write_text(json.dumps({"page": PAGE, "ms_per_step": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
