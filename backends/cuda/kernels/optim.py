"""Training-step ops (ir/ops/optim.py): adamw_update, sgd_update, global_norm, clip_coef, lr_schedule and
balance_bias_update.

Every scalar (lr, step, norm, coefficient) is a 0-d tensor read and written on the device with tl.load/tl.store:
no launcher syncs with the host, so a training step can be captured in a CUDA graph. The math is float32.
- adamw_update / sgd_update: one elementwise kernel each, reading the (f32/f16/bf16) grad and writing new param and
  state tensors (out of place). The AdamW bias corrections 1 - beta**step come from the step on the device as
  -expm1(step * log(beta)) (a series near 0): 1 - beta**t cancels badly in f32 for beta2 = 0.999, and 1 - beta
  itself is passed from the host in f64 for the same reason.
- global_norm: one launch per operand writes per-program partial sums of squares into its slice of one f32
  buffer, then a single program sums the buffer in a fixed order and takes the sqrt (deterministic, no atomics).
- lr_schedule: the cosine shape 0.5 * (1 + cos(pi * progress)) is evaluated as sin(pi/2 * (1 - progress))**2 with
  1 - progress an exact integer ratio, accurate relative to the (small) value near the end of the decay.
- balance_bias_update: one program; the mean load is summed in f64 so sign(mean - load) decides ties like the
  reference.
Loop bounds are compile-time constants (Triton's interpreter cannot loop over a run-time scalar).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher

BLOCK = 1024  # elements per program of the elementwise kernels
NORM_PARTS = 1024  # at most about this many partial sums per global_norm operand (enough programs to fill a GPU)
SCHEDULES = {"constant": 0, "cosine": 1, "linear": 2}


def _empty_as(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) for x <= 0, with a small relative error also when x is near 0 (where 1 - exp(x) ~ -x)."""
    y = tl.maximum(x, -0.5)  # the series' range (also keeps x = -inf, from beta = 0, out of it)
    r = 1.0
    for k in tl.static_range(12, 1, -1):  # Horner form of expm1(y) / y = 1 + y/2 (1 + y/3 (1 + ...))
        r = 1.0 + y * r * (1.0 / k)
    return tl.where(x > -0.5, -y * r, 1.0 - tl.exp(x))


@triton.jit
def _sin(x):
    """sin(x) on [0, pi/2] by its Taylor series: accurate relative to the value near 0, same on GPU and interpreter."""
    x2 = x * x
    r = 1.0
    for k in tl.static_range(9, 0, -1):
        r = 1.0 - x2 * r * (1.0 / ((2 * k) * (2 * k + 1)))
    return x * r


@triton.jit
def _adamw_kernel(
    P, G, M, V, LR, STEP, PO, MO, VO, n, b1, b2, one_m_b1, one_m_b2, log_b1, log_b2, eps, wd,
    BLOCK: tl.constexpr,
):  # fmt: skip
    lr = tl.load(LR).to(tl.float32)
    t = tl.load(STEP).to(tl.float32)
    bc1 = _one_minus_exp(t * log_b1)
    bc2 = _one_minus_exp(t * log_b2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    # torch.optim.AdamW: decoupled decay, then the moments, then the bias-corrected step
    p = p * (1.0 - lr * wd)
    m = b1 * m + one_m_b1 * g
    v = b2 * v + one_m_b2 * g * g
    denom = tl.sqrt(v) / tl.sqrt(bc2) + eps
    p = p - (lr / bc1) * m / denom
    tl.store(PO + offs, p, mask=mask)
    tl.store(MO + offs, m, mask=mask)
    tl.store(VO + offs, v, mask=mask)


@launcher("adamw_update")
def adamw_update(param, grad, exp_avg, exp_avg_sq, lr, step, *, beta1, beta2, eps, weight_decay):
    n = param.numel()
    outs = tuple(_empty_as(t) for t in (param, exp_avg, exp_avg_sq))
    if n == 0:
        return outs

    def log(b: float) -> float:  # beta = 0: beta**t = 0 for t >= 1, i.e. exp(-inf)
        return math.log(b) if b > 0 else -math.inf

    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, lr, step, *outs, n, beta1, beta2, 1.0 - beta1, 1.0 - beta2,
        log(beta1), log(beta2), eps, weight_decay, BLOCK=BLOCK,
    )  # fmt: skip
    return outs


@triton.jit
def _sgd_kernel(P, G, B, LR, PO, BO, n, momentum, wd, HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    lr = tl.load(LR).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask, other=0.0)
    d = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) + wd * p  # torch adds weight decay to the grad
    buf = tl.load(B + offs, mask=mask, other=0.0)
    if HAS_MOMENTUM:
        d = momentum * buf + d
        buf = d
    tl.store(PO + offs, p - lr * d, mask=mask)
    tl.store(BO + offs, buf, mask=mask)  # copied unchanged without momentum: results never alias operands


@launcher("sgd_update")
def sgd_update(param, grad, momentum_buf, lr, *, momentum, weight_decay):
    n = param.numel()
    outs = _empty_as(param), _empty_as(momentum_buf)
    if n == 0:
        return outs
    _sgd_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, momentum_buf, lr, *outs, n, momentum, weight_decay,
        HAS_MOMENTUM=bool(momentum), BLOCK=BLOCK,
    )  # fmt: skip
    return outs


@triton.jit
def _sumsq_kernel(X, PART, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """PART[pid] = sum of squares of X's elements [pid * ITERS * BLOCK, (pid + 1) * ITERS * BLOCK)."""
    base = tl.program_id(0).to(tl.int64) * (ITERS * BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(PART + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _sqrt_sum_kernel(PART, OUT, N: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < N, other=0.0)
    tl.store(OUT, tl.sqrt(tl.sum(acc, 0)))


def _norm_split(n: int) -> tuple[int, int]:
    """(programs, blocks per program) for an operand of n elements: a power of two of blocks per program (few
    compiled variants) so that there are at most about NORM_PARTS partial sums; one program when n is 0."""
    blocks = max(1, triton.cdiv(n, BLOCK))
    iters = triton.next_power_of_2(triton.cdiv(blocks, NORM_PARTS))
    return triton.cdiv(blocks, iters), iters


@launcher("global_norm")
def global_norm(*xs: torch.Tensor) -> torch.Tensor:
    splits = [_norm_split(x.numel()) for x in xs]
    parts = torch.empty(sum(p for p, _ in splits), device=xs[0].device, dtype=torch.float32)
    start = 0
    for x, (progs, iters) in zip(xs, splits):
        _sumsq_kernel[(progs,)](x, parts[start : start + progs], x.numel(), ITERS=iters, BLOCK=BLOCK)
        start += progs
    out = torch.empty((), device=xs[0].device, dtype=torch.float32)
    _sqrt_sum_kernel[(1,)](parts, out, N=start, BLOCK=min(BLOCK, triton.next_power_of_2(start)))
    return out


@triton.jit
def _clip_coef_kernel(NORM, OUT, max_norm, eps):
    c = max_norm / (tl.load(NORM) + eps)
    tl.store(OUT, tl.where(c > 1.0, 1.0, c))  # min(1, c), keeping a NaN norm's NaN like the reference


@launcher("clip_coef")
def clip_coef(norm, *, max_norm, eps):
    out = torch.empty((), device=norm.device, dtype=torch.float32)
    _clip_coef_kernel[(1,)](norm, out, max_norm, eps)
    return out


@triton.jit
def _lr_kernel(STEP, OUT, lr, min_lr, span, warmup, warmup_div, decay_div, KIND: tl.constexpr):
    s = tl.load(STEP).to(tl.int64)
    warm = lr * (s.to(tl.float32) / warmup_div)
    # 1 - progress = max(0, total - s) / (total - warmup) (or 0 when total <= warmup), an exact integer ratio
    q = tl.maximum(decay_div + warmup - s, 0).to(tl.float32) / decay_div
    if KIND == 0:
        decayed = lr * 1.0
    elif KIND == 1:
        sq = _sin(1.5707963267948966 * q)
        decayed = min_lr + span * (sq * sq)
    else:
        decayed = min_lr + span * q
    tl.store(OUT, tl.where(s <= warmup, warm, decayed))


@launcher("lr_schedule")
def lr_schedule(step, *, lr, warmup, total, min_lr, kind):
    out = torch.empty((), device=step.device, dtype=torch.float32)
    _lr_kernel[(1,)](
        step, out, lr, min_lr, lr - min_lr, warmup, float(max(1, warmup)), max(1, total - warmup),
        KIND=SCHEDULES[kind],
    )  # fmt: skip
    return out


@triton.jit
def _bias_kernel(BIAS, LOAD, OUT, gamma, E: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float64)  # f64: the sign of mean - load must not flip on rounding
    for i in range(0, E, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(LOAD + offs, mask=offs < E, other=0.0).to(tl.float32).to(tl.float64)
    mean = tl.sum(acc, 0) / E
    for i in range(0, E, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < E
        d = mean - tl.load(LOAD + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d * 0.0)).to(tl.float32)  # d * 0: 0, or NaN for NaN
        tl.store(OUT + offs, tl.load(BIAS + offs, mask=mask, other=0.0) + gamma * sign, mask=mask)


@launcher("balance_bias_update")
def balance_bias_update(bias, load, *, gamma):
    e = bias.shape[0]
    out = _empty_as(bias)
    if e:
        _bias_kernel[(1,)](bias, load, out, gamma, E=e, BLOCK=min(BLOCK, triton.next_power_of_2(e)))
    return out
