"""KV-cache quantization kernels: `quantize` (int8 at 8 or 4 bits, fp8e4m3; per_token or per_channel scales) and
`dequantize`, with exactly the numerics of `r1c.ir.ops.quant`:
- scale = float32(amax / qmax): `div_rn` of two f32 values equals the reference's f64 divide rounded to f32.
- int8: q = rint(x / scale) with the divide in f64 (as the reference), rint by the 1.5*2^52 trick (the
  interpreter has no libdevice rint; compiled, the add/sub pair is exact and not reassociated).
- fp8e4m3: the reference rounds x/scale to f32, then to 3 mantissa bits (subnormals below 2^-6, ties to even).
  That rounding is done here in f32 arithmetic, so the final cast to float8_e4m3fn is exact (the interpreter's
  own fp8 cast does not round to nearest even nor keep subnormals).
- zero groups give scale 0 and q 0; a group with a NaN gets a NaN scale and q 0.
4-bit values are stored one per int8 in [-7, 7] as the IR defines them (no nibble packing here).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher
from r1c.ir.ops.quant import qmax
from r1c.ir.types import DType

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_Q = {DType.int8: torch.int8, DType.fp8e4m3: torch.float8_e4m3fn}
_TORCH_OUT = {DType.f32: torch.float32, DType.bf16: torch.bfloat16, DType.f16: torch.float16}
_MAX_RANK = 6  # dequantize broadcasts the scale by decomposing flat indices over at most this many dims
RINT_F64 = tl.constexpr(
    6755399441055744.0
)  # 1.5 * 2^52: x + c - c rounds |x| < 2^51 to the nearest integer, ties to even
RINT_F32 = tl.constexpr(12582912.0)  # 1.5 * 2^23, the same in f32 (|x| < 2^22)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class QuantKernelError(ValueError):
    """An input the quantization kernels do not handle (dtype, bits, device)."""


@triton.jit
def _group_scale(amax, nan_seen, QMAX: tl.constexpr):
    scale = tl.math.div_rn(amax, QMAX)
    return tl.where(nan_seen, float("nan"), scale)


@triton.jit
def _quant_values(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """x / scale clipped to +-QMAX and rounded, as the stored dtype; 0 where the scale is 0 or x/scale is NaN."""
    s = scale.to(tl.float64)
    y = tl.where(s > 0, x.to(tl.float64) / tl.where(s > 0, s, 1.0), 0.0)
    y = tl.where(y != y, 0.0, tl.minimum(tl.maximum(y, -QMAX), QMAX))
    if IS_FP8:
        y32 = y.to(tl.float32)
        e = ((y32.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(max(e,-6)-3), exact
        r = ((y32 / step + RINT_F32) - RINT_F32) * step  # y32/step is an exact power-of-two division
        codes = r.to(tl.float8e4nv)
    else:
        codes = ((y + RINT_F64) - RINT_F64).to(tl.int8)
    return codes


@triton.jit
def _amax_step(X, offs, m, amax, nan_seen, AXIS: tl.constexpr):
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    return tl.maximum(amax, tl.max(tl.abs(x), AXIS)), nan_seen | (tl.max((x != x).to(tl.int32), AXIS) > 0)


@triton.jit
def _amax_acc(X, offs, m, amax, nan_seen):
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    return tl.maximum(amax, tl.abs(x)), nan_seen | (x != x)


@triton.jit
def _quant_step(X, Q, offs, m, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    x = tl.load(X + offs, mask=m, other=0.0)
    tl.store(Q + offs, _quant_values(x, scale, QMAX, IS_FP8), mask=m)


@triton.jit
def _quant_rows_kernel(
    X, Q, S, R, F,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """per_token: x viewed as [R, F] (contiguous); one scale per row. Two passes over the row (the second reads
    what the first just brought into cache). The interpreter cannot take range() of a run-time scalar (numpy 2
    refuses int() of its 1-element arrays), so there the loops are `while`s."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_F)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * F + cols[None, :]
    amax = tl.zeros([BLOCK_R], tl.float32)
    nan_seen = tl.zeros([BLOCK_R], tl.int1)
    if INTERPRET:
        f0 = 0
        while f0 < F:
            m = row_ok[:, None] & (f0 + cols[None, :] < F)
            amax, nan_seen = _amax_step(X, base + f0, m, amax, nan_seen, 1)
            f0 += BLOCK_F
    else:
        for f0 in range(0, F, BLOCK_F):
            m = row_ok[:, None] & (f0 + cols[None, :] < F)
            amax, nan_seen = _amax_step(X, base + f0, m, amax, nan_seen, 1)
    scale = _group_scale(amax, nan_seen, QMAX)
    tl.store(S + rows, scale, mask=row_ok)
    if INTERPRET:
        f0 = 0
        while f0 < F:
            _quant_step(X, Q, base + f0, row_ok[:, None] & (f0 + cols[None, :] < F), scale[:, None], QMAX, IS_FP8)
            f0 += BLOCK_F
    else:
        for f0 in range(0, F, BLOCK_F):
            _quant_step(X, Q, base + f0, row_ok[:, None] & (f0 + cols[None, :] < F), scale[:, None], QMAX, IS_FP8)


@triton.jit
def _quant_cols_kernel(
    X, Q, S, T, C,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """per_channel: x viewed as [A, T, C] (contiguous); one scale per (a, c), over the T tokens. Program (a, c
    block) walks the tokens twice: amax, then quantize."""
    a = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    toks = tl.arange(0, BLOCK_T)
    col_ok = cols < C
    base = a.to(tl.int64) * T * C + toks[:, None] * C + cols[None, :]
    # elementwise running max over [BLOCK_T, BLOCK_C], reduced across tokens once after the loop: no barrier in it
    amax2 = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    nan2 = tl.zeros([BLOCK_T, BLOCK_C], tl.int1)
    if INTERPRET:
        t0 = 0
        while t0 < T:
            amax2, nan2 = _amax_acc(X, base + t0 * C, (t0 + toks[:, None] < T) & col_ok[None, :], amax2, nan2)
            t0 += BLOCK_T
    else:
        for t0 in range(0, T, BLOCK_T):
            amax2, nan2 = _amax_acc(X, base + t0 * C, (t0 + toks[:, None] < T) & col_ok[None, :], amax2, nan2)
    amax = tl.max(amax2, 0)
    nan_seen = tl.max(nan2.to(tl.int32), 0) > 0
    scale = _group_scale(amax, nan_seen, QMAX)
    tl.store(S + a * C + cols, scale, mask=col_ok)
    if INTERPRET:
        t0 = 0
        while t0 < T:
            m = (t0 + toks[:, None] < T) & col_ok[None, :]
            _quant_step(X, Q, base + t0 * C, m, scale[None, :], QMAX, IS_FP8)
            t0 += BLOCK_T
    else:
        for t0 in range(0, T, BLOCK_T):
            m = (t0 + toks[:, None] < T) & col_ok[None, :]
            _quant_step(X, Q, base + t0 * C, m, scale[None, :], QMAX, IS_FP8)


@triton.jit
def _dequant_kernel(
    Q, S, OUT, N,
    d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out = q * scale over q's flat index; the scale's index comes from q's 6-d coordinates and the scale's
    strides (0 on its broadcast dims)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: the launcher keeps N < 2^31
    ok = offs < N
    r = offs
    i5 = r % d5
    r = r // d5
    i4 = r % d4
    r = r // d4
    i3 = r % d3
    r = r // d3
    i2 = r % d2
    r = r // d2
    i1 = r % d1
    i0 = r // d1
    s_off = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4 + i5 * s5
    q = tl.load(Q + offs, mask=ok).to(tl.float32)  # no `other`: fp8 has no constant cast in the interpreter
    s = tl.load(S + s_off, mask=ok, other=0.0)
    tl.store(OUT + offs, (q * s).to(OUT.dtype.element_ty), mask=ok)


@launcher("quantize")
def quantize(x: torch.Tensor, *, dtype: DType, bits: int, token_axis: int, granularity: str):
    """(q, scale) of `quantize`: q as int8 or float8_e4m3fn with x's shape, scale f32 with 1 on reduced axes."""
    if x.dtype not in _FLOATS:
        raise QuantKernelError(f"quantize: x must be f16, bf16 or f32, got {x.dtype}")
    if dtype not in _TORCH_Q:
        raise QuantKernelError(f"quantize: dtype must be int8 or fp8e4m3, got {dtype}")
    top = qmax(dtype, bits)
    if x.dim() < 2:
        raise QuantKernelError(f"quantize: x needs a token axis and feature axes, got shape {tuple(x.shape)}")
    t = token_axis % x.dim()
    if t == x.dim() - 1:
        raise QuantKernelError("quantize: token_axis must not be the last axis (the features follow it)")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=_TORCH_Q[dtype], device=x.device)
    lead, feat = math.prod(x.shape[:t]), math.prod(x.shape[t + 1 :])
    is_fp8 = dtype == DType.fp8e4m3
    if granularity == "per_token":
        scale = torch.empty(x.shape[: t + 1] + (1,) * (x.dim() - t - 1), dtype=torch.float32, device=x.device)
        rows = lead * x.shape[t]
        block_f = min(triton.next_power_of_2(max(feat, 1)), 1024)
        block_r = max(1, 2048 // block_f)  # 8 elements a thread (8 warps): the f64 divide is register-hungry
        _quant_rows_kernel[(triton.cdiv(rows, block_r),)](
            x,
            q,
            scale,
            rows,
            feat,
            BLOCK_R=block_r,
            BLOCK_F=block_f,
            QMAX=top,
            IS_FP8=is_fp8,
            INTERPRET=INTERPRET,
            num_warps=8,
        )
    elif granularity == "per_channel":
        scale = torch.empty(x.shape[:t] + (1,) + x.shape[t + 1 :], dtype=torch.float32, device=x.device)
        block_c = min(triton.next_power_of_2(max(feat, 1)), 128)
        _quant_cols_kernel[(lead, triton.cdiv(feat, block_c))](
            x,
            q,
            scale,
            x.shape[t],
            feat,
            BLOCK_T=16,
            BLOCK_C=block_c,
            QMAX=top,
            IS_FP8=is_fp8,
            INTERPRET=INTERPRET,
            num_warps=8,
        )
    else:
        raise QuantKernelError(f"quantize: granularity must be per_token or per_channel, got {granularity!r}")
    return q, scale


@launcher("dequantize")
def dequantize(q: torch.Tensor, scale: torch.Tensor, *, dtype: DType, bits: int):
    """q * scale (scale broadcast over its group) as `dtype`; any rank up to 6."""
    if q.dtype not in _TORCH_Q.values():
        raise QuantKernelError(f"dequantize: q must be int8 or float8_e4m3fn, got {q.dtype}")
    if dtype not in _TORCH_OUT:
        raise QuantKernelError(f"dequantize: result dtype must be f32, bf16 or f16, got {dtype}")
    if scale.dtype != torch.float32 or scale.dim() != q.dim() or q.dim() > _MAX_RANK:
        raise QuantKernelError(
            f"dequantize: scale must be f32 with q's rank (at most {_MAX_RANK}), got {scale.dtype} "
            f"{tuple(scale.shape)} for q {tuple(q.shape)}"
        )
    q = q.contiguous()
    pad = _MAX_RANK - q.dim()
    shape = (1,) * pad + tuple(q.shape)
    sview = scale.expand(q.shape)  # stride 0 on the broadcast dims
    strides = (0,) * pad + tuple(sview.stride())
    out = torch.empty(q.shape, dtype=_TORCH_OUT[dtype], device=q.device)
    n = q.numel()
    if n >= 2**31:
        raise QuantKernelError(f"dequantize: {n} elements; the kernel indexes with int32 (fewer than 2^31)")
    block = 1024
    _dequant_kernel[(triton.cdiv(n, block),)](q, scale, out, n, *shape[1:], *strides, BLOCK=block, num_warps=8)
    return out
