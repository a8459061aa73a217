"""Backward of the row ops: `rmsnorm_grad` (dx, dw of rmsnorm) and `rope_grad` (the transpose of rope).

rmsnorm_grad: x and g are viewed as [R, D] rows. _rmsnorm_bwd_kernel takes a tile of rows at a time (each row in one
  block, like the forward) and writes dx = r * (g w - xhat * mean(g w xhat)) with r = 1/sqrt(mean(x^2) + eps) and
  xhat = x r (the next tile's loads are issued before this one's math); each program also sums g * xhat over its
  rows into its own row of a float32 partial buffer [G, D].
  _sum_rows_kernel then adds the G partial rows per column block: dw without atomics, so it is deterministic.
rope_grad: the forward writes [x1 c - x2 s | x2 c + x1 s] (halves of the result; x1, x2 are the halves of x, or its
  even and odd elements when interleaved), so with g = [g1 | g2] the cotangent is dx1 = g1 c + g2 s,
  dx2 = g2 c - g1 s, written back to halves or to (even, odd) pairs. The inverse frequencies come from the
  reference's own formula (`rope_inv_freq`, YaRN included), computed on the host once per (dim, attrs, device) and
  kept; angles in float32 as in the forward kernel. One program per (batch, position, block of heads): cos/sin once.
Row loops have compile-time bounds (Triton's interpreter cannot iterate range() over a run-time scalar).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher
from r1c.ir.ops.nn import rope_inv_freq

MAX_ROW = 1 << 16  # rows are one block each, as in the forward (backends/cuda/codegen/rows.py)
RMS_PROGRAMS = 1024  # row programs at most: each writes one float32 row of partial dw sums


def _rms_warps(bd: int) -> int:
    # Two row tiles in flight (the prefetch) spill at 4 warps for rows of 8192 (seen on an H200).
    return 4 if bd < 4096 else 8 if bd < 16384 else 16


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@triton.jit
def _rmsnorm_bwd_kernel(
    X, W, G, DX, PART, R, D, eps, RPP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros((BD,), tl.float32)
    rows_next = pid * RPP + tl.arange(0, BR)
    m_next = (rows_next < R)[:, None] & cm[None, :]
    x_next = tl.load(X + rows_next[:, None] * D + cols[None, :], mask=m_next, other=0.0)
    g_next = tl.load(G + rows_next[:, None] * D + cols[None, :], mask=m_next, other=0.0)
    for r0 in range(0, RPP, BR):  # RPP is a multiple of BR; the next tile's loads are issued before this one's math
        off = rows_next[:, None] * D + cols[None, :]
        m = m_next
        x = x_next.to(tl.float32)
        g = g_next.to(tl.float32)
        rows_next += BR
        m_next = (rows_next < R)[:, None] & cm[None, :] & (r0 + BR < RPP)
        x_next = tl.load(X + rows_next[:, None] * D + cols[None, :], mask=m_next, other=0.0)
        g_next = tl.load(G + rows_next[:, None] * D + cols[None, :], mask=m_next, other=0.0)
        r = 1.0 / tl.sqrt_rn(tl.sum(x * x, 1) / D + eps)  # as the forward
        xhat = x * r[:, None]
        dxhat = g * w[None, :]
        proj = tl.sum(dxhat * xhat, 1) / D
        tl.store(DX + off, (r[:, None] * (dxhat - xhat * proj[:, None])).to(DX.dtype.element_ty), mask=m)
        dw += tl.sum(g * xhat, 0)
    tl.store(PART + pid * D + cols, dw, mask=cm)


@triton.jit
def _sum_rows_kernel(PART, OUT, D, G: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0) * BD + tl.arange(0, BD)
    cm = cols < D
    acc = tl.zeros((BG, BD), tl.float32)
    for g0 in range(0, G, BG):
        rows = g0 + tl.arange(0, BG)
        acc += tl.load(PART + rows[:, None] * D + cols[None, :], mask=(rows < G)[:, None] & cm[None, :], other=0.0)
    tl.store(OUT + cols, tl.sum(acc, 0).to(OUT.dtype.element_ty), mask=cm)


@launcher("rmsnorm_grad")
def rmsnorm_grad(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("w", w), ("g", g)):
        if not t.is_contiguous():
            raise ValueError(f"rmsnorm_grad: {name} must be contiguous, got strides {t.stride()}")
    d = x.shape[-1]
    if d > MAX_ROW:
        raise ValueError(f"cuda: rmsnorm_grad over rows of {d} elements is not supported (at most {MAX_ROW})")
    rows = x.numel() // d if d else 0
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    if d == 0:
        return dx, dw
    bd = _p2(d)
    br = max(1, min(16, 4096 // bd, _p2(rows)))
    # At most ~RMS_PROGRAMS programs, each a whole number of row tiles: the partial buffer stays small.
    rpp = max(br, triton.cdiv(triton.cdiv(max(rows, 1), RMS_PROGRAMS), br) * br)
    grid = triton.cdiv(max(rows, 1), rpp)
    part = torch.empty((grid, d), device=x.device, dtype=torch.float32)
    _rmsnorm_bwd_kernel[(grid,)](x, w, g, dx, part, rows, d, eps, RPP=rpp, BR=br, BD=bd, num_warps=_rms_warps(bd))
    bd2 = min(bd, 64)  # narrow column blocks: enough programs to sum the partial rows for small D too
    bg = max(1, min(_p2(grid), 4096 // bd2))
    _sum_rows_kernel[(triton.cdiv(d, bd2),)](part, dw, d, G=grid, BG=bg, BD=bd2)
    return dx, dw


@triton.jit
def _rope_bwd_kernel(
    G, POS, INV, DX, H, D, scale, HB: tl.constexpr, INTERLEAVED: tl.constexpr, BH: tl.constexpr,
    HALF: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    bs = pid // HB  # (batch, position), flattened: positions is [B, S] contiguous
    h = pid % HB * BH + tl.arange(0, BH)
    j = tl.arange(0, HALF)
    half = D // 2
    jm = j < half
    m = (h < H)[:, None] & jm[None, :]
    ang = tl.load(POS + bs).to(tl.float32) * tl.load(INV + j, mask=jm, other=0.0)
    c = (tl.cos(ang) * scale)[None, :]
    sn = (tl.sin(ang) * scale)[None, :]
    row = (bs * H + h[:, None]) * D
    g1 = tl.load(G + row + j[None, :], mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(G + row + half + j[None, :], mask=m, other=0.0).to(tl.float32)
    dx1 = (g1 * c + g2 * sn).to(DX.dtype.element_ty)
    dx2 = (g2 * c - g1 * sn).to(DX.dtype.element_ty)
    if INTERLEAVED:  # pairs (dx1[j], dx2[j]) at 2j, 2j+1: interleaved in registers, one contiguous store
        k = tl.arange(0, 2 * HALF)
        tl.store(DX + row + k[None, :], tl.interleave(dx1, dx2), mask=(h < H)[:, None] & (k < D)[None, :])
    else:
        tl.store(DX + row + j[None, :], dx1, mask=m)
        tl.store(DX + row + half + j[None, :], dx2, mask=m)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, float]] = {}


def rope_table(dim: int, attrs: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    """(float32 inverse frequencies on `device`, cos/sin scale), computed on the host once per (dim, attrs)."""
    key = (dim, tuple(sorted(attrs.items())), str(device))
    if key not in _ROPE_TABLES:
        inv, scale = rope_inv_freq(dim, attrs)
        _ROPE_TABLES[key] = (torch.from_numpy(inv.astype(np.float32)).to(device), float(scale))
    return _ROPE_TABLES[key]


@launcher("rope_grad")
def rope_grad(g: torch.Tensor, positions: torch.Tensor, **attrs) -> torch.Tensor:
    for name, t in (("g", g), ("positions", positions)):
        if not t.is_contiguous():
            raise ValueError(f"rope_grad: {name} must be contiguous, got strides {t.stride()}")
    b, s, h, d = g.shape
    dx = torch.empty_like(g)
    if g.numel() == 0:
        return dx
    inv, scale = rope_table(d, attrs, g.device)
    half = _p2(d // 2)
    bh = max(1, min(_p2(h), 2048 // half))
    hb = triton.cdiv(h, bh)
    _rope_bwd_kernel[(b * s * hb,)](
        g, positions, inv, dx, h, d, scale, HB=hb, INTERLEAVED=bool(attrs["interleaved"]), BH=bh, HALF=half
    )  # fmt: skip
    return dx
