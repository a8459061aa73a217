"""Decode attention over a quantized KV cache as one Pallas TPU kernel (`attention_kvq`, `mla_attention_kvq`).

For the decode case (few queries per row) the kernel reads the int8 / 4-bit (one per int8) / fp8e4m3 codes and
their float32 scales straight from HBM and dequantizes in VMEM, instead of XLA writing a float32 copy of K and V
for splash to read back. Grid (batch, kv head, visible key block): the G query heads of a kv head and their Sq
queries are the G*Sq rows (padded to 8 sublanes) of one tile, so GQA and MQA read each K/V block once; an online
softmax runs over the key blocks. Which key blocks any query sees is static (causal aligned to the end of the
keys, window, sinks), so the grid walks only those (a scalar-prefetched block list drives the K/V index maps: the
skipped blocks are neither read nor computed); the element mask inside a block and the padded keys past the end
are masked by iota. Scales are folded where they are cheapest: a per-token scale multiplies the score columns
(K) or the probability columns (V), a per-channel one the query (K) or the finished output row (V); the
arithmetic is float32 throughout (the dots at the context's precision), as the reference.

fp8 codes travel as their int8 bit pattern and are decoded with integer ops (sign, 4-bit exponent, 3-bit
mantissa, subnormals), so the kernel needs no fp8 support from the chip. Absorbed MLA is the same kernel with two
key parts (the latent and the shared rotary key, each with its own scale) and one kv head; its values are the
latent part's codes already in VMEM.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from r1c.ir.ops.attention import attention_mask

F32 = jnp.float32
LANES, SUBLANES = 128, 8
MAX_DECODE_QUERIES = 16  # more queries per row is prefill: splash's 128-row query tiles fill the MXU better
BLOCK_K = 512  # keys per grid step (a multiple of the int8 tile's 128 lanes)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class QuantKV:
    """One quantized operand as the kernel reads it: codes [B, Hkv, Skv, D] (int8, or fp8e4m3 as a float array
    holding its values) and a float32 scale of the same rank whose dims are 1 or the codes' (it broadcasts)."""

    codes: Any
    scale: Any
    fp8: bool

    @property
    def per_token(self) -> bool | None:
        """True: one scale per (row, head, token); False: per channel; None: neither (both vary)."""
        s = self.scale.shape
        return True if s[3] == 1 else False if s[2] == 1 else None


def supported(sq: int, parts: list[QuantKV], attrs: dict) -> bool:
    """The decode case this kernel serves: few queries, scales per token or per channel, no block-sparse layout."""
    scales_ok = all(p.per_token is not None for p in parts)
    return 0 < sq <= MAX_DECODE_QUERIES and not attrs.get("layout_block") and scales_ok


def _codes_to_f32(c: Any, fp8: bool) -> Any:
    """int8 codes as float32; fp8e4m3 bit patterns decoded (quantize never stores the NaN code 0x7f/0xff)."""
    if not fp8:
        return c.astype(F32)
    u = c.astype(jnp.int32) & 0xFF
    e, m = (u >> 3) & 0xF, u & 0x7
    normal = lax.bitcast_convert_type(((e + 120) << 23) | (m << 20), F32)  # 2^(e-7) (1 + m/8): rebias 7 -> 127
    mag = jnp.where(e == 0, m.astype(F32) * (2.0**-9), normal)  # subnormals: m/8 * 2^-6
    return jnp.where(u >= 128, -mag, mag)


def _kernel(blocks_ref, qpos_ref, *refs, forms, v_form, v_shared, fp8, causal, window, sinks, skv, bk, precision):
    n = len(forms)
    q_refs, kc_refs, ks_refs = refs[0 : 3 * n : 3], refs[1 : 3 * n : 3], refs[2 : 3 * n : 3]
    rest = refs[3 * n :]
    if v_shared:
        vs_ref = ks_refs[0]
        o_ref, m_ref, l_ref, acc_ref = rest
    else:
        vc_ref, vs_ref, o_ref, m_ref, l_ref, acc_ref = rest
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    nt = (((1,), (1,)), ((), ()))
    s, k0 = None, None
    for q_ref, kc_ref, ks_ref, per_token in zip(q_refs, kc_refs, ks_refs, forms):
        k = _codes_to_f32(kc_ref[...], fp8)  # [bk, D]
        k0 = k if k0 is None else k0
        q = q_ref[...] if per_token else q_ref[...] * ks_ref[...]  # per channel: q . (k * s) = (q * s) . k
        part = lax.dot_general(q, k, nt, precision=precision, preferred_element_type=F32)  # [R, bk]
        part = part * ks_ref[...] if per_token else part  # per token: one scale per score column
        s = part if s is None else s + part

    kpos = blocks_ref[j] * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = kpos < skv  # padded keys
    if causal:
        qpos = qpos_ref[:, :1]  # [R, 1]: each row's query position
        seen = kpos <= qpos
        if window:
            seen = seen & ((kpos > qpos - window) | (kpos < sinks))
        visible = visible & seen
    s = jnp.where(visible, s, -jnp.inf)

    m_prev = m_ref[...]  # [R, 128], lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing visible yet: p and alpha stay 0
    p = jnp.exp(s - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    v = k0 if v_shared else _codes_to_f32(vc_ref[...], fp8)  # MLA: the values are the latent part's codes
    pv = p * vs_ref[...] if v_form else p  # per-token value scales weight the probability columns
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + lax.dot_general(
        pv, v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=F32
    )

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        denom = l_ref[:, :1]
        out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)  # a row that saw no key: acc is 0, the reference's zeros
        o_ref[...] = out if v_form else out * vs_ref[...]  # per-channel value scales: once, on the output


def _scale_operand(kv: QuantKV, b: int, hkv: int, skvp: int, dp: int) -> Any:
    """A scale as the kernel's lane-dense row: per token [B, Hkv, 1, Skv_padded], per channel [B, Hkv, 1, D_padded]
    (padding 0: padded keys are masked and padded channels have zero codes)."""
    skv, d = kv.codes.shape[2], kv.codes.shape[3]
    if kv.per_token:
        s = jnp.broadcast_to(kv.scale[..., 0], (b, hkv, skv))
        return jnp.pad(s, ((0, 0), (0, 0), (0, skvp - skv)))[:, :, None, :]
    s = jnp.broadcast_to(kv.scale[:, :, 0, :], (b, hkv, d))
    return jnp.pad(s, ((0, 0), (0, 0), (0, dp - d)))[:, :, None, :]


def _codes_operand(kv: QuantKV, skvp: int, dp: int) -> Any:
    """Codes as int8 (fp8 as its bit pattern), keys padded to the block and channels to the lanes with zeros."""
    c = kv.codes
    if kv.fp8:
        c = lax.bitcast_convert_type(c.astype(jnp.float8_e4m3fn), jnp.int8)  # exact: the values are fp8 values
    c = c.astype(jnp.int8)
    return jnp.pad(c, ((0, 0), (0, 0), (0, skvp - c.shape[2]), (0, dp - c.shape[3])))


def decode_attention(
    qs: list[Any],
    ks: list[QuantKV],
    v: QuantKV | None,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    *,
    interpret: bool,
    precision: Any = lax.Precision.HIGHEST,
    block_k: int | None = None,
) -> Any:
    """softmax(sum_i qs[i] . dq(ks[i]) * scale, masked) dq(v) per head; qs[i] [B, H, Sq, D_i] (float32), ks[i] and
    v [B, Hkv, Skv, ...] with H a multiple of Hkv (query head h reads kv head h // (H/Hkv)); v None: the values are
    ks[0] (absorbed MLA). Returns [B, H, Sq, Dv] float32; a query that sees no key gets zeros."""
    b, h, sq, _ = qs[0].shape
    _, hkv, skv, _ = ks[0].codes.shape
    g = h // hkv
    v_shared = v is None
    vkv = ks[0] if v_shared else v
    dv = vkv.codes.shape[3]
    rows = _round_up(g * sq, SUBLANES)
    bk = min(block_k or BLOCK_K, _round_up(skv, LANES))
    nblocks = -(-skv // bk)
    skvp = nblocks * bk

    mask = attention_mask(sq, skv, causal, window, sinks)
    padded = np.zeros((sq, skvp), dtype=bool)
    padded[:, :skv] = mask
    blocks = np.flatnonzero(padded.reshape(sq, nblocks, bk).any(axis=(0, 2))).astype(np.int32)
    if blocks.size == 0:  # no query sees any key
        return jnp.zeros((b, h, sq, dv), F32)
    # Row r of a kv head's tile is query head g = r // Sq, query r % Sq; padded rows sit before key 0 (they see
    # nothing and come out 0).
    qpos = np.full((rows, LANES), -1, np.int32)
    qpos[: g * sq] = np.tile(np.arange(sq) + (skv - sq), g)[:, None]

    operands: list[Any] = [jnp.asarray(qpos)]
    specs: list[Any] = [pl.BlockSpec((rows, LANES), lambda b_, h_, j, blk: (0, 0))]
    flops = 0
    for q, kv in zip(qs, ks):
        d = q.shape[3]
        dp = _round_up(d, LANES)
        qt = (q * scale).reshape(b, hkv, g * sq, d)
        operands += [
            jnp.pad(qt, ((0, 0), (0, 0), (0, rows - g * sq), (0, dp - d))),
            _codes_operand(kv, skvp, dp),
            _scale_operand(kv, b, hkv, skvp, dp),
        ]
        specs += [
            pl.BlockSpec((None, None, rows, dp), lambda b_, h_, j, blk: (b_, h_, 0, 0)),
            pl.BlockSpec((None, None, bk, dp), lambda b_, h_, j, blk: (b_, h_, blk[j], 0)),
            pl.BlockSpec((None, None, 1, bk), lambda b_, h_, j, blk: (b_, h_, 0, blk[j]))
            if kv.per_token
            else pl.BlockSpec((None, None, 1, dp), lambda b_, h_, j, blk: (b_, h_, 0, 0)),
        ]
        flops += 2 * b * hkv * rows * blocks.size * bk * dp
    dvp = _round_up(dv, LANES)
    if not v_shared:
        operands += [_codes_operand(v, skvp, dvp), _scale_operand(v, b, hkv, skvp, dvp)]
        specs += [
            pl.BlockSpec((None, None, bk, dvp), lambda b_, h_, j, blk: (b_, h_, blk[j], 0)),
            pl.BlockSpec((None, None, 1, bk), lambda b_, h_, j, blk: (b_, h_, 0, blk[j]))
            if v.per_token
            else pl.BlockSpec((None, None, 1, dvp), lambda b_, h_, j, blk: (b_, h_, 0, 0)),
        ]
    flops += 2 * b * hkv * rows * blocks.size * bk * dvp

    kernel = functools.partial(
        _kernel,
        forms=tuple(bool(kv.per_token) for kv in ks),
        v_form=bool(vkv.per_token),
        v_shared=v_shared,
        fp8=ks[0].fp8,
        causal=causal,
        window=window,
        sinks=sinks,
        skv=skv,
        bk=bk,
        precision=precision,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hkv, int(blocks.size)),
            in_specs=specs,
            out_specs=pl.BlockSpec((None, None, rows, dvp), lambda b_, h_, j, blk: (b_, h_, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((rows, LANES), F32),
                pltpu.VMEM((rows, LANES), F32),
                pltpu.VMEM((rows, dvp), F32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, dvp), F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=b * hkv * rows * int(blocks.size) * bk,
            bytes_accessed=sum(math.prod(x.shape) * x.dtype.itemsize for x in operands) + b * hkv * rows * dvp * 4,
        ),
        interpret=interpret,
        name="kvq_decode_attention",
    )(jnp.asarray(blocks), *operands)
    return out[:, :, : g * sq, :dv].reshape(b, h, sq, dv)


__all__ = ["MAX_DECODE_QUERIES", "QuantKV", "decode_attention", "supported"]
