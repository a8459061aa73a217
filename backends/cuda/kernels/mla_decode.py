"""Absorbed MLA decode over a quantized latent cache (`mla_attention_kvq`), split-K like decode_attention.py.

The cache is one kv head: the latent [B, S, C] (keys and values at once) and the shared rotary key [B, S, 1, dr].
Every query head attends to it, so one program takes all H * Sq query rows of a batch row (row r = query r // H of
head r % H) and reads each latent/rotary tile once for all heads: scores = q_lat . latent + q_rope . k_rot on the
tensor cores, values = the same latent tile, an online softmax in fp32, a partial (max, sum, acc) per split merged
by decode_attention.merge_kernel. Scales are applied as in decode_attention.py (per-token: on score columns and
on the probabilities; per-channel: folded into q on the way in and into the accumulator on the way out).

The two absorption products around the kernel (q_nope [B,H,Sq,dn] through W_UK [H,dn,C] into latent space, and
the latent output [B,H,Sq,C] through W_UV [H,dv,C]) are small batched GEMMs run with torch.einsum (cuBLAS), as
the task allows for these two matmuls only; everything that reads the cache runs in the Triton kernel below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels.decode_attention import (
    FLOATS,
    INTERPRET,
    LOG2E,
    DecodeKernelError,
    check_codes,
    check_mask_form,
    check_scale,
    load_codes,
    merge,
    partials,
    pick_splits,
    scale_mode,
    softmax_step,
    split_chunk,
    store_partial,
)
from r1c.backends.cuda.launchers import launcher

MAX_ROWS_PER_TILE = 64
MAX_LATENT = 1024


@triton.jit
def _mla_tile(
    acc, m_i, l_i, q_lat, q_rope, n0, l_base, r_base, ls_base, rs_base, sl_n, sr_n, sls_n, sls_c, srs_n, srs_d,
    offs_n, offs_c, offs_r, qpos, hi, WINDOW, SINKS, qk_scale,
    C: tl.constexpr, DR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DR: tl.constexpr,
    L_TOK: tl.constexpr, L_FULL: tl.constexpr, R_TOK: tl.constexpr, R_FULL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    kn = n0 + offs_n
    nmask = kn < hi
    lat = load_codes(l_base + kn[:, None] * sl_n + offs_c[None, :], nmask, offs_c, C)
    if L_FULL:
        lat = lat.to(tl.float32) * tl.load(ls_base + kn[:, None] * sls_n + offs_c[None, :] * sls_c,
                                           mask=nmask[:, None] & (offs_c[None, :] < C), other=0.0)  # fmt: skip
    # masked keys (and padded dims) hold undefined codes (no fp8 `other` in the interpreter): zero them, the latent
    # is also V, and 0 * NaN is NaN
    lat = tl.where(nmask[:, None] & (offs_c[None, :] < C), lat.to(q_lat.dtype), 0.0)
    rot = load_codes(r_base + kn[:, None] * sr_n + offs_r[None, :], nmask, offs_r, DR)
    if R_FULL:
        rot = rot.to(tl.float32) * tl.load(rs_base + kn[:, None] * srs_n + offs_r[None, :] * srs_d,
                                           mask=nmask[:, None] & (offs_r[None, :] < DR), other=0.0)  # fmt: skip
    s = tl.dot(q_lat, tl.trans(lat), input_precision=PREC)
    if L_TOK:
        ls = tl.load(ls_base + kn * sls_n, mask=nmask, other=0.0)
        s = s * ls[None, :]
    if DR < BLOCK_DR:
        rot = tl.where(offs_r[None, :] < DR, rot.to(q_rope.dtype), 0.0)
    s_rot = tl.dot(q_rope, tl.trans(rot.to(q_rope.dtype)), input_precision=PREC)
    if R_TOK:
        s_rot = s_rot * tl.load(rs_base + kn * srs_n, mask=nmask, other=0.0)[None, :]
    p, alpha, m_i, l_i = softmax_step((s + s_rot) * qk_scale, m_i, l_i, kn, qpos, hi, WINDOW, SINKS, CAUSAL,
                                      HAS_WINDOW)  # fmt: skip
    if L_TOK:
        p = p * ls[None, :]
    acc = tl.dot(p.to(q_lat.dtype), lat, acc * alpha[:, None], input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _mla_kernel(
    QL, QR, LQ, LS, RQ, RS, OUT, MP, LP, AP,
    sqlb, sqlh, sqls, sqrb, sqrh, sqrs, slb, sln, srb, srn, slsb, slsn, slsc, srsb, srsn, srsd, sob, soh, sos,
    H, SQ, SKV, CHUNK, NSPLIT, WINDOW, SINKS, qk_scale,
    C: tl.constexpr, DR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    L_TOK: tl.constexpr, L_FULL: tl.constexpr, R_TOK: tl.constexpr, R_FULL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    nrows = H * SQ
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < nrows
    i = rows // H
    h = rows % H
    qpos = i + SKV - SQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_DR)
    q_lat = tl.load(QL + b * sqlb + h[:, None] * sqlh + i[:, None] * sqls + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)  # fmt: skip
    q_rope = tl.load(QR + b * sqrb + h[:, None] * sqrh + i[:, None] * sqrs + offs_r[None, :],
                     mask=row_ok[:, None] & (offs_r[None, :] < DR), other=0.0).to(tl.float32)  # fmt: skip
    ls_base = LS + b * slsb
    rs_base = RS + b * srsb
    if not L_TOK and not L_FULL:  # per-channel latent scale: fold into q (keys) and into acc at the end (values)
        ls_c = tl.load(ls_base + offs_c * slsc, mask=offs_c < C, other=0.0)
        q_lat = q_lat * ls_c[None, :]
    if not R_TOK and not R_FULL:
        q_rope = q_rope * tl.load(rs_base + offs_r * srsd, mask=offs_r < DR, other=0.0)[None, :]
    q_lat = q_lat.to(QL.dtype.element_ty)
    q_rope = q_rope.to(QL.dtype.element_ty)

    start = split * CHUNK
    hi = tl.minimum(start + CHUNK, SKV)
    lo = start
    if CAUSAL:
        hi = tl.minimum(hi, SKV - SQ + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // H, SQ - 1) + 1)
        if HAS_WINDOW:
            lo = tl.where(SINKS > 0, start, tl.maximum(start, SKV - SQ + (tile * BLOCK_M) // H - WINDOW + 1))
    l_base = LQ + b * slb
    r_base = RQ + b * srb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    if INTERPRET:  # no range() of a run-time scalar in the interpreter
        n0 = lo
        while n0 < hi:
            acc, m_i, l_i = _mla_tile(acc, m_i, l_i, q_lat, q_rope, n0, l_base, r_base, ls_base, rs_base, sln, srn,
                                      slsn, slsc, srsn, srsd, offs_n, offs_c, offs_r, qpos, hi, WINDOW, SINKS,
                                      qk_scale, C, DR, BLOCK_C, BLOCK_DR, L_TOK, L_FULL, R_TOK, R_FULL, CAUSAL,
                                      HAS_WINDOW, PREC)  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _mla_tile(acc, m_i, l_i, q_lat, q_rope, n0, l_base, r_base, ls_base, rs_base, sln, srn,
                                      slsn, slsc, srsn, srsd, offs_n, offs_c, offs_r, qpos, hi, WINDOW, SINKS,
                                      qk_scale, C, DR, BLOCK_C, BLOCK_DR, L_TOK, L_FULL, R_TOK, R_FULL, CAUSAL,
                                      HAS_WINDOW, PREC)  # fmt: skip
    if not L_TOK and not L_FULL:
        acc = acc * ls_c[None, :]
    store_partial(acc, m_i, l_i, OUT, MP, LP, AP, b * sob + h * soh + i * sos, b * nrows + rows, split, NSPLIT,
                  row_ok, offs_c, C, DIRECT)  # fmt: skip


def mla_latent_attention(
    q_lat: torch.Tensor, q_rope: torch.Tensor, latent_q: torch.Tensor, latent_scale: torch.Tensor,
    k_rot_q: torch.Tensor, k_rot_scale: torch.Tensor, *, scale: float, causal: bool, window: int, sinks: int,
    splits: int | None = None, block_n: int = 32, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:  # fmt: skip
    """The kernel part: o_lat [B, H, Sq, C] = softmax(q_lat latent^T + q_rope k_rot^T) latent, in q_lat's dtype."""
    bsz, h, sq, c = q_lat.shape
    skv, dr = latent_q.shape[1], k_rot_q.shape[3]
    ls = check_scale("mla_attention_kvq", "latent", latent_scale, latent_q)
    rs = check_scale("mla_attention_kvq", "k_rot", k_rot_scale, k_rot_q)
    l_tok, l_full = scale_mode(latent_scale, 1, 2)
    r_tok, r_full = scale_mode(k_rot_scale, 1, 3)
    latent_q, k_rot_q = (t if t.stride(-1) == 1 else t.contiguous() for t in (latent_q, k_rot_q))
    nrows = h * sq
    block_m = min(MAX_ROWS_PER_TILE, max(16, triton.next_power_of_2(nrows)))
    tiles = triton.cdiv(nrows, block_m)
    splits = splits or pick_splits(bsz * tiles, skv, q_lat.device)
    chunk, splits = split_chunk(skv, splits, block_n)
    o_lat = torch.empty((bsz, h, sq, c), dtype=q_lat.dtype, device=q_lat.device)
    mp, lp, ap = partials(bsz * nrows, splits, c, q_lat.device)
    _mla_kernel[(bsz, tiles, splits)](
        q_lat, q_rope, latent_q, ls, k_rot_q, rs, o_lat, mp, lp, ap,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        latent_q.stride(0), latent_q.stride(1), k_rot_q.stride(0), k_rot_q.stride(1),
        ls.stride(0), ls.stride(1), ls.stride(2), rs.stride(0), rs.stride(1), rs.stride(3),
        o_lat.stride(0), o_lat.stride(1), o_lat.stride(2),
        h, sq, skv, chunk, splits, window, sinks, scale * LOG2E,
        C=c, DR=dr, BLOCK_C=triton.next_power_of_2(c), BLOCK_DR=max(16, triton.next_power_of_2(dr)),
        BLOCK_M=block_m, BLOCK_N=block_n, L_TOK=l_tok, L_FULL=l_full, R_TOK=r_tok, R_FULL=r_full,
        CAUSAL=bool(causal), HAS_WINDOW=bool(causal and window > 0),
        PREC="ieee" if q_lat.dtype == torch.float32 else "tf32", DIRECT=splits == 1, INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        merge(mp, lp, ap, o_lat, nrows, bsz, 1, h, sq, splits)
    return o_lat


@launcher("mla_attention_kvq")
def mla_attention_kvq(q, latent_q, latent_scale, k_rot_q, k_rot_scale, kv_b_weight, *maps, scale, causal, window,
                      sinks, block_q, block_k, layout_block, layout, bits, qk_nope_head_dim, v_head_dim):  # fmt: skip
    """`mla_attention_kvq` in its dense form: W_UK absorption (torch), the latent kernel, W_UV (torch)."""
    op = "mla_attention_kvq"
    check_mask_form(op, maps, layout_block)
    if q.dtype not in FLOATS or kv_b_weight.dtype != q.dtype:
        raise DecodeKernelError(f"{op}: q and kv_b weight must share a float dtype, got {q.dtype}, {kv_b_weight.dtype}")
    check_codes(op, "latent", latent_q, bits)
    check_codes(op, "k_rot", k_rot_q, bits)
    if q.dim() != 4 or latent_q.dim() != 3 or k_rot_q.dim() != 4 or k_rot_q.shape[2] != 1:
        raise DecodeKernelError(f"{op}: expects q [B,H,Sq,dn+dr], latent [B,S,C], k_rot [B,S,1,dr], got "
                                f"{tuple(q.shape)}, {tuple(latent_q.shape)}, {tuple(k_rot_q.shape)}")  # fmt: skip
    bsz, h, sq, _ = q.shape
    dn, dv, c = qk_nope_head_dim, v_head_dim, latent_q.shape[2]
    if c > MAX_LATENT or k_rot_q.shape[3] > 256:
        raise DecodeKernelError(f"{op}: latent rank up to {MAX_LATENT} and rotary dim up to 256, got {c}, "
                                f"{k_rot_q.shape[3]}")  # fmt: skip
    if causal and sq > latent_q.shape[1]:
        raise DecodeKernelError(f"{op}: causal attention needs Sq <= Skv, got {sq} > {latent_q.shape[1]}")
    w = kv_b_weight.view(h, dn + dv, c)
    q_lat = torch.einsum("bhsd,hdc->bhsc", q[..., :dn], w[:, :dn])  # W_UK absorption (cuBLAS, see docstring)
    o_lat = mla_latent_attention(q_lat, q[..., dn:], latent_q, latent_scale, k_rot_q, k_rot_scale, scale=scale,
                                 causal=causal, window=window, sinks=sinks)  # fmt: skip
    return torch.einsum("bhsc,hec->bhse", o_lat, w[:, dn:])  # W_UV after the softmax (cuBLAS)
