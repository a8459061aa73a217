"""Attention over a quantized KV cache (`attention_kvq`), split-K (flash-decoding) for the decode case.

One program per (batch * kv head, tile of query rows, split of the keys). The rows of a kv head are its G grouped
query heads times Sq queries (row r = query r // G of head r % G), so a GQA group shares each K/V tile it reads.
Each program streams its int8/fp8 K/V chunk, keeps an online softmax in fp32 (log2 domain, the softmax scale
folded into the exponent) and writes a partial (max, sum, acc); `_merge_kernel` combines the splits. One split
writes the output directly.

Dequantization stays in registers, with each scale applied where it costs least (the scales' shapes say which):
a per-channel key scale is folded into q once, a per-token key scale multiplies the score column, a per-token
value scale multiplies the probabilities before P V, a per-channel value scale multiplies the accumulator at the
end; a scale that varies along both tokens and channels dequantizes the tile elementwise. One query row
(MHA decode) uses CUDA-core dot products, its tile loads pipelined through shared memory (cp.async) and int8 codes
converted by _I8_TO_F32; a 16-row tensor-core tile (15/16 padding) measured 1.3-2x slower. More rows use tl.dot
in q's dtype (K/V codes convert exactly: int8 and e4m3 values are representable in f16 and bf16).

Prefill shapes run on the same kernel (tiles of 64 rows, causal upper bound per tile) without the finer
triangular skipping of flash_attention.py. 4-bit caches are read as the IR stores them, one value per int8.
Not supported (clear errors): block maps (tiled_attention form) and block-sparse layouts.
Importing this module registers the launchers of quantize, dequantize, attention_kvq and mla_attention_kvq.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
CODES = (torch.int8, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256
MAX_ROWS_PER_TILE = 64


class DecodeKernelError(ValueError):
    """An input the quantized-KV attention kernels do not handle (dtype, bits, head dim, mask form)."""


def scale_mode(scale: torch.Tensor, tok_axis: int, ch_axis: int) -> tuple[bool, bool]:
    """(per-token, elementwise) for a scale: whether it varies along the tokens, and along tokens and channels.
    Neither: it is constant per (batch, head) or varies by channel only, and is applied by channel."""
    tok, ch = scale.shape[tok_axis] > 1, scale.shape[ch_axis] > 1
    return tok and not ch, tok and ch


def check_codes(op: str, what: str, t: torch.Tensor, bits: int) -> None:
    if t.dtype not in CODES:
        raise DecodeKernelError(f"{op}: {what} must be int8 or float8_e4m3fn codes, got {t.dtype}")
    if bits not in (8, 4) or (bits == 4 and t.dtype != torch.int8):
        raise DecodeKernelError(f"{op}: bits={bits} with {t.dtype} {what} is not supported (int8 8/4, fp8 8)")


def check_scale(op: str, what: str, s: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The scale expanded to the codes' shape (stride 0 on its broadcast dims), checked to be f32 and to broadcast."""
    if s.dtype != torch.float32 or s.dim() != codes.dim():
        raise DecodeKernelError(f"{op}: {what} scale must be f32 of rank {codes.dim()}, got {s.dtype} {tuple(s.shape)}")
    try:
        return s.expand(codes.shape)
    except RuntimeError:
        msg = f"{op}: {what} scale {tuple(s.shape)} does not broadcast to {tuple(codes.shape)}"
        raise DecodeKernelError(msg) from None


def pick_splits(programs: int, skv: int, device: torch.device, min_keys: int = 256) -> int:
    """Splits of the keys so that programs * splits fills one wave of about 4 resident programs per SM (a second,
    partial wave and the merge cost more than longer programs: bench/decode_cuda_notes.md), each split >= min_keys
    keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(4 * sms // max(programs, 1), triton.cdiv(skv, min_keys)))


def split_chunk(skv: int, splits: int, block_n: int) -> tuple[int, int]:
    """(keys per split, a multiple of block_n; the number of non-empty splits)."""
    chunk = triton.cdiv(triton.cdiv(max(skv, 1), splits), block_n) * block_n
    return chunk, triton.cdiv(max(skv, 1), chunk)


@triton.jit
def softmax_step(s, m_i, l_i, kn, qpos, hi, WINDOW, SINKS, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Mask the log2-domain scores s [M, N] of keys kn, update (m_i, l_i); returns (p, alpha, m_new, l_new)."""
    vis = (kn < hi)[None, :]
    if CAUSAL:
        vis = vis & (kn[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            vis = vis & ((kn[None, :] > qpos[:, None] - WINDOW) | (kn[None, :] < SINKS))
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: exp2(-inf) = 0, not NaN
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def load_codes(ptrs, nmask, offs_d, D: tl.constexpr):
    """A [N, BLOCK_D] tile of codes, masked by key, and by dim only where D is padded (keeps 16-byte loads): a
    padded dim must not read past the row (the last row's would leave the tensor). Masked lanes are undefined."""
    if D == offs_d.shape[0]:
        t = tl.load(ptrs, mask=nmask[:, None])
    else:
        t = tl.load(ptrs, mask=nmask[:, None] & (offs_d[None, :] < D))
    return t


# int8 code -> f32 in two full-rate instructions instead of a quarter-rate I2F: flip the sign bit (c + 128 as an
# unsigned byte, four codes at once), place the byte in the mantissa of 2^23 (prmt) and subtract 2^23 + 128 (exact).
_I8_TO_F32 = tl.constexpr("""
{
.reg .b32 u;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, 0x4B000000, 0x7650;
prmt.b32 $1, u, 0x4B000000, 0x7651;
prmt.b32 $2, u, 0x4B000000, 0x7652;
prmt.b32 $3, u, 0x4B000000, 0x7653;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}
""")


@triton.jit
def codes_f32(c, ASM: tl.constexpr):
    """Codes as f32; int8 through _I8_TO_F32 when compiled for the GPU (ASM; the interpreter runs no PTX)."""
    if ASM and c.dtype == tl.int8:
        return tl.inline_asm_elementwise(_I8_TO_F32, "=r,=r,=r,=r,r", [c], dtype=tl.float32, is_pure=True, pack=4)
    return c.to(tl.float32)


@triton.jit
def _kvq_tile(
    acc, m_i, l_i, q, n0, k_base, v_base, ks_base, vs_base, sk_n, sv_n, sks_n, sks_d, svs_n, svs_d,
    offs_n, offs_dk, offs_dv, qpos, hi, WINDOW, SINKS, qk_scale,
    K_TOK: tl.constexpr, K_FULL: tl.constexpr, V_TOK: tl.constexpr, V_FULL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
):  # fmt: skip
    """Several query rows: scores and P V on the tensor cores, in q's dtype."""
    kn = n0 + offs_n
    nmask = kn < hi
    k = load_codes(k_base + kn[:, None] * sk_n + offs_dk[None, :], nmask, offs_dk, DK)  # no `other`: fp8 (below)
    if DK < offs_dk.shape[0]:  # padded dims: q is 0 there, but 0 * NaN (undefined fp8 bits) is NaN
        k = tl.where(offs_dk[None, :] < DK, k.to(q.dtype), 0.0)
    if K_FULL:
        k = k.to(tl.float32) * tl.load(
            ks_base + kn[:, None] * sks_n + offs_dk[None, :] * sks_d,
            mask=nmask[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC)
    if K_TOK:
        s = s * tl.load(ks_base + kn * sks_n, mask=nmask, other=0.0)[None, :]
    # masked keys hold undefined codes (the interpreter cannot cast `other` to fp8); softmax_step drops them
    p, alpha, m_i, l_i = softmax_step(s * qk_scale, m_i, l_i, kn, qpos, hi, WINDOW, SINKS, CAUSAL, HAS_WINDOW)
    v = load_codes(v_base + kn[:, None] * sv_n + offs_dv[None, :], nmask, offs_dv, DV)
    if V_FULL:
        v = v.to(tl.float32) * tl.load(
            vs_base + kn[:, None] * svs_n + offs_dv[None, :] * svs_d,
            mask=nmask[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
    v = tl.where(nmask[:, None], v.to(q.dtype), 0.0)  # p = 0 there, but 0 * NaN is NaN (padded dims: not stored)
    if V_TOK:
        p = p * tl.load(vs_base + kn * svs_n, mask=nmask, other=0.0)[None, :]
    return tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PREC), m_i, l_i


@triton.jit
def _kvq_tile_vec(
    acc, m_s, l_s, q, n0, k_base, v_base, ks_base, vs_base, sk_n, sv_n, sks_n, sks_d, svs_n, svs_d,
    offs_n, offs_dk, offs_dv, qpos, hi, WINDOW, SINKS, qk_scale,
    K_TOK: tl.constexpr, K_FULL: tl.constexpr, V_TOK: tl.constexpr, V_FULL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """One query row: an online softmax per key slot n (keys n, n + BLOCK_N, ...), with acc [BLOCK_N, DV], so the
    loop has no reduction across warps; the slots are merged once after it (merge_slots)."""
    kn = n0 + offs_n
    nmask = kn < hi
    k = codes_f32(load_codes(k_base + kn[:, None] * sk_n + offs_dk[None, :], nmask, offs_dk, DK), ASM)
    if DK < offs_dk.shape[0]:  # padded dims: q is 0 there, but 0 * NaN (undefined fp8 bits) is NaN
        k = tl.where(offs_dk[None, :] < DK, k, 0.0)
    if K_FULL:
        k = k * tl.load(
            ks_base + kn[:, None] * sks_n + offs_dk[None, :] * sks_d,
            mask=nmask[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )
    s = tl.sum(k * q[None, :], 1)
    if K_TOK:
        s = s * tl.load(ks_base + kn * sks_n, mask=nmask, other=0.0)
    vis = nmask
    if CAUSAL:
        vis = vis & (kn <= qpos)
        if HAS_WINDOW:
            vis = vis & ((kn > qpos - WINDOW) | (kn < SINKS))
    s = tl.where(vis, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_s, s)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use)
    alpha = tl.math.exp2(m_s - m_use)
    l_s = l_s * alpha + p
    v = codes_f32(load_codes(v_base + kn[:, None] * sv_n + offs_dv[None, :], nmask, offs_dv, DV), ASM)
    if V_FULL:
        v = v * tl.load(
            vs_base + kn[:, None] * svs_n + offs_dv[None, :] * svs_d,
            mask=nmask[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
    v = tl.where(nmask[:, None], v, 0.0)  # p = 0 there, but 0 * NaN (an undefined fp8 code) is NaN
    if V_TOK:
        p = p * tl.load(vs_base + kn * svs_n, mask=nmask, other=0.0)
    return acc * alpha[:, None] + p[:, None] * v, m_new, l_s


@triton.jit
def merge_slots(acc, m_s, l_s):
    """The per-slot softmax states of _kvq_tile_vec as one row: (acc [1, DV], m [1], l [1])."""
    m = tl.max(m_s, 0)
    w = tl.math.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))
    return (
        tl.sum(w[:, None] * acc, 0)[None, :],
        tl.full([1], m, tl.float32),
        tl.full([1], tl.sum(w * l_s, 0), tl.float32),
    )


@triton.jit
def _kvq_kernel(
    Q, K, KS, V, VS, OUT, MP, LP, AP, STARTS,
    sqb, sqh, sqs, skb, skh, skn, sksb, sksh, sksn, sksd, svb, svh, svn, svsb, svsh, svsn, svsd, sob, soh, sos,
    HKV, SQ, SKV, CHUNK, NSPLIT, WINDOW, SINKS, qk_scale,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_TOK: tl.constexpr, K_FULL: tl.constexpr, V_TOK: tl.constexpr, V_FULL: tl.constexpr, VEC: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
    INTERPRET: tl.constexpr, STAGES: tl.constexpr, INT8_ASM: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    if HAS_STARTS:  # a KV cache: row b holds STARTS[b] earlier tokens plus this step's SQ, in SKV slots
        SKV = tl.minimum(tl.load(STARTS + b) + SQ, SKV)
    nrows = G * SQ
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < nrows
    i = rows // G
    h = hk * G + rows % G
    qpos = i + SKV - SQ  # the queries are the newest tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqs + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0).to(tl.float32)  # fmt: skip
    ks_base = KS + b * sksb + hk * sksh
    vs_base = VS + b * svsb + hk * svsh
    if not K_TOK and not K_FULL:  # per-channel key scale: q . (k * s) = (q * s) . k
        q = q * tl.load(ks_base + offs_dk * sksd, mask=offs_dk < DK, other=0.0)[None, :]
    if not VEC:
        q = q.to(Q.dtype.element_ty)

    start = split * CHUNK
    hi = tl.minimum(start + CHUNK, SKV)
    lo = start
    if CAUSAL:  # keys after the tile's last query are invisible to all its rows
        last_i = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, SQ - 1)
        hi = tl.minimum(hi, SKV - SQ + last_i + 1)
        if HAS_WINDOW:  # without sinks, keys before the first query's window are invisible too
            first = SKV - SQ + (tile * BLOCK_M) // G - WINDOW + 1
            lo = tl.where(SINKS > 0, start, tl.maximum(start, first))

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if VEC:  # one row: per-slot softmax states, merged after the loop
        qv = tl.sum(q, 0)  # [BLOCK_DK]
        m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_N], tl.float32)
        acc_s = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        qp = SKV - SQ  # the only row's position (SQ = 1)
        if INTERPRET:  # the interpreter cannot take range() of a run-time scalar (numpy 2 refuses int() of it)
            n0 = lo
            while n0 < hi:
                acc_s, m_s, l_s = _kvq_tile_vec(acc_s, m_s, l_s, qv, n0, k_base, v_base, ks_base, vs_base, skn, svn,
                                                sksn, sksd, svsn, svsd, offs_n, offs_dk, offs_dv, qp, hi, WINDOW,
                                                SINKS, qk_scale, K_TOK, K_FULL, V_TOK, V_FULL, CAUSAL, HAS_WINDOW,
                                                DK, DV, False)  # fmt: skip
                n0 += BLOCK_N
        else:  # an explicit num_stages makes Triton pipeline these loads (cp.async into shared memory), not only dots'
            for n0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
                acc_s, m_s, l_s = _kvq_tile_vec(acc_s, m_s, l_s, qv, n0, k_base, v_base, ks_base, vs_base, skn, svn,
                                                sksn, sksd, svsn, svsd, offs_n, offs_dk, offs_dv, qp, hi, WINDOW,
                                                SINKS, qk_scale, K_TOK, K_FULL, V_TOK, V_FULL, CAUSAL, HAS_WINDOW,
                                                DK, DV, INT8_ASM)  # fmt: skip
        acc, m_i, l_i = merge_slots(acc_s, m_s, l_s)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        if INTERPRET:
            n0 = lo
            while n0 < hi:
                acc, m_i, l_i = _kvq_tile(acc, m_i, l_i, q, n0, k_base, v_base, ks_base, vs_base, skn, svn, sksn,
                                          sksd, svsn, svsd, offs_n, offs_dk, offs_dv, qpos, hi, WINDOW, SINKS,
                                          qk_scale, K_TOK, K_FULL, V_TOK, V_FULL, CAUSAL, HAS_WINDOW,
                                          PREC, DK, DV)  # fmt: skip
                n0 += BLOCK_N
        else:
            for n0 in range(lo, hi, BLOCK_N):
                acc, m_i, l_i = _kvq_tile(acc, m_i, l_i, q, n0, k_base, v_base, ks_base, vs_base, skn, svn, sksn,
                                          sksd, svsn, svsd, offs_n, offs_dk, offs_dv, qpos, hi, WINDOW, SINKS,
                                          qk_scale, K_TOK, K_FULL, V_TOK, V_FULL, CAUSAL, HAS_WINDOW,
                                          PREC, DK, DV)  # fmt: skip
    if not V_TOK and not V_FULL:  # per-channel value scale: sum_j p_j v_jd s_d = s_d * sum_j p_j v_jd
        acc = acc * tl.load(vs_base + offs_dv * svsd, mask=offs_dv < DV, other=0.0)[None, :]
    store_partial(acc, m_i, l_i, OUT, MP, LP, AP, b * sob + h * soh + i * sos, bh * nrows + rows, split, NSPLIT,
                  row_ok, offs_dv, DV, DIRECT)  # fmt: skip


@triton.jit
def store_partial(acc, m_i, l_i, OUT, MP, LP, AP, out_row, part_row, split, NSPLIT, row_ok, offs_dv, DV: tl.constexpr,
                  DIRECT: tl.constexpr):  # fmt: skip
    """One split: the normalized output (a fully masked row gives zeros, as the reference); several: the partial
    (max, sum, unnormalized acc) of row part_row at slot `split`, for _merge_kernel."""
    dmask = row_ok[:, None] & (offs_dv[None, :] < DV)
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + out_row[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=dmask)
    else:
        slot = part_row.to(tl.int64) * NSPLIT + split
        tl.store(MP + slot, m_i, mask=row_ok)
        tl.store(LP + slot, l_i, mask=row_ok)
        tl.store(AP + slot[:, None] * DV + offs_dv[None, :], acc, mask=dmask)


@triton.jit
def merge_kernel(
    MP, LP, AP, OUT, NROWS, HKV, G, SQ, NSPLIT, sob, soh, sos,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Combine the NSPLIT partials of one row: weights 2^(m_s - max m), out = sum w acc / sum w l."""
    pr = tl.program_id(0)
    bh = pr // NROWS
    r = pr % NROWS
    b = bh // HKV
    h = (bh % HKV) * G + r % G
    i = r // G
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    ok = s < NSPLIT
    slot = pr.to(tl.int64) * NSPLIT + s
    m = tl.load(MP + slot, mask=ok, other=float("-inf"))
    l_s = tl.load(LP + slot, mask=ok, other=0.0)
    mx = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(mx == float("-inf"), 0.0, mx))
    den = tl.sum(w * l_s, 0)
    acc = tl.load(AP + slot[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * sob + h * soh + i * sos + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


def partials(rows: int, splits: int, dv: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Buffers for the split partials (max, sum, acc); unused (1-element) with one split."""
    n = rows * splits if splits > 1 else 1
    return (
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n * (dv if splits > 1 else 1), dtype=torch.float32, device=device),
    )


def merge(mp, lp, ap, out: torch.Tensor, nrows: int, programs: int, hkv: int, g: int, sq: int, splits: int) -> None:
    dv = out.shape[-1]
    merge_kernel[(programs * nrows,)](
        mp, lp, ap, out, nrows, hkv, g, sq, splits, out.stride(0), out.stride(1), out.stride(2),
        DV=dv, BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=triton.next_power_of_2(dv),
    )  # fmt: skip


def check_mask_form(op: str, maps: tuple, layout_block: int) -> None:
    if maps:
        raise DecodeKernelError(f"{op}: the tiled form (block_map and counts operands) is not supported by the CUDA "
                                "decode kernels; run kv-quant without sparse-attention-tiling")  # fmt: skip
    if layout_block:
        raise DecodeKernelError(f"{op}: block-sparse layouts (layout_block={layout_block}) are not supported")


def attention_kvq_run(
    q: torch.Tensor, k_q: torch.Tensor, k_scale: torch.Tensor, v_q: torch.Tensor, v_scale: torch.Tensor,
    *, scale: float, causal: bool, window: int, sinks: int, bits: int, **tuning,
) -> torch.Tensor:  # fmt: skip
    """attention_kvq (dense form) with explicit tuning knobs (`launch`'s; the launcher uses the defaults)."""
    op = "attention_kvq"
    check_codes(op, "k", k_q, bits)
    check_codes(op, "v", v_q, bits)
    check_shapes(op, q, k_q, v_q)
    if causal and q.shape[2] > k_q.shape[2]:
        raise DecodeKernelError(f"{op}: causal attention needs Sq <= Skv, got {q.shape[2]} > {k_q.shape[2]}")
    ks, vs = check_scale(op, "k", k_scale, k_q), check_scale(op, "v", v_scale, v_q)
    modes = (*scale_mode(k_scale, 2, 3), *scale_mode(v_scale, 2, 3))
    return launch(q, k_q, ks, v_q, vs, modes, None, scale=scale, causal=causal, window=window, sinks=sinks, **tuning)


def check_shapes(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, H, Sq, Dk], k [B, Hkv, Skv, Dk], v [B, Hkv, Skv, Dv] with H a multiple of Hkv, dims up to 256."""
    if q.dtype not in FLOATS:
        raise DecodeKernelError(f"{op}: q must be f16, bf16 or f32, got {q.dtype}")
    if k.dtype != v.dtype:
        raise DecodeKernelError(f"{op}: k and v must share a dtype, got {k.dtype} and {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DecodeKernelError(f"{op}: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv or k.shape[3] != q.shape[3] or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise DecodeKernelError(f"{op}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise DecodeKernelError(f"{op}: head dims up to {MAX_HEAD_DIM} are supported, got {q.shape[3]}/{v.shape[3]}")


def launch(
    q: torch.Tensor, k: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, vs: torch.Tensor,
    modes: tuple[bool, bool, bool, bool], starts: torch.Tensor | None,
    *, scale: float, causal: bool, window: int, sinks: int,
    splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, int8_asm: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Run _kvq_kernel on checked operands: k/v codes (or float values) with scales ks/vs expanded to their shapes
    and their modes (k per-token, k elementwise, v per-token, v elementwise); `starts` [B] int32 makes k/v a cache
    of Skv slots of which row b uses its first starts[b] + Sq.
    Defaults from the H200 sweep in bench/decode_cuda_notes.md: one row, 64 keys x 8 warps with 3 pipeline stages
    (32 codes of K and of V a thread per tile at head dim 128); several rows, 64 keys x 4 warps, 2 stages.
    int8_asm=False converts int8 codes with I2F instead of _I8_TO_F32 (for the benchmark's A/B)."""
    k_tok, k_full, v_tok, v_full = modes
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bsz, h, sq, dk = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    nrows = g * sq
    block_m = 1 if nrows == 1 else min(MAX_ROWS_PER_TILE, max(16, triton.next_power_of_2(nrows)))
    tiles = triton.cdiv(nrows, block_m)
    block_dk, block_dv = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    # one row: 64 keys a tile up to head dim 128; 256-wide tiles take 255 registers at 32 keys (sm_90 AOT), so 16
    block_n = block_n or ((64 if max(block_dk, block_dv) <= 128 else 16) if block_m == 1 else 64)
    num_warps = num_warps or (8 if block_m == 1 else 4)
    num_stages = num_stages or (3 if block_m == 1 else 2)
    splits = splits or pick_splits(bsz * hkv * tiles, skv, q.device)
    chunk, splits = split_chunk(skv, splits, block_n)
    out = torch.empty((bsz, h, sq, dv), dtype=q.dtype, device=q.device)
    mp, lp, ap = partials(bsz * hkv * nrows, splits, dv, q.device)
    _kvq_kernel[(bsz * hkv, tiles, splits)](
        q, k, ks, v, vs, out, mp, lp, ap, q if starts is None else starts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *ks.stride(),
        v.stride(0), v.stride(1), v.stride(2), *vs.stride(), out.stride(0), out.stride(1), out.stride(2),
        hkv, sq, skv, chunk, splits, window, sinks, scale * LOG2E,
        G=g, DK=dk, DV=dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n, K_TOK=k_tok, K_FULL=k_full, V_TOK=v_tok, V_FULL=v_full,
        VEC=block_m == 1, CAUSAL=bool(causal), HAS_WINDOW=bool(causal and window > 0),
        PREC="ieee" if q.dtype == torch.float32 else "tf32", DIRECT=splits == 1, INTERPRET=INTERPRET,
        STAGES=num_stages, INT8_ASM=int8_asm, HAS_STARTS=starts is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        merge(mp, lp, ap, out, nrows, bsz * hkv, hkv, g, sq, splits)
    return out


@launcher("attention_kvq")
def attention_kvq(q, k_q, k_scale, v_q, v_scale, *maps, scale, causal, window, sinks, block_q, block_k,
                  layout_block, layout, bits):  # fmt: skip
    """`attention_kvq` in its dense form (no block map, no layout); see the module docstring."""
    check_mask_form("attention_kvq", maps, layout_block)
    return attention_kvq_run(q, k_q, k_scale, v_q, v_scale, scale=scale, causal=causal, window=window, sinks=sinks,
                             bits=bits)  # fmt: skip


from r1c.backends.cuda.kernels import kv_quant, mla_decode  # noqa: E402, F401  (their imports register launchers)
