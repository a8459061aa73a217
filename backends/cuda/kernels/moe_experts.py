"""The unfused `moe_experts` op: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t,k].

Two kernels, no sorting and no atomics (deterministic): one program per (token, slot, ffn block) computes the
activation from the expert's gate/up rows, then one per (token, model block) sums the weighted down projections.
Weight dimensions are compile-time constants (static loop bounds; Triton's interpreter cannot iterate range() over
a run-time scalar). Mat-vecs, not GEMMs: this is the reference-shaped path for pipelines without expert fusion;
the fused form (moe_permute + grouped_matmul) is the fast one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher


@triton.jit
def _act_kernel(
    X, IDS, WG, WU, ACT, sxt, sit, sik, swe, swf,
    D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0).to(tl.int64)  # token * K + slot
    t = pair // K
    e = tl.load(IDS + t * sit + (pair % K) * sik).to(tl.int64)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    fm = f < F
    g = tl.zeros((BF,), tl.float32)
    u = tl.zeros((BF,), tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        x = tl.load(X + t * sxt + d, mask=dm, other=0.0).to(tl.float32)
        off = e * swe + f[:, None] * swf + d[None, :]
        wm = fm[:, None] & dm[None, :]
        g += tl.sum(tl.load(WG + off, mask=wm, other=0.0).to(tl.float32) * x[None, :], 1)
        u += tl.sum(tl.load(WU + off, mask=wm, other=0.0).to(tl.float32) * x[None, :], 1)
    tl.store(ACT + pair * F + f, g / (1.0 + tl.exp(-g)) * u, mask=fm)


@triton.jit
def _down_kernel(
    ACT, IDS, W, WD, OUT, sit, sik, swt, swk, swe, swd,
    D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    y = tl.zeros((BD,), tl.float32)
    for k in range(K):
        e = tl.load(IDS + t * sit + k * sik).to(tl.int64)
        wk = tl.load(W + t * swt + k * swk).to(tl.float32)
        part = tl.zeros((BD,), tl.float32)
        for f0 in range(0, F, BF):
            f = f0 + tl.arange(0, BF)
            fm = f < F
            a = tl.load(ACT + (t * K + k) * F + f, mask=fm, other=0.0)
            wd = tl.load(WD + e * swe + d[:, None] * swd + f[None, :], mask=dm[:, None] & fm[None, :], other=0.0)
            part += tl.sum(wd.to(tl.float32) * a[None, :], 1)
        y += wk * part
    tl.store(OUT + t * D + d, y.to(OUT.dtype.element_ty), mask=dm)


def _rowmajor(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"moe_experts: {name} must have a unit stride on its last axis, got strides {t.stride()}")


@launcher("moe_experts")
def moe_experts(x, ids, w, w_gate, w_up, w_down) -> torch.Tensor:
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _rowmajor(name, t)
    if w_gate.stride() != w_up.stride():
        raise ValueError("moe_experts: w_gate and w_up must share a layout")
    tokens, dim = x.shape
    k = ids.shape[1]
    ffn = w_gate.shape[1]
    act = torch.empty((tokens * k, ffn), device=x.device, dtype=torch.float32)
    out = torch.empty((tokens, dim), device=x.device, dtype=x.dtype)
    if tokens == 0:
        return out
    bf, bd = 32, 64
    _act_kernel[(tokens * k, triton.cdiv(ffn, bf))](
        x, ids, w_gate, w_up, act, x.stride(0), *ids.stride(), w_gate.stride(0), w_gate.stride(1),
        D=dim, F=ffn, K=k, BF=bf, BD=bd,
    )  # fmt: skip
    _down_kernel[(tokens, triton.cdiv(dim, bd))](
        act, ids, w, w_down, out, *ids.stride(), *w.stride(), w_down.stride(0), w_down.stride(1),
        D=dim, F=ffn, K=k, BD=bd, BF=bf,
    )  # fmt: skip
    return out
