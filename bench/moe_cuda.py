"""The MoE layer on the GPU (DeepSeek-V2-Lite shapes: d=2048, expert ffn 1408, 64 routed experts, top-6):
r1c's Triton kernels (permute -> gate_up GEMM + SwiGLU -> down GEMM -> weighted combine) against a
torch._grouped_mm layer (eager and torch.compile), an HF-style eager loop over experts, and the hardware floor.

Checks first: each launcher in bf16 against the IR op's numpy reference at a small size, and the bf16 layer against
an fp32 torch computation at every timed size. Then per T: every GEMM config of each stage, the layer with the
best ones, the baselines. Run on the GPU machine: `python bench/moe_cuda.py`. Writes $OUT/moe_cuda.json when $OUT
is set (the lent machine), else bench/results/moe_cuda.json.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import triton
from gpu_floor import graph_ms, measure, median_ms  # bench/ is the script's folder, on sys.path

from r1c.backends.cuda.kernels import moe  # noqa: F401  (registers every MoE launcher)
from r1c.backends.cuda.kernels.grouped_gemm import GemmConfig
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEV = "cuda"
D, FF, E, K = 2048, 1408, 64, 6
TOKENS = [64, 4096, 16384]
G = GemmConfig
SMALL = [G(16, 64, 256, 4, 3), G(16, 64, 256, 4, 3, True), G(16, 64, 128, 4, 4, True), G(16, 128, 128, 4, 4, True)]
LARGE_UP = [G(128, 128, 64, 8, 4), G(128, 128, 64, 8, 4, True), G(128, 128, 64, 8, 3, True), G(128, 64, 64, 4, 4, True)]
LARGE_DOWN = [
    G(128, 128, 64, 8, 4),
    G(128, 128, 64, 8, 4, True),
    G(128, 256, 64, 8, 3, True),
    G(128, 128, 64, 4, 4, True),
]
RESULTS: dict = {"shapes": dict(d=D, ffn=FF, experts=E, top_k=K), "checks": {}, "tokens": {}}

permute, gmm, gmm_swiglu = (
    get_launcher("moe_permute"),
    get_launcher("grouped_matmul"),
    get_launcher("grouped_matmul+swiglu"),
)
fused_gate_up, unpermute = get_launcher("moe_permute+grouped_matmul+swiglu"), get_launcher("moe_unpermute")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("nan")


def routing(t: int, e: int = E, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over random router logits, top-k: (ids int32 [T, K], weights bf16 [T, K])."""
    probs = torch.softmax(torch.randn(t, e, device=DEV), -1)
    w, ids = probs.topk(k, -1)
    return ids.int(), w.bfloat16()


def weights(e: int = E, d: int = D, f: int = FF) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = torch.randn(e, 2 * f, d, device=DEV) * d**-0.5
    w2 = torch.randn(e, d, f, device=DEV) * f**-0.5
    return w1.bfloat16(), w2.bfloat16()


# ---- the layers ----


def r1c_layer(x, ids, wts, w1, w2, cfg_up=None, cfg_down=None) -> torch.Tensor:
    xs, off, row_of = permute(x, ids, num_experts=w1.shape[0], num_shared=0, capacity_factor=0.0)
    act = gmm_swiglu(xs, w1, off, first_expert=0, config=cfg_up)
    return unpermute(gmm(act, w2, off, first_expert=0, config=cfg_down), row_of, wts)


def r1c_fused_layer(x, ids, wts, w1, w2, cfg_up=None, cfg_down=None) -> torch.Tensor:
    """The permutation's gather runs inside the gate_up GEMM's A loads (x_sorted never exists)."""
    act, off, row_of = fused_gate_up(
        x, ids, w1, num_experts=w1.shape[0], num_shared=0, capacity_factor=0.0, config=cfg_up
    )
    return unpermute(gmm(act, w2, off, first_expert=0, config=cfg_down), row_of, wts)


def torch_layer(x, ids, wts, w1, w2) -> torch.Tensor:
    """argsort permutation, torch._grouped_mm (CUTLASS) for both GEMMs, SwiGLU and the combine as torch ops."""
    t, k = ids.shape
    f = w2.shape[2]
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w1.shape[0]), 0).int()
    gu = torch._grouped_mm(x[order // k], w1.transpose(1, 2), offs=offs)
    act = F.silu(gu[:, :f]) * gu[:, f:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    y_tok = torch.empty_like(y)
    y_tok[order] = y
    return torch.bmm(wts.view(t, 1, k), y_tok.view(t, k, -1)).view(t, -1)


def hf_layer(x, ids, wts, w1, w2) -> torch.Tensor:
    """The HF eager loop: per expert, find its tokens, run its MLP, add the weighted result."""
    f = w2.shape[2]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok]
        gu = h @ w1[e].T
        y = (F.silu(gu[:, :f]) * gu[:, f:]) @ w2[e].T
        out.index_add_(0, tok, y * wts[tok, slot, None])
    return out


def fp32_layer(x, ids, wts, w1, w2) -> torch.Tensor:
    return hf_layer(x.float(), ids, wts.float(), w1.float(), w2.float())


# ---- checks ----


def np_ref(op: str, ins: list[torch.Tensor], **attrs) -> list[np.ndarray]:
    args = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(args, registry.get(op).complete_attrs(attrs))


def np_rel(out: torch.Tensor, ref: np.ndarray) -> float:
    return rel(out.cpu(), torch.from_numpy(np.asarray(ref, np.float64)))


def check_launchers() -> dict:
    """Every launcher in bf16 against its IR reference (T=300, E=8 with one shared expert, capacity 1.0)."""
    torch.manual_seed(1)
    t, e, k, d, f = 300, 8, 3, 256, 96
    x = torch.randn(t, d, device=DEV).bfloat16()
    ids, wts = routing(t, e - 1, k - 1)
    ids = torch.cat([ids, torch.full((t, 1), e - 1, device=DEV, dtype=torch.int32)], 1)
    wts = torch.cat([wts, torch.ones(t, 1, device=DEV, dtype=torch.bfloat16)], 1)
    w1, w2 = weights(e, d, f)
    attrs = dict(num_experts=e, num_shared=1, capacity_factor=1.0)
    xs, off, row_of = permute(x, ids, **attrs)
    want = np_ref("moe_permute", [x, ids], **attrs)
    out = {
        "moe_permute": float(
            np_rel(xs, want[0]) == 0
            and (off.cpu().numpy() == want[1]).all()
            and (row_of.cpu().numpy() == want[2]).all()
        )
    }
    gu = np_ref("grouped_matmul", [xs, w1, off], first_expert=0)[0]
    out["grouped_matmul"] = np_rel(gmm(xs, w1, off, first_expert=0), gu)
    act_ref = registry.get("swiglu").reference([gu[:, :f], gu[:, f:]], {})[0]
    out["grouped_matmul+swiglu"] = np_rel(gmm_swiglu(xs, w1, off, first_expert=0), act_ref)
    act, off2, row_of2 = fused_gate_up(x, ids, w1, **attrs)
    out["moe_permute+grouped_matmul+swiglu"] = (
        np_rel(act, act_ref) if torch.equal(off, off2) and torch.equal(row_of, row_of2) else float("nan")
    )
    y = torch.randn(t * k, d, device=DEV).bfloat16()
    out["moe_unpermute"] = np_rel(unpermute(y, row_of, wts), np_ref("moe_unpermute", [y, row_of, wts])[0])
    out["moe_gather_rows"] = np_rel(
        get_launcher("moe_gather_rows")(y, row_of), np_ref("moe_gather_rows", [y, row_of])[0]
    )
    z = y.view(t, k, d)
    out["moe_scatter_rows"] = np_rel(
        get_launcher("moe_scatter_rows")(z, row_of), np_ref("moe_scatter_rows", [z, row_of])[0]
    )
    dy = torch.randn(t * k, f, device=DEV).bfloat16()
    want_w = np_ref("grouped_matmul_wgrad", [dy, xs, off], first_expert=0, num_experts=e)[0]
    out["grouped_matmul_wgrad"] = np_rel(
        get_launcher("grouped_matmul_wgrad")(dy, xs, off, first_expert=0, num_experts=e), want_w
    )
    return out


# ---- timing ----


def floor_ms(fl, t: int, ids: torch.Tensor) -> tuple[float, float, float]:
    touched = int(torch.unique(ids).numel())
    flops = 2 * t * K * D * 3 * FF + 2 * t * K * D
    bytes_ = touched * 3 * FF * D * 2 + 2 * t * D * 2 + t * K * (4 + 2)
    return fl.seconds(flops, bytes_) * 1e3, flops, bytes_


def best(fn: Callable[[GemmConfig], object], cfgs: list[GemmConfig], log: dict, name: str) -> GemmConfig:
    times = {}
    for c in cfgs:
        times[c] = median_ms(lambda c=c: fn(c))
        tma = " tma" if c.tma else ""
        log[f"{name} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}{tma}"] = times[c]
    return min(times, key=times.get)


def inputs(t: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(t)
    x = torch.randn(t, D, device=DEV).bfloat16()
    return (x, *routing(t), *weights())


def run_compiled(t: int, res: dict) -> None:
    """The torch._grouped_mm layer through torch.compile (last: its compile time is the longest)."""
    x, ids, wts, w1, w2 = inputs(t)
    try:
        compiled = torch.compile(torch_layer, dynamic=False)
        res["rel_err"]["torch_compiled"] = rel(compiled(x, ids, wts, w1, w2), fp32_layer(x, ids, wts, w1, w2))
        res["ms"]["torch_compiled"] = median_ms(lambda: compiled(x, ids, wts, w1, w2))
    except Exception as exc:  # report, keep the other numbers
        res["torch_compiled_error"] = repr(exc)[:500]


def run_tokens(fl, t: int) -> dict:
    x, ids, wts, w1, w2 = inputs(t)
    res: dict = {"stages_ms": {}}
    ref = fp32_layer(x, ids, wts, w1, w2)
    res["rel_err"] = {
        "r1c": rel(r1c_layer(x, ids, wts, w1, w2), ref),
        "r1c_fused": rel(r1c_fused_layer(x, ids, wts, w1, w2), ref),
    }
    res["rel_err"]["torch_grouped_mm"] = rel(torch_layer(x, ids, wts, w1, w2), ref)
    cfgs_up, cfgs_down = (SMALL, SMALL) if t * K / E <= 16 else (LARGE_UP, LARGE_DOWN)
    xs, off, row_of = permute(x, ids, num_experts=E, num_shared=0, capacity_factor=0.0)
    act = gmm_swiglu(xs, w1, off, first_expert=0)
    y = gmm(act, w2, off, first_expert=0)
    st = res["stages_ms"]
    st["sort (count, scan, place)"] = median_ms(lambda: moe.sort_pairs(ids, E, 0, 0.0))
    st["permute"] = median_ms(lambda: permute(x, ids, num_experts=E, num_shared=0, capacity_factor=0.0))
    up = best(lambda c: gmm_swiglu(xs, w1, off, first_expert=0, config=c), cfgs_up, st, "gate_up+swiglu")
    down = best(lambda c: gmm(act, w2, off, first_expert=0, config=c), cfgs_down, st, "down")
    st["fused permute+gate_up+swiglu"] = median_ms(
        lambda: fused_gate_up(x, ids, w1, num_experts=E, num_shared=0, capacity_factor=0.0, config=up)
    )
    st["unpermute"] = median_ms(lambda: unpermute(y, row_of, wts))
    ms = {
        "r1c": median_ms(lambda: r1c_layer(x, ids, wts, w1, w2, up, down)),
        "r1c_fused": median_ms(lambda: r1c_fused_layer(x, ids, wts, w1, w2, up, down)),
        "r1c_default_configs": median_ms(lambda: r1c_layer(x, ids, wts, w1, w2)),
        "torch_grouped_mm": median_ms(lambda: torch_layer(x, ids, wts, w1, w2)),
        "hf_eager": median_ms(lambda: hf_layer(x, ids, wts, w1, w2), rep_ms=100),
    }
    try:  # GPU time alone (no host gaps between the 7 launches): how the layer runs inside a captured model
        ms["r1c_graph"] = graph_ms(lambda: r1c_layer(x, ids, wts, w1, w2, up, down), calls=4)
    except Exception as exc:  # report, keep the other numbers
        res["r1c_graph_error"] = repr(exc)[:500]
    res["best_configs"] = {"gate_up": up.__dict__, "down": down.__dict__}
    floor, flops, bytes_ = floor_ms(fl, t, ids)
    res.update(ms=ms, floor_ms=floor, flops=flops, bytes=bytes_)
    return res


def main() -> None:
    out_dir = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    fl = measure()
    RESULTS.update(floor=fl.as_dict(), torch=torch.__version__, triton=triton.__version__, device=fl.device)
    path = out_dir / "moe_cuda.json"
    try:
        RESULTS["checks"] = check_launchers()
        print("launcher checks (rel err vs IR reference, bf16):", json.dumps(RESULTS["checks"]))
    except Exception:
        RESULTS["checks_error"] = traceback.format_exc()
        print(RESULTS["checks_error"])
    for t in TOKENS:
        try:
            RESULTS["tokens"][str(t)] = run_tokens(fl, t)
        except Exception:
            RESULTS["tokens"][str(t)] = {"error": traceback.format_exc()}
            print(RESULTS["tokens"][str(t)]["error"])
        path.write_text(json.dumps(RESULTS, indent=1))
        print(t, json.dumps(RESULTS["tokens"][str(t)]), flush=True)
    for t in TOKENS:
        if "ms" in RESULTS["tokens"][str(t)]:
            run_compiled(t, RESULTS["tokens"][str(t)])
            path.write_text(json.dumps(RESULTS, indent=1))
    print(f"\nfloor: {fl.bf16_tflops:.0f} TFLOP/s bf16, {fl.hbm_tbps:.2f} TB/s, {fl.device}")
    names = ["r1c", "r1c_fused", "r1c_graph", "torch_grouped_mm", "torch_compiled", "hf_eager"]
    print(
        f"{'T':>6} "
        + " ".join(f"{n:>16}" for n in names)
        + f" {'floor':>8} {'best r1c':>9} {'x gmm':>6} {'x comp':>6} {'floor/r1c':>9} {'floor/graph':>11}"
    )
    for t, r in RESULTS["tokens"].items():
        if "ms" not in r:
            print(f"{t:>6} error")
            continue
        ms = r["ms"]
        mine = min(ms["r1c"], ms["r1c_fused"])
        comp = ms.get("torch_compiled", float("nan"))
        cells = " ".join(f"{ms.get(n, float('nan')):>16.3f}" for n in names)
        ratios = f"{ms['torch_grouped_mm'] / mine:>6.2f} {comp / mine:>6.2f} {r['floor_ms'] / mine:>9.2f}"
        ratios += f" {r['floor_ms'] / ms.get('r1c_graph', float('nan')):>11.2f}"
        print(f"{t:>6} {cells} {r['floor_ms']:>8.3f} {mine:>9.3f} {ratios}")
    ok = all(
        v < 1e-2 for r in RESULTS["tokens"].values() for k, v in r.get("rel_err", {}).items() if k.startswith("r1c")
    )
    print("bf16 layer vs fp32 within 1e-2:", ok, {t: r.get("rel_err") for t, r in RESULTS["tokens"].items()})


if __name__ == "__main__":
    sys.exit(main())
