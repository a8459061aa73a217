"""KV-cache quantization: quantize/dequantize, and attention that reads quantized K/V (plain and MLA).

Formats (symmetric, round to nearest, one float32 scale per group of elements):
- int8, bits=8: q = clip(rint(x / s), -127, 127), s = amax / 127; |x - q*s| <= s/2 = amax/254.
- int8, bits=4: values in [-7, 7] stored one per int8 (a backend packs two per byte; the cost counts 4 bits),
  s = amax / 7; |x - q*s| <= s/2 = amax/14. Symmetric [-7, 7] rather than [-8, 7] so that 0 and +-amax are
  exact and no sign is favoured.
- fp8e4m3: q = round_to(x / s, fp8e4m3), s = amax / 448 (e4m3's largest finite value); for |x/s| >= 2^-6
  (normal numbers) |x - q*s| <= 2^-4 |x|, below it (subnormals) <= 2^-10 s.
Granularity (KIVI: keys per channel, values per token) picks the group that shares a scale: `per_token`
reduces the axes after `token_axis` (one scale per token), `per_channel` reduces `token_axis` (one scale per
channel, over all tokens). The scale keeps the operand's rank, with 1 on the reduced axes, so it broadcasts.

The ops are an inference transform (kv-quant runs after training): quantize's rounding has no useful
derivative, so it and the fused attention ops raise a clear error when differentiated; dequantize, a plain
product, has an exact VJP.
"""

from __future__ import annotations

import numpy as np

from r1c.ir import dims, registry
from r1c.ir.ops._util import axis_of, require_float, require_rank, same_dim
from r1c.ir.ops.attention_tiled import MASK_ATTRS, TILE_ATTRS
from r1c.ir.ops.grad_util import unbroadcast
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, numel, register
from r1c.ir.types import DType, TensorType, round_to

QUANT_DTYPES = (DType.int8, DType.fp8e4m3)
GRANULARITIES = ("per_token", "per_channel")
FP8_MAX = 448.0


def qmax(dtype: DType, bits: int) -> float:
    """Largest quantized magnitude: the scale is amax / qmax."""
    if dtype == DType.fp8e4m3:
        if bits != 8:
            raise OpError(f"fp8e4m3 quantization stores 8 bits, got bits={bits}")
        return FP8_MAX
    if dtype == DType.int8 and bits in (8, 4):
        return float(2 ** (bits - 1) - 1)
    raise OpError(f"quantization to {dtype} with bits={bits} is not supported (int8 with 8 or 4 bits, or fp8e4m3)")


def unit_error(dtype: DType, bits: int) -> float:
    """Worst |x - dq(q(x))| relative to the amax of x's scale group, from the bounds in the module doc."""
    return 2.0**-4 if dtype == DType.fp8e4m3 else 0.5 / qmax(dtype, bits)


def reduced_axes(rank: int, token_axis: int, granularity: str) -> tuple[int, ...]:
    """Axes a scale is shared over: the features of a token (per_token) or the tokens of a channel."""
    if granularity == "per_channel":
        return (token_axis,)
    return tuple(range(token_axis + 1, rank))


def quantized_bytes(t: TensorType, bits: int) -> int:
    """Bytes of a stored quantized tensor: 4-bit values pack two per byte."""
    return (numel(t) * bits + 7) // 8


def _check_quant(op: str, t: TensorType, a: dict, what: str) -> None:
    if t.dtype not in QUANT_DTYPES:
        raise OpError(f"{op}: {what} must be int8 or fp8e4m3 (quantized), got {t}")
    qmax(t.dtype, a["bits"])


def _check_scale(op: str, scale: TensorType, q: TensorType, what: str) -> None:
    """A scale is float32 with q's rank; each dim is q's or 1 (it broadcasts over its group)."""
    if scale.dtype != DType.f32 or scale.rank != q.rank:
        raise OpError(f"{op}: {what} scale must be f32 of rank {q.rank}, got {scale}")
    for i, (s, d) in enumerate(zip(scale.shape, q.shape)):
        if s != 1:
            same_dim(op, s, d, f"{what} scale dim {i} (1 or the value's)")


# ---- quantize / dequantize ----


def _quantize_rule(ins, a):
    (x,) = ins
    require_float("quantize", x)
    if x.rank < 2:
        raise OpError(f"quantize: needs a token axis and feature axes, got {x}")
    if a["dtype"] not in QUANT_DTYPES:
        raise OpError(f"quantize: dtype must be int8 or fp8e4m3, got {a['dtype']}")
    qmax(a["dtype"], a["bits"])
    t = axis_of(a["token_axis"], x.rank, "quantize")
    if t == x.rank - 1:
        raise OpError("quantize: token_axis must not be the last axis (the features follow it)")
    axes = reduced_axes(x.rank, t, a["granularity"])
    scale_shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    return [TensorType(a["dtype"], x.shape), TensorType(DType.f32, scale_shape)]


def quantize_ref(x: np.ndarray, dtype: DType, bits: int, token_axis: int, granularity: str) -> list[np.ndarray]:
    x = np.asarray(x, np.float64)
    top = qmax(dtype, bits)
    amax = np.abs(x).max(axis=reduced_axes(x.ndim, token_axis % x.ndim, granularity), keepdims=True)
    scale = (amax / top).astype(np.float32)  # q is computed against the stored scale, so q * scale is consistent
    s = scale.astype(np.float64)
    y = np.divide(x, s, out=np.zeros_like(x), where=s > 0)  # an all-zero group stays zero
    y = np.where(np.isnan(y), 0.0, np.clip(y, -top, top))  # NaN has no int8 code; the NaN scale carries it
    q = np.rint(y).astype(np.int8) if dtype == DType.int8 else round_to(y, DType.fp8e4m3)
    return [q, scale]


def _quantize_cost(ins, outs, a):
    (x,) = ins
    q, scale = outs
    # |x| and a max per element for the scale, then a divide and a round.
    return Cost(4 * numel(x), bytes_of([x, scale]) + quantized_bytes(q, a["bits"]))


def _not_differentiable(fb, op, cotangents):
    raise OpError(
        f"{op.name} is not differentiable: KV quantization (the kv-quant pass) is an inference transform; "
        "differentiate the model before running kv-quant"
    )


BITS = AttrSpec("int", 8, (8, 4))

register(
    OpDef(
        "quantize",
        "Symmetric quantization to int8 (bits 8 or 4) or fp8e4m3 with a float32 scale = amax/qmax per group "
        "(per_token: the axes after token_axis; per_channel: token_axis); returns (q, scale).",
        ("x",),
        _quantize_rule,
        lambda ins, a: quantize_ref(ins[0], a["dtype"], a["bits"], a["token_axis"], a["granularity"]),
        _quantize_cost,
        {
            "dtype": AttrSpec("dtype", DType.int8, QUANT_DTYPES),
            "bits": BITS,
            "granularity": AttrSpec("str", "per_token", GRANULARITIES),
            "token_axis": AttrSpec("int", 1),
        },
        vjp=_not_differentiable,
    )
)


def _dequantize_rule(ins, a):
    q, scale = ins
    _check_quant("dequantize", q, a, "q")
    _check_scale("dequantize", scale, q, "q")
    if not a["dtype"].is_float or a["dtype"] == DType.fp8e4m3:
        raise OpError(f"dequantize: result dtype must be f32, bf16 or f16, got {a['dtype']}")
    return [TensorType(a["dtype"], q.shape)]


def dequantize_ref(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(q, np.float64) * np.asarray(scale, np.float64)


def _dequantize_cost(ins, outs, a):
    q, scale = ins
    return Cost(numel(q), quantized_bytes(q, a["bits"]) + bytes_of([scale] + outs))


def _dequantize_vjp(fb, op, cotangents):
    """y = q * scale: dscale = sum over each group of g * q; dq = g * scale (fp8 q only: int8 has no gradient)."""
    q, scale = op.operands
    (g,) = cotangents
    if g is None:
        return [None, None]
    g32 = g if g.type.dtype == DType.f32 else fb.cast(g, dtype=DType.f32)
    d_scale = unbroadcast(fb, fb.mul(g32, fb.cast(q, dtype=DType.f32)), scale.type)
    d_q = fb.cast(fb.mul(g32, scale), dtype=q.type.dtype) if q.type.dtype.is_float else None
    return [d_q, d_scale]


register(
    OpDef(
        "dequantize",
        "q * scale (scale broadcast over its group) as a float tensor of `dtype`; bits only sets the stored size.",
        ("q", "scale"),
        _dequantize_rule,
        lambda ins, a: [dequantize_ref(*ins)],
        _dequantize_cost,
        {"dtype": AttrSpec("dtype", DType.f32), "bits": BITS},
        vjp=_dequantize_vjp,
    )
)


# ---- attention on quantized K/V ----
#
# The quantized ops wrap whichever attention form the graph had: `attention`, `block_sparse_attention` (a
# layout), or `tiled_attention` (sparse-attention-tiling ran first: the block map and counts follow as two more
# operands). They carry the union of those ops' attributes and delegate type rule, reference and cost to the
# wrapped op on dequantized K/V, so the masking and tiling semantics have one definition.

ATTENTION_ATTRS = {"scale": AttrSpec("float"), **TILE_ATTRS, **MASK_ATTRS, "bits": BITS}


def inner_attention(a: dict, n_maps: int, op: str) -> tuple[OpDef, dict]:
    """The attention op a quantized op computes on dequantized K/V, and its attributes."""
    if n_maps == 2:
        name, keys = "tiled_attention", ("scale", *TILE_ATTRS, *MASK_ATTRS)
    elif n_maps == 0 and a["layout_block"]:
        name, keys = "block_sparse_attention", ("scale", *MASK_ATTRS)
    elif n_maps == 0:
        name, keys = "attention", ("scale", "causal", "window", "sinks")
    else:
        raise OpError(f"{op}: takes no block map (dense) or block_map and counts (tiled), got {n_maps} operands")
    return registry.get(name), {k: a[k] for k in keys}


def _inner_rule(op: str, a: dict, ins: list[TensorType], maps: list[TensorType]) -> list[TensorType]:
    inner, attrs = inner_attention(a, len(maps), op)
    try:
        return inner.type_rule(ins + maps, attrs)
    except OpError as e:
        raise OpError(f"{op}: {e}") from None


def _kvq_rule(ins, a):
    q, kq, ks, vq, vs, *maps = ins
    for t, s, what in ((kq, ks, "k"), (vq, vs, "v")):
        _check_quant("attention_kvq", t, a, what)
        _check_scale("attention_kvq", s, t, what)
    if kq.dtype != vq.dtype:
        raise OpError(f"attention_kvq: k and v must share a storage dtype, got {kq} and {vq}")
    require_float("attention_kvq", q)
    return _inner_rule("attention_kvq", a, [q, kq.with_dtype(q.dtype), vq.with_dtype(q.dtype)], maps)


def _kvq_ref(ins, a):
    q, kq, ks, vq, vs, *maps = ins
    inner, attrs = inner_attention(a, len(maps), "attention_kvq")
    return inner.reference([q, dequantize_ref(kq, ks), dequantize_ref(vq, vs), *maps], attrs)


def _kvq_cost(ins, outs, a):
    q, kq, ks, vq, vs, *maps = ins
    inner, attrs = inner_attention(a, len(maps), "attention_kvq")
    flops = inner.cost([q, kq.with_dtype(q.dtype), vq.with_dtype(q.dtype), *maps], outs, attrs).flops
    dequant = numel(kq) + numel(vq)  # one multiply per element, done on the fly inside the kernel
    stored = quantized_bytes(kq, a["bits"]) + quantized_bytes(vq, a["bits"]) + bytes_of([q, ks, vs, *maps, *outs])
    return Cost(flops + dequant, stored)


register(
    OpDef(
        "attention_kvq",
        "attention(q, k_q*k_scale, v_q*v_scale) with the dequantization inside: K/V are read as int8/fp8 "
        "(4-bit packed when bits=4) plus float32 scales; with block_map and counts it is tiled_attention, with a "
        "layout block_sparse_attention.",
        ("q", "k_q", "k_scale", "v_q", "v_scale", "*block_map"),
        _kvq_rule,
        _kvq_ref,
        _kvq_cost,
        ATTENTION_ATTRS,
        vjp=_not_differentiable,
    )
)


# ---- absorbed MLA on a quantized latent cache ----


def _mla_types(q: TensorType, lq: TensorType, rq: TensorType) -> tuple[TensorType, TensorType, TensorType]:
    """Types of the inner MQA: q [B,H,Sq,C+dr] in latent space, k = [latent | k_rot] and v = latent, one head."""
    b, h, sq, _ = q.shape
    skv, c, dr = lq.shape[1], lq.shape[2], rq.shape[3]
    if not (isinstance(c, int) and isinstance(dr, int)):
        raise OpError(f"mla_attention_kvq: the latent rank and rotary dim must be static, got {lq} and {rq}")
    return (
        TensorType(q.dtype, (b, h, sq, c + dr)),
        TensorType(q.dtype, (b, 1, skv, c + dr)),
        TensorType(q.dtype, (b, 1, skv, c)),
    )


def _mla_rule(ins, a):
    q, lq, ls, rq, rs, w, *maps = ins
    op = "mla_attention_kvq"
    require_rank(op, q, 4, "q [B, H, Sq, dn+dr]")
    require_rank(op, lq, 3, "latent [B, Skv, C]")
    require_rank(op, rq, 4, "k_rot [B, Skv, 1, dr]")
    require_rank(op, w, 2, "kv_b weight [H*(dn+dv), C]")
    require_float(op, q)
    if w.dtype != q.dtype:
        raise OpError(f"{op}: kv_b weight {w} must have q's dtype {q.dtype}")
    for t, s, what in ((lq, ls, "latent"), (rq, rs, "k_rot")):
        _check_quant(op, t, a, what)
        _check_scale(op, s, t, what)
    b, h, _, dk = q.shape
    dn, dv = a["qk_nope_head_dim"], a["v_head_dim"]
    same_dim(op, lq.shape[0], b, "batch of latent and q")
    same_dim(op, rq.shape[0], b, "batch of k_rot and q")
    same_dim(op, rq.shape[1], lq.shape[1], "length of k_rot and latent")
    same_dim(op, rq.shape[2], 1, "k_rot heads (one rotary key shared by all heads)")
    same_dim(op, dk, dn + rq.shape[3], "q head dim and qk_nope_head_dim + k_rot dim")
    same_dim(op, w.shape[1], lq.shape[2], "kv_b weight input and latent rank")
    same_dim(op, w.shape[0], dims.mul(h, dn + dv), "kv_b weight rows and heads * (qk_nope_head_dim + v_head_dim)")
    _inner_rule(op, a, list(_mla_types(q, lq, rq)), maps)
    return [TensorType(q.dtype, (b, h, q.shape[2], dv))]


def _mla_ref(ins, a):
    """Absorbed MLA: q_nope goes through W_UK into latent space, scores read the latent and the shared rotary
    key, values are the latent, and W_UV maps the result back per head (one MQA attention over the latent)."""
    q, lq, ls, rq, rs, w, *maps = ins
    q, w = np.asarray(q, np.float64), np.asarray(w, np.float64)
    dn, dv = a["qk_nope_head_dim"], a["v_head_dim"]
    h, c = q.shape[1], lq.shape[2]
    w = w.reshape(h, dn + dv, c)
    w_uk, w_uv = w[:, :dn], w[:, dn:]
    latent = dequantize_ref(lq, ls)[:, None]  # [B, 1, Skv, C]: one kv head shared by all query heads
    k_rot = dequantize_ref(rq, rs).transpose(0, 2, 1, 3)  # [B, 1, Skv, dr]
    q_lat = np.einsum("bhsd,hdc->bhsc", q[..., :dn], w_uk)
    qk = np.concatenate([q_lat, q[..., dn:]], axis=-1)
    kk = np.concatenate([latent, k_rot], axis=-1)
    inner, attrs = inner_attention(a, len(maps), "mla_attention_kvq")
    (o_lat,) = inner.reference([qk, kk, latent, *maps], attrs)
    return [np.einsum("bhsc,hec->bhse", o_lat, w_uv)]


def _mla_cost(ins, outs, a):
    q, lq, ls, rq, rs, w, *maps = ins
    b, h, sq, _ = q.shape
    c = lq.shape[2]
    qk, kk, v = _mla_types(q, lq, rq)
    inner, attrs = inner_attention(a, len(maps), "mla_attention_kvq")
    flops = inner.cost([qk, kk, v, *maps], [TensorType(q.dtype, (b, h, sq, c))], attrs).flops
    absorb = 2 * b * h * sq * c * (a["qk_nope_head_dim"] + a["v_head_dim"])  # q_nope via W_UK, output via W_UV
    dequant = numel(lq) + numel(rq)
    stored = quantized_bytes(lq, a["bits"]) + quantized_bytes(rq, a["bits"]) + bytes_of([q, ls, rs, w, *maps, *outs])
    return Cost(flops + absorb + dequant, stored)


register(
    OpDef(
        "mla_attention_kvq",
        "MLA attention in absorbed form on a quantized cache: latent [B,Skv,C] and shared rotary key "
        "[B,Skv,1,dr] as int8/fp8 plus scales, kv_b weight [H*(dn+dv), C]; q [B,H,Sq,dn+dr] -> [B,H,Sq,dv]. "
        "Equals attention(q, [latent W_UK^T | k_rot], latent W_UV^T) on the dequantized cache; block_map and "
        "counts make the inner attention tiled, a layout block-sparse.",
        ("q", "latent_q", "latent_scale", "k_rot_q", "k_rot_scale", "kv_b_weight", "*block_map"),
        _mla_rule,
        _mla_ref,
        _mla_cost,
        {**ATTENTION_ATTRS, "qk_nope_head_dim": AttrSpec("int"), "v_head_dim": AttrSpec("int")},
        vjp=_not_differentiable,
    )
)
