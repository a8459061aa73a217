"""Block-sparse flash attention on the GPU: bf16 correctness against fp32 torch math, then timings against
torch SDPA (flash backend, causal) and compiled flex_attention (sliding window), and the hardware floor.

Run on the GPU machine: `python bench/attention_cuda.py [--quick]`. Writes $OUT/attention_cuda.json when $OUT is
set (the lent machine), else bench/results/attention_cuda.json. --quick times only the default configurations.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from gpu_floor import measure, median_ms  # bench/ is the script's folder, on sys.path
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from r1c.backends.cuda.kernels import flash_attention as fa
from r1c.backends.cuda.kernels.flash_attention_bwd import attention_bwd
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir.ops.attention import visible_pairs

DEV = "cuda"
B, H, S, D = 4, 16, 4096, 128
WINDOW = 1024
FWD_VARIANTS = [  # name, map tiles (block_q, block_k), kernel (BLOCK_M, num_warps, num_stages), FULL tiles first, TMA
    ("64x64 w4 s3", (64, 64), (64, 4, 3), False, False),
    ("64x64 w4 s3 split", (64, 64), (64, 4, 3), True, False),
    ("64x64 w4 s3 tma", (64, 64), (64, 4, 3), False, True),
    ("64x64 w4 s3 split tma", (64, 64), (64, 4, 3), True, True),
    ("64x64 w4 s2 split tma", (64, 64), (64, 4, 2), True, True),
    ("128x64 w8 s3", (128, 64), (128, 8, 3), False, False),
    ("128x64 w8 s3 split tma", (128, 64), (128, 8, 3), True, True),
    ("128x128 w8 s3 split tma", (128, 128), (128, 8, 3), True, True),
]
BWD_VARIANTS = [  # name, (dk/dv pass, dq pass) as (BLOCK_M, BLOCK_N, num_warps, num_stages), FULL tiles first
    ("64x128 / 128x64 w8 s3", ((64, 128, 8, 3), (128, 64, 8, 3)), False),
    ("64x128 / 128x64 w8 s3 split", ((64, 128, 8, 3), (128, 64, 8, 3)), True),
]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("nan")


def torch_mask(sq: int, skv: int, a: dict) -> torch.Tensor:
    qpos = torch.arange(sq, device=DEV)[:, None] + (skv - sq)
    kpos = torch.arange(skv, device=DEV)[None, :]
    if not a["causal"]:
        return torch.ones(sq, skv, dtype=torch.bool, device=DEV)
    m = kpos <= qpos
    if a["window"]:
        m &= (kpos > qpos - a["window"]) | (kpos < a["sinks"])
    return m


def torch_attention(q, k, v, a) -> torch.Tensor:
    """fp32 math reference (k/v repeated to the query heads)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * a["scale"]
    s = s.masked_fill(~torch_mask(q.shape[2], k.shape[2], a), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def check_case(name: str, b, h, hkv, sq, skv, d, dv, mask: dict) -> dict:
    torch.manual_seed(hash(name) % 2**31)
    q, k, v = (torch.randn(s, device=DEV) for s in [(b, h, sq, d), (b, hkv, skv, d), (b, hkv, skv, dv)])
    g = torch.randn(b, h, sq, dv, device=DEV)
    a = {"scale": d**-0.5, "causal": True, "window": 0, "sinks": 0, **mask}
    q32, k32, v32 = (t.bfloat16().float().requires_grad_() for t in (q, k, v))  # the bf16-rounded inputs
    ref = torch_attention(q32, k32, v32, a)
    refs = torch.autograd.grad(ref, (q32, k32, v32), g.bfloat16().float())
    qb, kb, vb, gb = (t.bfloat16() for t in (q, k, v, g))
    out = get_launcher("attention")(qb, kb, vb, **a)
    ta = {**a, "block_q": 64, "block_k": 64, "layout_block": 0, "layout": ()}
    bmap, counts = get_launcher("attention_block_map")(qb, kb, **{n: x for n, x in ta.items() if n != "scale"})
    tiled = get_launcher("tiled_attention")(qb, kb, vb, bmap, counts, **ta)
    grads = get_launcher("attention_grad")(qb, kb, vb, gb, **a)
    errs = {"out": rel(out, ref), "tiled_out": rel(tiled, ref)}
    even = d == fa.pow2(d) and dv == fa.pow2(dv) and skv % 64 == 0
    if fa.tma_ok(kb, vb, 64, even):
        errs["split_tma_out"] = rel(fa.attention_fwd(qb, kb, vb, a, tiles=(64, 64), split=True, tma=True)[0], ref)
    errs.update({n: rel(x, r) for n, x, r in zip(("dq", "dk", "dv"), grads, refs)})
    ok = all(e < 1e-2 for e in errs.values())
    print(f"check {name:28s} {'ok' if ok else 'FAIL'} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return {"case": name, "ok": ok, "rel_err": errs}


CHECKS = [
    ("causal", 2, 4, 4, 1024, 1024, 128, 128, {}),
    ("window256+sinks4", 1, 4, 4, 1024, 1024, 128, 128, {"window": 256, "sinks": 4}),
    ("gqa 8/2 causal", 1, 8, 2, 512, 512, 64, 64, {}),
    ("mla d192 dv128", 1, 4, 4, 512, 512, 192, 128, {}),
    ("prefix sq256 skv1024", 1, 4, 2, 256, 1024, 128, 128, {"window": 300, "sinks": 16}),
    ("tiny d24 dv16", 2, 4, 2, 100, 100, 24, 16, {}),
    ("non-causal", 1, 2, 2, 300, 300, 64, 64, {"causal": False}),
]


def timed(label: str, fn, results: list, **info) -> float | None:
    try:
        ms = median_ms(fn)
    except Exception as e:  # a variant that does not compile (resources) is recorded, not fatal
        print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:200]}")
        results.append({"label": label, "error": f"{type(e).__name__}: {str(e)[:500]}", **info})
        return None
    results.append({"label": label, "ms": ms, **info})
    print(f"  {label}: {ms:.3f} ms")
    return ms


def baseline(case: str, q, k, v, g, scale: float, results: list):
    """(name, output, fwd ms, bwd ms) of the torch baseline: SDPA flash for causal, compiled flex for the window."""
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    if case == "causal":
        name = "torch SDPA flash"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
            fwd = timed(f"{case} fwd {name}", partial(F.scaled_dot_product_attention, q, k, v, is_causal=True), results)
    else:
        name = "flex_attention (compiled)"
        mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW), None, None, S, S, device=DEV)
        flex = partial(torch.compile(flex_attention), block_mask=mask, scale=scale)
        out = flex(qr, kr, vr)  # compiles the forward; the first grad below compiles the backward (untimed warm-up)
        torch.autograd.grad(out, (qr, kr, vr), g, retain_graph=True)
        flex(q, k, v)  # inputs without grad are another compiled graph
        fwd = timed(f"{case} fwd {name}", partial(flex, q, k, v), results)
    bwd = timed(f"{case} bwd {name}", partial(torch.autograd.grad, out, (qr, kr, vr), g, retain_graph=True), results)
    return name, out.detach(), fwd, bwd


def time_case(case: str, a: dict, floor, quick: bool, results: list, table: list) -> None:
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    base_name, base_out, base_fwd, base_bwd = baseline(case, q, k, v, g, a["scale"], results)
    agree = rel(get_launcher("attention")(q, k, v, **a), base_out)
    print(f"  {case}: r1c vs {base_name} output rel diff {agree:.1e}")
    results.append({"label": f"{case} r1c vs baseline rel diff", "rel": agree})

    fwd = {}
    for name, tiles, cfg, split, tma in FWD_VARIANTS[:1] if quick else FWD_VARIANTS:
        run = partial(fa.attention_fwd, q, k, v, a, tiles=tiles, config=cfg, split=split, tma=tma)
        fwd[name] = timed(f"{case} fwd r1c {name}", run, results)
    default_fwd = timed(f"{case} fwd r1c launcher (default)", partial(get_launcher("attention"), q, k, v, **a), results)
    _, lse, delta = fa.attention_fwd(q, k, v, a, return_lse=True, grad_out=g, store_out=False)
    bwd = {}
    for name, cfgs, split in BWD_VARIANTS[:1] if quick else BWD_VARIANTS:
        run = partial(attention_bwd, q, k, v, g, lse, delta, a, cfgs, split=split)
        bwd[name] = timed(f"{case} bwd r1c {name}", run, results)
    grad = timed(f"{case} attention_grad r1c", partial(get_launcher("attention_grad"), q, k, v, g, **a), results)

    pairs = B * H * visible_pairs(S, S, True, a["window"], 0)
    fwd_flops, bwd_flops = 4 * pairs * D, 10 * pairs * D  # 2 and 5 matmuls of 2*D flops per visible pair
    io = 4 * B * H * S * D * 2  # q, k, v read and out written once, bf16 (the backward: twice that)

    def row(what: str, impl: str, ms: float | None, flops: int, base: float | None, io_bytes: int) -> None:
        if ms is not None:
            fl = floor.seconds(flops, io_bytes) * 1e3
            speedup = base / ms if base else None
            table.append({"case": case, "pass": what, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9,
                          "speedup_vs_base": speedup, "floor_ms": fl, "of_floor": fl / ms})  # fmt: skip

    def best(d: dict) -> tuple[str, float | None]:
        ok = {n: ms for n, ms in d.items() if ms is not None}
        return min(ok.items(), key=lambda kv: kv[1]) if ok else ("none", None)

    row("fwd", base_name, base_fwd, fwd_flops, base_fwd, io)
    name, ms = best(fwd)
    row("fwd", f"r1c best {name}", ms, fwd_flops, base_fwd, io)
    row("fwd", "r1c launcher default", default_fwd, fwd_flops, base_fwd, io)
    row("bwd", base_name, base_bwd, bwd_flops, base_bwd, 2 * io)
    name, ms = best(bwd)
    row("bwd", f"r1c best {name}", ms, bwd_flops, base_bwd, 2 * io)
    row("fwd+bwd", "r1c attention_grad (recompute)", grad, fwd_flops + bwd_flops, base_bwd, 2 * io)


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the three kernels (from the JIT caches)."""
    from r1c.backends.cuda.kernels import flash_attention_bwd as fb

    rows = []
    for fn in (fa._fwd_kernel, fb._dkdv_kernel, fb._dq_kernel):
        for cache in fn.device_caches.values():
            for key, kern in cache[0].items():
                meta = kern.metadata
                rows.append({"kernel": fn.__name__, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                             "regs": kern.n_regs, "spills": kern.n_spills, "shared": meta.shared,
                             "specialization": str(key)[:400]})  # fmt: skip
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    floor = measure()
    print(f"floor: {floor}")
    report = {
        "device": floor.device,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]},
        "floor": floor.as_dict(),
        "shape": {"B": B, "H": H, "S": S, "D": D, "window": WINDOW, "dtype": "bfloat16"},
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    path = out_dir / "attention_cuda.json"
    checks = []
    for c in CHECKS:
        try:
            checks.append(check_case(*c))
        except Exception as e:
            traceback.print_exc()
            checks.append({"case": c[0], "ok": False, "error": f"{type(e).__name__}: {e}"})
    report["checks"] = checks
    path.write_text(json.dumps(report, indent=1))
    report["timings"], report["table"] = [], []
    causal = {"scale": D**-0.5, "causal": True, "window": 0, "sinks": 0}
    for case, a in (("causal", causal), ("window1024", {**causal, "window": WINDOW})):
        try:
            time_case(case, a, floor, quick, report["timings"], report["table"])
        except Exception as e:
            traceback.print_exc()
            report["timings"].append({"label": case, "error": f"{type(e).__name__}: {e}"})
        path.write_text(json.dumps(report, indent=1))
    path.write_text(json.dumps(report, indent=1))
    try:
        report["resources"] = kernel_resources()
        path.write_text(json.dumps(report, indent=1))
        for r in report["resources"]:
            print({n: x for n, x in r.items() if n != "specialization"})
    except Exception as e:  # the cache layout is Triton-internal: a change there must not lose the timings
        print(f"no resource report: {type(e).__name__}: {e}")
    print(f"\nchecks: {sum(c['ok'] for c in checks)}/{len(checks)} ok; wrote {path}")
    print(f"floor: bf16 {floor.bf16_tflops:.0f} TFLOP/s, HBM {floor.hbm_tbps:.2f} TB/s, {floor.device}")
    print(f"{'case':11s} {'pass':7s} {'impl':40s} {'ms':>7s} {'TFLOP/s':>8s} {'vs base':>8s} {'of floor':>8s}")
    for r in report["table"]:
        sp = f"{r['speedup_vs_base']:.2f}x" if r["speedup_vs_base"] else "-"
        print(f"{r['case']:11s} {r['pass']:7s} {r['impl']:40s} {r['ms']:7.3f} {r['tflops']:8.1f} {sp:>8s} "
              f"{r['of_floor']:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
