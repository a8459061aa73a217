"""Quantized-KV decode attention and MLA decode on the GPU (cuda backend, backends/cuda/kernels/decode_attention.py).

Checks, then times, in one run:
- correctness: the launchers against the IR references at a small size (bf16 q), and at the benchmark size against
  fp32 torch math on the dequantized cache (rel. error < 1e-2);
- attention_kvq decode, B=32, H=16, Sq=1, context 4096, head dim 128, bf16 q, int8 and fp8 K/V: a sweep of
  (splits, BLOCK_N, warps, stages), against torch SDPA on a bf16 cache (flash / efficient / cudnn / math);
- mla_attention_kvq decode, DeepSeek-V2-Lite shapes (16 heads, latent 512, rope 64, nope 128, v 128), B=32,
  context 4096, int8 latent: the kernel alone and the whole launcher (with the two absorption GEMMs), against an
  absorbed-form torch bf16 decode;
- the quantize kernels' bandwidth.
Prints a table last and writes bench/results/decode_cuda.json (or $OUT/decode_cuda.json when $OUT is set).
Run: python bench/decode_cuda.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from r1c.backends.cuda.kernels import decode_attention as da
from r1c.backends.cuda.kernels import mla_decode
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry
from r1c.ir.types import DType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_floor import graph_ms, measure, median_ms  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test under TRITON_INTERPRET=1
BF = torch.bfloat16
QDT = {"int8": DType.int8, "fp8": DType.fp8e4m3}
rows: list[dict] = []
checks: list[dict] = []


def rel(out: torch.Tensor, ref: torch.Tensor | np.ndarray) -> float:
    ref = torch.as_tensor(ref, dtype=torch.float64, device=out.device)
    return float((out.double() - ref).norm() / ref.norm())


def check(name: str, err: float, tol: float = 1e-2) -> None:
    ok = bool(err < tol) and math.isfinite(err)
    checks.append({"check": name, "rel_err": err, "tol": tol, "ok": ok})
    print(f"check {name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")


def quantize(x: torch.Tensor, fmt: str, gran: str, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_launcher("quantize")(x, dtype=QDT[fmt], bits=8, token_axis=axis, granularity=gran)


def stable_ms(fn, repeats: int = 3) -> float:
    """Median of `repeats` median_ms runs: single runs of these 0.15-0.25 ms kernels moved by up to 15% between
    identical launches on the H200 (bench/decode_cuda_notes.md)."""
    return float(np.median([median_ms(fn) for _ in range(repeats)]))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float64)


def small_reference_checks() -> None:
    """Launchers vs the IR op references (float64 numpy) at a small size, bf16 q."""
    kvq, mla = get_launcher("attention_kvq"), get_launcher("mla_attention_kvq")
    for fmt in ("int8", "fp8"):
        q = torch.randn(2, 8, 1, 128, device=DEV, dtype=BF)
        k, v = torch.randn(2, 2, 300, 128, device=DEV), torch.randn(2, 2, 300, 128, device=DEV)
        (kq, ks), (vq, vs) = quantize(k, fmt, "per_channel", 2), quantize(v, fmt, "per_token", 2)
        a = registry.get("attention_kvq").complete_attrs({"scale": 128**-0.5, "causal": True})
        out = kvq(q, kq, ks, vq, vs, **a)
        ref = registry.get("attention_kvq").reference([np64(t) for t in (q, kq, ks, vq, vs)], a)[0]
        check(f"attention_kvq {fmt} vs IR reference (B2 H8 Hkv2 S300)", rel(out, ref))
        lat, rot = torch.randn(2, 300, 512, device=DEV), torch.randn(2, 300, 1, 64, device=DEV)
        (lq, lsc), (rq, rsc) = quantize(lat, fmt, "per_token", 1), quantize(rot, fmt, "per_channel", 1)
        qm = torch.randn(2, 16, 1, 192, device=DEV, dtype=BF)
        w = (torch.randn(16 * 256, 512, device=DEV) / 512**0.5).to(BF)
        a = registry.get("mla_attention_kvq").complete_attrs(
            {"scale": 192**-0.5, "causal": True, "qk_nope_head_dim": 128, "v_head_dim": 128}
        )
        out = mla(qm, lq, lsc, rq, rsc, w, **a)
        ref = registry.get("mla_attention_kvq").reference([np64(t) for t in (qm, lq, lsc, rq, rsc, w)], a)[0]
        check(f"mla_attention_kvq {fmt} vs IR reference (B2 H16 S300)", rel(out, ref))
    x = torch.randn(4, 8, 256, 128, device=DEV, dtype=BF)
    for fmt in ("int8", "fp8"):
        for gran in ("per_token", "per_channel"):
            qx, sx = quantize(x, fmt, gran, 2)
            a = registry.get("quantize").complete_attrs(
                {"dtype": QDT[fmt], "bits": 8, "token_axis": 2, "granularity": gran}
            )
            qr, sr = registry.get("quantize").reference([np64(x)], a)
            mism = float((qx.float().cpu().numpy() != qr.astype(np.float32)).mean())
            check(f"quantize {fmt} {gran}: fraction of codes != reference", mism, 1e-6)
            check(f"quantize {fmt} {gran}: scales", float(np.abs(sx.cpu().numpy() - sr).max() / np.abs(sr).max()), 1e-6)


def row(name: str, ms: float, nbytes: float, floor, base_ms: float | None = None, **extra) -> dict:
    r = {
        "case": name,
        "ms": ms,
        "GB/s": nbytes / (ms * 1e-3) / 1e9,
        "pct_hbm": 100 * nbytes / (ms * 1e-3) / (floor.hbm_tbps * 1e12),
        "bytes": nbytes,
        "floor_ms": floor.seconds(0, nbytes) * 1e3,
        "speedup_vs_baseline": (base_ms / ms) if base_ms else None,
        **extra,
    }
    rows.append(r)
    return r


def bench_mha(floor) -> None:
    b, h, s, d = 32, 16, 4096, 128
    scale = d**-0.5
    q = torch.randn(b, h, 1, d, device=DEV, dtype=BF)
    k = torch.randn(b, h, s, d, device=DEV, dtype=BF)
    v = torch.randn(b, h, s, d, device=DEV, dtype=BF)
    sdpa = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):  # fmt: skip
        try:
            with sdpa_kernel([be]):
                sdpa[name] = stable_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        except RuntimeError as e:
            print(f"sdpa {name}: unavailable ({str(e).splitlines()[0][:80]})")
    best = min(sdpa, key=sdpa.get)
    kv_bytes_bf16 = 2 * k.numel() * 2 + 2 * q.numel() * 2
    for name, ms in sdpa.items():
        row(f"sdpa {name} bf16 KV (B32 H16 S4096 D128)", ms, kv_bytes_bf16, floor, sdpa[best])
    for fmt in ("int8", "fp8"):
        bench_mha_format(fmt, q, k, v, scale, floor, sdpa[best])


def bench_mha_format(fmt: str, q, k, v, scale: float, floor, sdpa_ms: float) -> None:
    """The decode kernel over a quantized copy of k/v: sweep, check against fp32 torch, time the defaults."""
    (kq, ks), (vq, vs) = quantize(k, fmt, "per_channel", 2), quantize(v, fmt, "per_token", 2)
    with torch.no_grad():  # fp32 torch math on the dequantized cache
        ref = F.scaled_dot_product_attention(q.float(), kq.float() * ks, vq.float() * vs, scale=scale)
    nbytes = kq.numel() + vq.numel() + 4 * (ks.numel() + vs.numel()) + 2 * 2 * q.numel()
    configs = [(sp, bn, 8, st, True) for sp in (1, 2) for bn in (32, 64) for st in (3, 4)]
    configs += [(1, 16, 8, 4, True), (1, 32, 4, 4, True), (1, 32, 8, 6, True), (4, 32, 8, 4, True)]
    if fmt == "int8":  # A/B of the int8 conversion: I2F instead of _I8_TO_F32
        configs += [(1, 32, 8, 4, False), (1, 64, 8, 4, False)]
    results = []
    for sp, bn, nw, st, asm in configs:

        def fn(sp=sp, bn=bn, nw=nw, st=st, asm=asm):
            return da.attention_kvq_run(q, kq, ks, vq, vs, scale=scale, causal=True, window=0, sinks=0, bits=8,
                                        splits=sp, block_n=bn, num_warps=nw, num_stages=st, int8_asm=asm)  # fmt: skip

        try:
            out = fn()
        except Exception as e:  # a config that does not compile (resources) is reported, not fatal
            print(f"config {(sp, bn, nw, st, asm)} failed: {str(e).splitlines()[0][:100]}")
            continue
        err = rel(out, ref)
        results.append((median_ms(fn), err, sp, bn, nw, st, asm))
        print(f"mha {fmt} splits={sp} block_n={bn} warps={nw} stages={st} int8_asm={asm}: {results[-1][0]:.4f} ms "
              f"err {err:.1e}")  # fmt: skip
    ms, err, sp, bn, nw, st, asm = min(results)
    check(f"attention_kvq {fmt} B32 S4096 best config vs fp32 torch", err)
    check(f"attention_kvq {fmt} all configs (worst) vs fp32 torch", max(r[1] for r in results))
    attrs = registry.get("attention_kvq").complete_attrs({"scale": scale, "causal": True})
    launch = get_launcher("attention_kvq")
    default = stable_ms(lambda: launch(q, kq, ks, vq, vs, **attrs))
    row(f"attention_kvq {fmt} KV best (sp{sp} bn{bn} w{nw} st{st}{'' if asm else ' I2F'})", ms, nbytes, floor,
        sdpa_ms, sweep=[dict(zip(("ms", "err", "splits", "block_n", "warps", "stages", "int8_asm"), r))
                        for r in results])  # fmt: skip
    row(f"attention_kvq {fmt} KV launcher defaults (median of 3 runs)", default, nbytes, floor, sdpa_ms)
    if fmt == "int8":
        qk_ms = median_ms(lambda: quantize(k, "int8", "per_channel", 2))
        qv_ms = median_ms(lambda: quantize(v, "int8", "per_token", 2))
        row("quantize int8 per_channel (K 32x16x4096x128 bf16)", qk_ms, kq.numel() * 3 + ks.numel() * 4, floor)
        row("quantize int8 per_token (V 32x16x4096x128 bf16)", qv_ms, vq.numel() * 3 + vs.numel() * 4, floor)


def bench_mla(floor) -> None:
    b, h, s, c, dr, dn, dv = 32, 16, 4096, 512, 64, 128, 128
    scale = (dn + dr) ** -0.5
    sets = []
    for _ in range(2):  # two caches, alternated: 76 MB each (int8) is not far above the 50 MB L2
        lat, rot = torch.randn(b, s, c, device=DEV, dtype=BF), torch.randn(b, s, 1, dr, device=DEV, dtype=BF)
        sets.append((lat, rot, quantize(lat, "int8", "per_token", 1), quantize(rot, "int8", "per_channel", 1)))
    q = torch.randn(b, h, 1, dn + dr, device=DEV, dtype=BF)
    w = (torch.randn(h * (dn + dv), c, device=DEV) / c**0.5).to(BF)
    wv = w.view(h, dn + dv, c)
    w_uk, w_uv_t = wv[:, :dn], wv[:, dn:].transpose(1, 2).contiguous()  # [H, C, dv]

    def torch_mla(i: int) -> torch.Tensor:
        """Absorbed MLA decode in torch bf16 ops (cuBLAS bmm + fused softmax): q_nope W_UK, scores against the
        latent and rotary key, softmax, P latent, W_UV. Sq = 1: rows are the heads."""
        lat = sets[i][0]
        q_lat = torch.bmm(q[:, :, 0, :dn].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, C]
        sc = torch.baddbmm(
            torch.bmm(q[:, :, 0, dn:], sets[i][1][:, :, 0].transpose(1, 2)),
            q_lat,
            lat.transpose(1, 2),
            alpha=scale,
            beta=scale,
        )
        p = torch.softmax(sc, dim=-1, dtype=torch.float32).to(BF)
        o_lat = torch.bmm(p, lat)  # [B, H, C]
        return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)[:, :, None]  # [B, H, 1, dv]

    it = {"i": 0}

    def nxt() -> int:
        it["i"] ^= 1
        return it["i"]

    base_bytes = sum(t.numel() * 2 for t in sets[0][:2]) + w.numel() * 2 + q.numel() * 2 + b * h * dv * 2
    base = median_ms(lambda: torch_mla(nxt()))
    base_g = graph_ms(lambda: torch_mla(nxt()))
    row("torch bf16 absorbed MLA (B32 H16 S4096 C512)", base, base_bytes, floor, base)
    row("torch bf16 absorbed MLA, CUDA graph", base_g, base_bytes, floor, base_g)
    a = registry.get("mla_attention_kvq").complete_attrs(
        {"scale": scale, "causal": True, "qk_nope_head_dim": dn, "v_head_dim": dv}
    )
    launch = get_launcher("mla_attention_kvq")

    def ours(i: int) -> torch.Tensor:
        (lq, lsc), (rq, rsc) = sets[i][2], sets[i][3]
        return launch(q, lq, lsc, rq, rsc, w, **a)

    for i in range(2):
        lat, rot, (lq, lsc), (rq, rsc) = sets[i]
        with torch.no_grad():
            deq = (lq.float() * lsc, rq.float() * rsc)
            wf = w.float().view(h, dn + dv, c)
            ql = torch.einsum("bhd,hdc->bhc", q[:, :, 0, :dn].float(), wf[:, :dn])
            sc = (torch.einsum("bhc,bsc->bhs", ql, deq[0]) + torch.einsum("bhd,bsd->bhs", q[:, :, 0, dn:].float(),
                  deq[1][:, :, 0])) * scale  # fmt: skip
            ref = torch.einsum("bhc,hec->bhe", torch.einsum("bhs,bsc->bhc", sc.softmax(-1), deq[0]), wf[:, dn:])
        check(f"mla_attention_kvq int8 B32 S4096 (set {i}) vs fp32 torch", rel(ours(i), ref[:, :, None]))
        check(f"torch bf16 MLA baseline (set {i}) vs fp32 torch on its bf16 cache", rel(torch_mla(i), ref[:, :, None]),
              5e-2)  # fmt: skip
    lq0 = sets[0][2][0]
    kbytes = lq0.numel() + sets[0][3][0].numel() + 4 * (sets[0][2][1].numel() + sets[0][3][1].numel())
    full_bytes = kbytes + w.numel() * 2 + q.numel() * 2 + b * h * dv * 2
    row("mla_attention_kvq int8, launcher (einsums + kernel)", median_ms(lambda: ours(nxt())), full_bytes, floor, base)
    row("mla_attention_kvq int8, launcher, CUDA graph", graph_ms(lambda: ours(nxt())), full_bytes, floor, base_g)
    q_lat = torch.randn(b, h, 1, c, device=DEV, dtype=BF)
    results = []
    for sp in (8, 16, 32):
        for bn, nw, st in ((16, 4, 2), (32, 4, 2), (32, 4, 3), (32, 8, 3), (64, 8, 2), (64, 8, 3)):

            def fn(sp=sp, bn=bn, nw=nw, st=st):
                i = nxt()
                (lq, lsc), (rq, rsc) = sets[i][2], sets[i][3]
                return mla_decode.mla_latent_attention(q_lat, q[..., dn:], lq, lsc, rq, rsc, scale=scale,
                                                       causal=True, window=0, sinks=0, splits=sp, block_n=bn,
                                                       num_warps=nw, num_stages=st)  # fmt: skip

            try:
                fn()
            except Exception as e:
                print(f"mla config {(sp, bn, nw, st)} failed: {str(e).splitlines()[0][:100]}")
                continue
            results.append((median_ms(fn), sp, bn, nw, st))
            print(f"mla kernel splits={sp} block_n={bn} warps={nw} stages={st}: {results[-1][0]:.4f} ms")
    ms, sp, bn, nw, st = min(results)
    kb = kbytes + q_lat.numel() * 2 + q.numel() // 3 * 2 + b * h * c * 2
    row(f"mla latent kernel only (sp{sp} bn{bn} w{nw} st{st})", ms, kb, floor, None,
        sweep=[dict(zip(("ms", "splits", "block_n", "warps", "stages"), r)) for r in results])  # fmt: skip
    ql_ms = median_ms(lambda: quantize(sets[nxt()][0], "int8", "per_token", 1))
    row("quantize int8 per_token (latent 32x4096x512 bf16)", ql_ms, lq0.numel() * 3 + b * s * 4, floor)


def main() -> None:
    torch.manual_seed(0)
    floor = measure()
    print(f"floor: {floor}")
    for section in (small_reference_checks, lambda: bench_mha(floor), lambda: bench_mla(floor)):
        try:  # a failing section is reported and the others still run (one GPU call checks and times all)
            section()
        except Exception:
            traceback.print_exc()
            checks.append({"check": "section raised", "ok": False, "error": traceback.format_exc()[-2000:]})
    result = {
        "floor": floor.as_dict(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        },  # fmt: skip
        "checks": checks,
        "rows": rows,
    }
    out_dir = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results"))
    (out_dir / "decode_cuda.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'case':62s} {'ms':>8s} {'GB/s':>7s} {'%HBM':>6s} {'floor ms':>8s} {'x base':>7s}")
    for r in rows:
        sp = f"{r['speedup_vs_baseline']:.2f}" if r["speedup_vs_baseline"] else "-"
        print(f"{r['case'][:62]:62s} {r['ms']:8.4f} {r['GB/s']:7.0f} {r['pct_hbm']:6.1f} {r['floor_ms']:8.4f} {sp:>7s}")
    bad = [c["check"] for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + (f"; FAILED: {bad}" if bad else ""))


if __name__ == "__main__":
    main()
