"""Block-sparse flash attention, backward (FlashAttention-2 style): the `attention_grad` launcher.

The op gets q, k, v and the cotangent g only (no saved output or logsumexp), so it first reruns the forward kernel
with store_out=False: it writes the logsumexp and delta = rowsum(O * g) (the usual preprocessing pass, fused).
Then two kernels recompute P = exp(q k^T * scale - lse) tile by tile:
  dk/dv: one program per (batch * kv head, k tile), looping over the kv head's query heads (GQA folds into the
         sum, no atomics) and over the q tiles of the transposed block map (the q tiles that see the k tile);
  dq:    one program per (batch * head, q tile), looping over the q tile's row of the block map.
Both skip empty tiles and apply the element mask on PARTIAL tiles only, like the forward (one loop that branches on
each tile's kind; split=True: the FULL tiles first in a loop without mask code, then the PARTIAL ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels.flash_attention import (
    INTERPRET,
    LOG2E,
    AttentionKernelError,
    attention_fwd,
    block_map,
    check_inputs,
    dot_precision,
    layout_bitmap,
    mask_key,
    pow2,
    split_block_map,
    tile_visible,
)
from r1c.backends.cuda.launchers import launcher

BwdConfig = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def bwd_configs(bd: int) -> tuple[BwdConfig, BwdConfig]:
    """(dk/dv pass, dq pass) tiles: the dk/dv pass keeps a k and v tile resident and streams q tiles, the dq pass
    the reverse; smaller tiles for head dims past 128 so the resident tiles stay in registers."""
    if bd <= 128:
        return (64, 128, 8, 3), (128, 64, 8, 3)
    return (64, 64, 8, 1), (64, 64, 8, 1)


@triton.jit
def _dkdv_tile(
    k, v, dk, dv, entry, smk, q_base, g_base, LSE_ROW, DELTA_ROW, sqm, sgm, offs_n, offs_d, offs_dv,
    SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """One q tile of the transposed map's row: P^T and dS^T of a k tile against it (MODE: see _fwd_tile)."""
    qt = tl.load(entry)
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < SQ
    q_t = tl.load(q_base + offs_m[None, :] * sqm, mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    lse = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: P = 0
    p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=PREC) * qk_scale - lse2[None, :])  # [BN, BM]
    if MODE == 0:
        if tl.load(entry + smk) == 2:
            vis = tile_visible(offs_m[None, :], offs_n[:, None], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                               HAS_LAYOUT)  # fmt: skip
            p_t = tl.where(vis, p_t, 0.0)
    elif MODE == 2:
        vis = tile_visible(offs_m[None, :], offs_n[:, None], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                           HAS_LAYOUT)  # fmt: skip
        p_t = tl.where(vis, p_t, 0.0)
    do = tl.load(g_base + offs_m[:, None] * sgm, mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
    dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_tile(
    q, do, lse2, delta, dq, entry, smk, k_base, v_base, skn, svn, offs_m, offs_n, offs_d, offs_dv,
    SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """One k tile of the map's row: dS of a q tile against it, accumulated into dq (MODE: see _fwd_tile)."""
    kt = tl.load(entry)
    offs_kn = kt * BLOCK_N + offs_n
    col_ok = offs_kn < SKV
    k_t = tl.load(k_base + offs_kn[None, :] * skn, mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    p = tl.math.exp2(tl.dot(q, k_t, input_precision=PREC) * qk_scale - lse2[:, None])  # [BM, BN]
    if MODE == 0:
        if tl.load(entry + smk) == 2:
            vis = tile_visible(offs_m[:, None], offs_kn[None, :], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                               HAS_LAYOUT)  # fmt: skip
            p = tl.where(vis, p, 0.0)
    elif MODE == 2:
        vis = tile_visible(offs_m[:, None], offs_kn[None, :], SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, CAUSAL,
                           HAS_LAYOUT)  # fmt: skip
        p = tl.where(vis, p, 0.0)
    v_t = tl.load(v_base + offs_kn[None, :] * svn, mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    ds = p * (tl.dot(do, v_t, input_precision=PREC) - delta[:, None])
    return tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PREC)


@triton.jit
def _dkdv_loop(
    start, stop, k, v, dk, dv, map_row, smc, smk, q_base, g_base, LSE_ROW, DELTA_ROW, sqm, sgm, offs_n, offs_d, offs_dv,
    SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, MODE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Entries start..stop of a transposed-map row (`while` in the interpreter: see flash_attention._fwd_loop)."""
    if INTERPRET:
        c = start
        while c < stop:
            dk, dv = _dkdv_tile(k, v, dk, dv, map_row + c * smc, smk, q_base, g_base, LSE_ROW, DELTA_ROW, sqm, sgm,
                                offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV,
                                BLOCK_M, CAUSAL, HAS_LAYOUT, PREC, MODE)  # fmt: skip
            c += 1
    else:
        for c in range(start, stop):
            dk, dv = _dkdv_tile(k, v, dk, dv, map_row + c * smc, smk, q_base, g_base, LSE_ROW, DELTA_ROW, sqm, sgm,
                                offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV,
                                BLOCK_M, CAUSAL, HAS_LAYOUT, PREC, MODE)  # fmt: skip
    return dk, dv


@triton.jit
def _dq_loop(
    start, stop, q, do, lse2, delta, dq, map_row, smc, smk, k_base, v_base, skn, svn, offs_m, offs_n, offs_d, offs_dv,
    SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, MODE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Entries start..stop of a map row (`while` in the interpreter: see flash_attention._fwd_loop)."""
    if INTERPRET:
        c = start
        while c < stop:
            dq = _dq_tile(q, do, lse2, delta, dq, map_row + c * smc, smk, k_base, v_base, skn, svn, offs_m, offs_n,
                          offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV, BLOCK_N, CAUSAL,
                          HAS_LAYOUT, PREC, MODE)  # fmt: skip
            c += 1
    else:
        for c in range(start, stop):
            dq = _dq_tile(q, do, lse2, delta, dq, map_row + c * smc, smk, k_base, v_base, skn, svn, offs_m, offs_n,
                          offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV, BLOCK_N, CAUSAL,
                          HAS_LAYOUT, PREC, MODE)  # fmt: skip
    return dq


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, MAP, COUNTS, FULLC, LAYOUT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgm, sgd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smr, smc, smk, scr,
    H, SQ, SKV, WINDOW, SINKS, LB, NLK, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, INTERPRET: tl.constexpr, REP: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    bhk = tl.program_id(0)
    nt = tl.program_id(1)
    hkv = H // REP
    b, hk = bhk // hkv, bhk % hkv
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    col_ok = offs_n < SKV
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BD], tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], tl.float32)
    map_row = MAP + nt * smr
    count = tl.load(COUNTS + nt * scr)
    nfull = tl.load(FULLC + nt * scr) if SPLIT else 0
    for r in range(REP):  # the query heads that share this kv head (REP is constexpr: the interpreter's range)
        h = hk * REP + r
        q_base = Q + b * sqb + h * sqh + offs_d[:, None] * sqd
        g_base = DO + b * sgb + h * sgh + offs_dv[None, :] * sgd
        row_base = (b * H + h) * SQ
        if SPLIT:  # FULL tiles first (no mask code), then the PARTIAL ones
            dk, dv = _dkdv_loop(0, nfull, k, v, dk, dv, map_row, smc, smk, q_base, g_base, LSE + row_base,
                                DELTA + row_base, sqm, sgm, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB,
                                NLK, qk_scale, D, DV, BLOCK_M, CAUSAL, HAS_LAYOUT, PREC, 1, INTERPRET)  # fmt: skip
            dk, dv = _dkdv_loop(nfull, count, k, v, dk, dv, map_row, smc, smk, q_base, g_base, LSE + row_base,
                                DELTA + row_base, sqm, sgm, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB,
                                NLK, qk_scale, D, DV, BLOCK_M, CAUSAL, HAS_LAYOUT, PREC, 2, INTERPRET)  # fmt: skip
        else:
            dk, dv = _dkdv_loop(0, count, k, v, dk, dv, map_row, smc, smk, q_base, g_base, LSE + row_base,
                                DELTA + row_base, sqm, sgm, offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB,
                                NLK, qk_scale, D, DV, BLOCK_M, CAUSAL, HAS_LAYOUT, PREC, 0, INTERPRET)  # fmt: skip
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))  # fmt: skip
    tl.store(DV_ + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))  # fmt: skip


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MAP, COUNTS, FULLC, LAYOUT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgm, sgd,
    sdqb, sdqh, sdqm, sdqd, smr, smc, smk, scr,
    H, SQ, SKV, WINDOW, SINKS, LB, NLK, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr,
    PREC: tl.constexpr, INTERPRET: tl.constexpr, REP: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest causal rows first
    b, h = bh // H, bh % H
    hk = h // REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < SQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_dv[None, :] * sgd,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh * SQ + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * SQ + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh + offs_d[:, None] * skd
    v_base = V + b * svb + hk * svh + offs_dv[:, None] * svd
    dq = tl.zeros([BLOCK_M, BD], tl.float32)
    map_row = MAP + pid_m * smr
    count = tl.load(COUNTS + pid_m * scr)
    if SPLIT:  # FULL tiles first (no mask code), then the PARTIAL ones
        nfull = tl.load(FULLC + pid_m * scr)
        dq = _dq_loop(0, nfull, q, do, lse2, delta, dq, map_row, smc, smk, k_base, v_base, skn, svn, offs_m, offs_n,
                      offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV, BLOCK_N, CAUSAL,
                      HAS_LAYOUT, PREC, 1, INTERPRET)  # fmt: skip
        dq = _dq_loop(nfull, count, q, do, lse2, delta, dq, map_row, smc, smk, k_base, v_base, skn, svn, offs_m,
                      offs_n, offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV, BLOCK_N,
                      CAUSAL, HAS_LAYOUT, PREC, 2, INTERPRET)  # fmt: skip
    else:
        dq = _dq_loop(0, count, q, do, lse2, delta, dq, map_row, smc, smk, k_base, v_base, skn, svn, offs_m, offs_n,
                      offs_d, offs_dv, SQ, SKV, WINDOW, SINKS, LAYOUT, LB, NLK, qk_scale, D, DV, BLOCK_N, CAUSAL,
                      HAS_LAYOUT, PREC, 0, INTERPRET)  # fmt: skip
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))  # fmt: skip


def attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    a: dict,
    configs: tuple[BwdConfig, BwdConfig] | None = None,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's logsumexp and delta = rowsum(O * g) (both f32 [B, H, Sq]). configs overrides
    `bwd_configs`; split=True walks FULL tiles first in a loop without mask code (correct, not yet timed on the GPU;
    see bench/attention_cuda_notes.md)."""
    check_inputs("attention_grad", q, k, v, a["scale"])
    if g.shape != (*q.shape[:3], v.shape[3]) or g.dtype != q.dtype:
        raise AttentionKernelError(f"attention_grad: cotangent {tuple(g.shape)} {g.dtype} does not match the output")
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    bd, bdv = pow2(d), pow2(dv)
    (bm1, bn1, w1, s1), (bm2, bn2, w2, s2) = configs or bwd_configs(max(bd, bdv))
    mask = mask_key(a)
    dev = str(q.device)
    dq, dk, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    layout = layout_bitmap(sq, skv, mask, dev)
    lay = layout if layout is not None else lse  # an unused pointer argument still needs a tensor
    nlk = layout.shape[1] if layout is not None else 1
    causal, window, sinks, lb, _ = mask
    common = (h, sq, skv, window, sinks, max(lb, 1), nlk, a["scale"] * LOG2E, a["scale"])
    consts = dict(D=d, DV=dv, BD=bd, BDV=bdv, CAUSAL=causal, HAS_LAYOUT=layout is not None,
                  PREC=dot_precision(q.dtype), INTERPRET=INTERPRET, REP=h // hkv, SPLIT=split)  # fmt: skip

    def maps(*args, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if split:
            return split_block_map(*args, **kw)
        return *block_map(*args, **kw), lse  # lse stands in for the full counts the kernels then never read

    strides = (*q.stride(), *k.stride(), *v.stride(), *g.stride())
    if skv:
        tmap, tcounts, tfull = maps(sq, skv, mask, bm1, bn1, dev, transposed=True)
        _dkdv_kernel[(b * hkv, triton.cdiv(skv, bn1))](
            q, k, v, g, lse, delta, dk, dv_, tmap, tcounts, tfull, lay, *strides, *dk.stride(), *dv_.stride(),
            *tmap.stride()[1:], tcounts.stride(1), *common, BLOCK_M=bm1, BLOCK_N=bn1, **consts,
            num_warps=w1, num_stages=s1,
        )  # fmt: skip
    if sq:
        qmap, qcounts, qfull = maps(sq, skv, mask, bm2, bn2, dev)
        _dq_kernel[(b * h, triton.cdiv(sq, bm2))](
            q, k, v, g, lse, delta, dq, qmap, qcounts, qfull, lay, *strides, *dq.stride(),
            *qmap.stride()[1:], qcounts.stride(1), *common, BLOCK_M=bm2, BLOCK_N=bn2, **consts,
            num_warps=w2, num_stages=s2,
        )  # fmt: skip
    return dq, dk, dv_


@launcher("attention_grad")
def attention_grad(q, k, v, g, **a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op has no saved forward state: rerun the forward kernel for lse and delta, then the two passes."""
    _, lse, delta = attention_fwd(q, k, v, a, op="attention_grad", return_lse=True, grad_out=g, store_out=False)
    return attention_bwd(q, k, v, g, lse, delta, a)
