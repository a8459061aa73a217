"""`moe_experts_grad`: the backward of the unfused `moe_experts` (SwiGLU experts, stacked weights), deterministic.

For each routed pair p = (t, k) with e = ids[t, k], w = weights[t, k]:
  gate = wg[e] x_t, up = wu[e] x_t, s = sigmoid(gate), act = gate * s * up, gd = wd[e]^T g_t
  dweights[t, k] = act . gd;  dact = w * gd
  dgate = dact * up * s * (1 + gate * (1 - s)), dup = dact * gate * s
  dx_t = sum_k wg[e]^T dgate + wu[e]^T dup
  dwg[e] = sum_p dgate x_t^T, dwu[e] = sum_p dup x_t^T, dwd[e] = sum_p g_t (w * act)^T

Four steps, no atomics:
  1. the pairs are counting-sorted by expert on the device (moe.sort_pairs: stable, so token order within an
     expert);
  2. one program per (pair, ffn block) recomputes gate/up and gd (mat-vecs over the model dim, like the forward's
     _act_kernel) and writes dgate, dup and w * act into f32 buffers at the pair's sorted row, plus its block's
     partial of dweights;
  3. one program per (token, model block) sums dx over the token's K slots (like the forward's _down_kernel); the
     first model block also sums each slot's dweights partials in block order;
  4. one program per (expert, row tile, column tile) accumulates its expert's sorted rows in order with tl.dot
     (the other operand, x or g, gathered by token), a while loop over the expert's data-dependent row range.
Model/ffn/top-k sizes are compile-time constants (static loop bounds for Triton's interpreter). Expert ids must
lie in [0, E): they are not checked (that would sync with the host), as in the forward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels.moe import sort_pairs
from r1c.backends.cuda.launchers import launcher

# Mat-vec tiles (ffn x model) of step 2 and of step 3 (by weight element size), 4 warps: the fastest of a sweep on
# an H200 at T=2048, K=6, E=16, D=1024, F=512 (~15 ms f32 and bf16; each pair rereads its expert's weights, so
# this path is bound by L2 bandwidth: the fused moe_permute + grouped GEMM form is the fast one).
_BF, _BD = 64, 128
_DX_TILES = {4: (32, 256), 2: (64, 128)}
_WARPS = 4
_BN, _BC, _BR = 32, 32, 16  # weight-gradient tile (rows x columns) and sorted rows per tl.dot step


@triton.jit
def _pair_kernel(
    X, IDS, W, G, WG, WU, WD, ROW_OF, DGATE, DUP, WACT, DWP, sit, sik, swt, swk, swe, swf, sde, sdd,
    D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, NFB: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0).to(tl.int64)  # token * K + slot
    fb = tl.program_id(1)
    t, k = pair // K, pair % K
    e = tl.load(IDS + t * sit + k * sik).to(tl.int64)
    wk = tl.load(W + t * swt + k * swk).to(tl.float32)
    f = fb * BF + tl.arange(0, BF)
    fm = f < F
    gate = tl.zeros((BF,), tl.float32)
    up = tl.zeros((BF,), tl.float32)
    gd = tl.zeros((BF,), tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        wm = fm[:, None] & dm[None, :]
        x = tl.load(X + t * D + d, mask=dm, other=0.0).to(tl.float32)
        g = tl.load(G + t * D + d, mask=dm, other=0.0).to(tl.float32)
        off = e * swe + f[:, None] * swf + d[None, :]
        gate += tl.sum(tl.load(WG + off, mask=wm, other=0.0).to(tl.float32) * x[None, :], 1)
        up += tl.sum(tl.load(WU + off, mask=wm, other=0.0).to(tl.float32) * x[None, :], 1)
        wd = tl.load(WD + e * sde + d[None, :] * sdd + f[:, None], mask=wm, other=0.0)  # wd[e]^T tile [BF, BD]
        gd += tl.sum(wd.to(tl.float32) * g[None, :], 1)
    s = 1.0 / (1.0 + tl.exp(-gate))
    act = gate * s * up  # 0 on masked f: gate = up = 0
    dact = wk * gd
    row = tl.load(ROW_OF + pair).to(tl.int64)
    tl.store(DGATE + row * F + f, dact * up * s * (1.0 + gate * (1.0 - s)), mask=fm)
    tl.store(DUP + row * F + f, dact * gate * s, mask=fm)
    tl.store(WACT + row * F + f, wk * act, mask=fm)
    tl.store(DWP + pair * NFB + fb, tl.sum(act * gd, 0))


@triton.jit
def _dx_kernel(
    IDS, ROW_OF, DGATE, DUP, DWP, WG, WU, DX, DW, sit, sik, swe, swf,
    D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, NFB: tl.constexpr, NFB_P2: tl.constexpr,
    BD: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    d = db * BD + tl.arange(0, BD)
    dm = d < D
    acc = tl.zeros((BD,), tl.float32)
    for k in range(K):
        e = tl.load(IDS + t * sit + k * sik).to(tl.int64)
        row = tl.load(ROW_OF + t * K + k).to(tl.int64)
        for f0 in range(0, F, BF):
            f = f0 + tl.arange(0, BF)
            fm = f < F
            wm = fm[:, None] & dm[None, :]
            dg = tl.load(DGATE + row * F + f, mask=fm, other=0.0)
            du = tl.load(DUP + row * F + f, mask=fm, other=0.0)
            off = e * swe + f[:, None] * swf + d[None, :]
            acc += tl.sum(tl.load(WG + off, mask=wm, other=0.0).to(tl.float32) * dg[:, None], 0)
            acc += tl.sum(tl.load(WU + off, mask=wm, other=0.0).to(tl.float32) * du[:, None], 0)
        nb = tl.arange(0, NFB_P2)
        parts = tl.load(DWP + (t * K + k) * NFB + nb, mask=nb < NFB, other=0.0)
        tl.store(DW + t * K + k, tl.sum(parts, 0).to(DW.dtype.element_ty), mask=db == 0)
    tl.store(DX + t * D + d, acc.to(DX.dtype.element_ty), mask=dm)


@triton.jit
def _wgrad_kernel(
    A, B, SRC, OFF, OUT, N: tl.constexpr, C: tl.constexpr, GATHER_A: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """OUT[e] = A[rows of e]^T @ B[rows of e] ([N, C]); rows are sorted pairs, and the operand that is per token
    (A if GATHER_A, else B) is read at each row's token SRC[row]."""
    e = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    lo = tl.load(OFF + e)
    hi = tl.load(OFF + e + 1)
    acc = tl.zeros((BN, BC), tl.float32)
    r0 = lo
    while r0 < hi:  # the expert's row count is data (the interpreter cannot range() over it)
        r = r0 + tl.arange(0, BR)
        rm = r < hi
        tok = tl.load(SRC + r, mask=rm, other=0).to(tl.int64)
        ra = tok if GATHER_A else r.to(tl.int64)
        rb = r.to(tl.int64) if GATHER_A else tok
        a = tl.load(A + ra[None, :] * N + n[:, None], mask=rm[None, :] & (n[:, None] < N), other=0.0)
        b = tl.load(B + rb[:, None] * C + c[None, :], mask=rm[:, None] & (c[None, :] < C), other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
        r0 += BR
    out = OUT + e.to(tl.int64) * N * C + n[:, None] * C + c[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(n[:, None] < N) & (c[None, :] < C))


def _wgrad(a, b, src, off, out, gather_a: bool, prec: str) -> None:
    e, n, c = out.shape
    grid = (e, triton.cdiv(n, _BN), triton.cdiv(c, _BC))
    _wgrad_kernel[grid](a, b, src, off, out, N=n, C=c, GATHER_A=gather_a, PREC=prec, BN=_BN, BC=_BC, BR=_BR)


@launcher("moe_experts_grad")
def moe_experts_grad(x, ids, weights, w_gate, w_up, w_down, g) -> tuple[torch.Tensor, ...]:
    for name, t in (("x", x), ("g", g), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not t.is_contiguous():
            raise ValueError(f"moe_experts_grad: {name} must be contiguous, got strides {t.stride()}")
    if w_gate.stride() != w_up.stride():
        raise ValueError("moe_experts_grad: w_gate and w_up must share a layout")
    tokens, dim = x.shape
    k = ids.shape[1]
    experts, ffn = w_gate.shape[:2]
    dev, pairs = x.device, tokens * ids.shape[1]
    dx = torch.empty((tokens, dim), device=dev, dtype=x.dtype)
    dw = torch.empty(weights.shape, device=dev, dtype=weights.dtype)
    dwg = torch.empty(w_gate.shape, device=dev, dtype=w_gate.dtype)
    dwu = torch.empty(w_up.shape, device=dev, dtype=w_up.dtype)
    dwd = torch.empty(w_down.shape, device=dev, dtype=w_down.dtype)
    off, row_of, src = sort_pairs(ids, experts, 0, 0.0)
    nfb = triton.cdiv(ffn, _BF)
    dgate, dup, wact = (torch.empty((pairs, ffn), device=dev, dtype=torch.float32) for _ in range(3))
    dwp = torch.empty((pairs, nfb), device=dev, dtype=torch.float32)
    if pairs and ffn:
        _pair_kernel[(pairs, nfb)](
            x, ids, weights, g, w_gate, w_up, w_down, row_of, dgate, dup, wact, dwp, *ids.stride(),
            *weights.stride(), w_gate.stride(0), w_gate.stride(1), w_down.stride(0), w_down.stride(1),
            D=dim, F=ffn, K=k, NFB=nfb, BF=_BF, BD=_BD, num_warps=_WARPS,
        )  # fmt: skip
    if tokens:
        dx_bf, dx_bd = _DX_TILES.get(w_gate.element_size(), _DX_TILES[2])
        _dx_kernel[(tokens, max(triton.cdiv(dim, dx_bd), 1))](
            ids, row_of, dgate, dup, dwp, w_gate, w_up, dx, dw, *ids.stride(), w_gate.stride(0), w_gate.stride(1),
            D=dim, F=ffn, K=k, NFB=nfb, NFB_P2=triton.next_power_of_2(max(nfb, 1)), BD=dx_bd, BF=dx_bf,
            num_warps=_WARPS,
        )  # fmt: skip
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # f32: exact products, as the reference
    if dwg.numel():
        _wgrad(dgate, x, src, off, dwg, gather_a=False, prec=prec)
        _wgrad(dup, x, src, off, dwu, gather_a=False, prec=prec)
        _wgrad(g, wact, src, off, dwd, gather_a=True, prec=prec)
    return dx, dw, dwg, dwu, dwd
