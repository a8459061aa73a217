"""Row kernels: ops that work along one axis of independent rows (rmsnorm, softmax, reductions, rope, embedding,
topk). One program per row; the launchers see every operand as a 2-D [rows, n] view with unit column stride
(the runtime copies a view that cannot be one). Each op's math follows its numpy reference in `r1c.ir.ops`."""

from __future__ import annotations

from typing import Any

from r1c.backends.cuda.codegen.elementwise import header, named, pow2

_PRELUDE = "import triton\nimport triton.language as tl\n\n\n"

RMSNORM = """@triton.jit
def kernel(X, W, OUT, D, sx, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    # w * (x / sqrt(mean(x^2) + eps)), as the reference
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, 0) / D + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, (w * (x * r)).to(OUT.dtype.element_ty), mask=m)
"""

SOFTMAX = """@triton.jit
def kernel(X, OUT, D, sx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * sx + cols, mask=m, other=-float("inf")).to(tl.float32)
    mx = tl.max(x, 0)
    mx = tl.where(tl.abs(mx) <= 3.4028234663852886e38, mx, 0.0)  # a row of -inf gives nan, as the reference
    e = tl.where(m, tl.exp(x - mx), 0.0)
    tl.store(OUT + row * D + cols, (e / tl.sum(e, 0)).to(OUT.dtype.element_ty), mask=m)
"""

# MODE: 0 sum, 1 mean, 2 max, 3 min; the row is read in chunks so long rows fit. Loop bounds are compile-time
# constants here and in TOPK (Triton's interpreter cannot iterate range() over a run-time scalar).
REDUCE = """@triton.jit
def kernel(X, OUT, sx, D: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if MODE == 2:
        acc = tl.full((BLOCK,), -float("inf"), tl.float32)
    elif MODE == 3:
        acc = tl.full((BLOCK,), float("inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, D, BLOCK):
        m = cols + c0 < D
        x = tl.load(X + row * sx + c0 + cols, mask=m, other=0.0).to(tl.float32)
        if MODE == 2:
            acc = tl.maximum(acc, tl.where(m, x, -float("inf")))
        elif MODE == 3:
            acc = tl.minimum(acc, tl.where(m, x, float("inf")))
        else:
            acc += x
    if MODE == 2:
        r = tl.max(acc, 0)
    elif MODE == 3:
        r = tl.min(acc, 0)
    elif MODE == 1:
        r = tl.sum(acc, 0) / D
    else:
        r = tl.sum(acc, 0)
    tl.store(OUT + row, r.to(OUT.dtype.element_ty))
"""

# x [B, S, H, D] strided, positions [B, S]; inverse frequencies precomputed on the host from the reference's own
# formula (`rope_inv_freq`); angles in float32 like the reference (and HF), then scaled cos/sin.
ROPE = """@triton.jit
def kernel(X, POS, INV, OUT, S, H, D, sxb, sxs, sxh, sxd, spb, sps, scale,
           INTERLEAVED: tl.constexpr, HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    s = (pid // H) % S
    b = pid // (H * S)
    j = tl.arange(0, HALF)
    half = D // 2
    m = j < half
    base = X + b * sxb + s * sxs + h * sxh
    if INTERLEAVED:
        x1 = tl.load(base + (2 * j) * sxd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + (2 * j + 1) * sxd, mask=m, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(base + j * sxd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + (j + half) * sxd, mask=m, other=0.0).to(tl.float32)
    p = tl.load(POS + b * spb + s * sps).to(tl.float32)
    ang = p * tl.load(INV + j, mask=m, other=0.0)
    c = tl.cos(ang) * scale
    sn = tl.sin(ang) * scale
    out = OUT + pid * D
    tl.store(out + j, (x1 * c - x2 * sn).to(OUT.dtype.element_ty), mask=m)
    tl.store(out + half + j, (x2 * c + x1 * sn).to(OUT.dtype.element_ty), mask=m)
"""

EMBEDDING = """@triton.jit
def kernel(T, IDS, OUT, D, st, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    tok = tl.load(IDS + row).to(tl.int64)
    tl.store(OUT + row * D + cols, tl.load(T + tok * st + cols, mask=m), mask=m)
"""

# k rounds of (best remaining value, lowest index among ties); a `taken` mask rather than overwriting with -inf, so
# rows that hold -inf (masked routing groups) still give the reference's order.
TOPK = """@triton.jit
def kernel(X, VALS, IDX, D, sx, K: tl.constexpr, LARGEST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    taken = cols >= D
    for i in range(K):
        if LARGEST:
            best = tl.max(tl.where(taken, -float("inf"), x), 0)
        else:
            best = tl.min(tl.where(taken, float("inf"), x), 0)
        pick = tl.min(tl.where((~taken) & (x == best), cols, BLOCK), 0)
        tl.store(VALS + row * K + i, best.to(VALS.dtype.element_ty))
        tl.store(IDX + row * K + i, pick.to(tl.int32))
        taken = taken | (cols == pick)
"""

SOURCES = {"rmsnorm": RMSNORM, "softmax": SOFTMAX, "reduce": REDUCE, "rope": ROPE, "embedding": EMBEDDING, "topk": TOPK}
KIND_OF_OP = {
    "rmsnorm": "rmsnorm",
    "softmax": "softmax",
    "reduce_sum": "reduce",
    "reduce_mean": "reduce",
    "reduce_max": "reduce",
    "reduce_min": "reduce",
    "rope": "rope",
    "embedding": "embedding",
    "topk": "topk",
}
REDUCE_MODE = {"reduce_sum": 0, "reduce_mean": 1, "reduce_max": 2, "reduce_min": 3}
MAX_ROW = 1 << 16  # single-block rows (rmsnorm, softmax, topk): longer ones are a clear error


def source(kind_: str, uses: list[str]) -> str:
    return named(header(f"row kernel '{kind_}'", uses) + _PRELUDE + SOURCES[kind_], f"row_{kind_}")


def check_row(op: str, n: int) -> None:
    if n > MAX_ROW:
        raise ValueError(f"cuda: {op} over rows of {n} elements is not supported (at most {MAX_ROW})")


def rmsnorm(module: Any, x: Any, w: Any, out: Any, eps: float) -> None:
    rows, d = x.shape
    check_row("rmsnorm", d)
    module.kernel[(rows,)](x, w, out, d, x.stride(0), eps, BLOCK=pow2(d))


def softmax(module: Any, x: Any, out: Any) -> None:
    rows, d = x.shape
    check_row("softmax", d)
    module.kernel[(rows,)](x, out, d, x.stride(0), BLOCK=pow2(d))


def reduce(module: Any, x: Any, out: Any, op: str) -> None:
    rows, d = x.shape
    module.kernel[(rows,)](x, out, x.stride(0), D=d, MODE=REDUCE_MODE[op], BLOCK=min(pow2(d), 1024))


def rope(module: Any, x: Any, pos: Any, inv: Any, out: Any, scale: float, interleaved: bool) -> None:
    b, s, h, d = x.shape
    module.kernel[(b * s * h,)](
        x, pos, inv, out, s, h, d, *x.stride(), *pos.stride(), scale, INTERLEAVED=interleaved, HALF=pow2(d // 2)
    )


def embedding(module: Any, table: Any, ids: Any, out: Any) -> None:
    d = table.shape[1]
    block = min(pow2(d), 1024)
    module.kernel[(ids.numel(), -(-d // block))](table, ids, out, d, table.stride(0), BLOCK=block)


def topk(module: Any, x: Any, vals: Any, idx: Any, k: int, largest: bool) -> None:
    rows, d = x.shape
    check_row("topk", d)
    module.kernel[(rows,)](x, vals, idx, d, x.stride(0), K=k, LARGEST=largest, BLOCK=pow2(d))
