"""`cross_entropy` (mean NLL over kept rows) and `cross_entropy_grad` (g * (softmax - one_hot) / #kept).

The vocabulary can be large (100k+), so one program per row streams the row in BLOCK_V chunks with an online
max / sum-exp (one exp per logit) instead of holding it in registers. Forward: the row programs write each row's
loss (0 on ignored rows) and kept flag, then one program sums them in a fixed order: the mean is deterministic (no
atomics). Backward: one program counts the kept rows and writes g / max(#kept, 1) on the device (g stays a device
scalar: no host sync), then the row programs read each row twice: the max / sum-exp, then the gradient.
Shapes are compile-time constants (static loop bounds; Triton's interpreter cannot iterate range() over a run-time
scalar). Row offsets are int64: N * V passes 2^31 at DeepSeek vocabularies.

A label outside [0, V) that is not ignore_index is never read out of bounds: its row's loss (so the mean) and its
gradient row are NaN; with TRITON_DEBUG=1 a device assert also fires.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher

_BLOCK_V = 4096  # vocab chunk per loop step; 16 f32 per thread at 8 warps
_BLOCK_N = 1024  # rows per step of the single-program reductions


@triton.jit
def _row_stats(row, V: tl.constexpr, BV: tl.constexpr):
    """(max, sum exp(x - max)) of one row, online over BV chunks."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = tl.load(row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    return m, s


@triton.jit
def _label(LABELS, r, IGNORE, V: tl.constexpr):
    """(label clamped in range, kept, kept with an in-range label)."""
    label = tl.load(LABELS + r).to(tl.int64)
    keep = label != IGNORE
    ok = (label >= 0) & (label < V)
    tl.device_assert(ok | (label == IGNORE), "cross_entropy: label out of [0, V) and not ignore_index")
    return tl.where(ok, label, 0), keep, ok


@triton.jit
def _loss_rows_kernel(LOGITS, LABELS, LOSS, KEPT, stride, IGNORE, V: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = LOGITS + r * stride
    m, s = _row_stats(row, V, BV)
    label, keep, ok = _label(LABELS, r, IGNORE, V)
    loss = m + tl.log(s) - tl.load(row + label).to(tl.float32)
    tl.store(LOSS + r, tl.where(keep, tl.where(ok, loss, float("nan")), 0.0))
    tl.store(KEPT + r, keep.to(tl.float32))


@triton.jit
def _mean_kernel(LOSS, KEPT, OUT, N: tl.constexpr, BN: tl.constexpr):
    total = tl.zeros((BN,), tl.float32)
    count = tl.zeros((BN,), tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        total += tl.load(LOSS + n, mask=n < N, other=0.0)
        count += tl.load(KEPT + n, mask=n < N, other=0.0)
    tl.store(OUT, tl.sum(total, 0) / tl.maximum(tl.sum(count, 0), 1.0))  # no kept row: 0 / 1


@triton.jit
def _scale_kernel(LABELS, G, SCALE, IGNORE, N: tl.constexpr, BN: tl.constexpr):
    count = tl.zeros((BN,), tl.int32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        label = tl.load(LABELS + n, mask=n < N, other=IGNORE)
        count += (label != IGNORE).to(tl.int32)
    kept = tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
    tl.store(SCALE, tl.load(G).to(tl.float32) / kept)


@triton.jit
def _grad_rows_kernel(
    LOGITS, LABELS, SCALE, DX, stride, IGNORE, V: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    row = LOGITS + r * stride
    m, s = _row_stats(row, V, BV)
    label, keep, ok = _label(LABELS, r, IGNORE, V)
    coef = tl.where(keep, tl.where(ok, tl.load(SCALE), float("nan")), 0.0)
    inv = coef / s  # softmax and the 1/#kept * g factor in one multiply
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = tl.load(row + v, mask=v < V, other=0.0).to(tl.float32)
        d = tl.exp(x - m) * inv - tl.where(v == label, coef, 0.0)
        tl.store(DX + r * V + v, d.to(DX.dtype.element_ty), mask=v < V)


def _check(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or logits.stride(-1) != 1:
        raise ValueError(
            f"{name}: needs row-major logits [N, V] and labels [N], got {tuple(logits.shape)} strides "
            f"{logits.stride()}, {tuple(labels.shape)}"
        )


def _block_v(v: int) -> int:
    return min(_BLOCK_V, triton.next_power_of_2(max(v, 1)))


@launcher("cross_entropy")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    _check("cross_entropy", logits, labels)
    n, v = logits.shape
    out = torch.empty((), device=logits.device, dtype=torch.float32)
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    kept = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n and v:
        _loss_rows_kernel[(n,)](
            logits, labels, loss, kept, logits.stride(0), ignore_index, V=v, BV=_block_v(v), num_warps=8
        )
    elif n:  # V == 0: no distribution to score; every kept row is an error, as an out-of-range label
        raise ValueError("cross_entropy: empty vocabulary (V = 0)")
    _mean_kernel[(1,)](loss, kept, out, N=n, BN=_BLOCK_N)
    return out


@launcher("cross_entropy_grad")
def cross_entropy_grad(
    logits: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    _check("cross_entropy_grad", logits, labels)
    n, v = logits.shape
    dx = torch.empty((n, v), device=logits.device, dtype=logits.dtype)
    if n == 0 or v == 0:
        return dx
    scale = torch.empty((), device=logits.device, dtype=torch.float32)
    _scale_kernel[(1,)](labels, g, scale, ignore_index, N=n, BN=_BLOCK_N)
    _grad_rows_kernel[(n,)](logits, labels, scale, dx, logits.stride(0), ignore_index, V=v, BV=_block_v(v), num_warps=8)
    return dx
