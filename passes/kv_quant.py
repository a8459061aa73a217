"""kv-quant: store the KV cache as int8 / 4-bit / fp8e4m3 and let attention dequantize it on the fly.

For each attention (`attention`, `block_sparse_attention`, or `tiled_attention` when sparse-attention-tiling
ran first) of the rewritten functions:
- MLA (see kv_quant_match): the cache is the latent and the shared rotary key, so those two are quantized and
  the attention becomes `mla_attention_kvq`, the absorbed form that reads the quantized latent directly (the
  per-head K/V expansion through kv_b_proj disappears from the graph);
- otherwise K and V themselves are quantized (KIVI: keys per channel, values per token) and the attention
  becomes `attention_kvq`.
The quantized ops keep the original op's mask and tiling attributes (and its block map operands).
K/V that are already 8-bit or narrower stay as they are, so the pass is idempotent. Only the entry function
is rewritten by default: other functions (`@loss`) are training graphs, and quantization is not differentiable.

Per-channel scales span every token of the sequence in the graph (the cache written by a prefill), so with
them a token's dequantized key depends, through the shared scale, on later tokens of its channel; the effect
is bounded by the quantization error. per_token scales are strictly causal.
"""

from __future__ import annotations

from typing import Any

from r1c.ir import registry
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.ops.quant import GRANULARITIES, QUANT_DTYPES, qmax, unit_error
from r1c.ir.registry import OpError
from r1c.ir.types import DType
from r1c.passes.kv_quant_match import match_mla
from r1c.passes.kv_quant_paged import has_float_pool, rewrite_paged
from r1c.passes.registry import PipelineError, register_pass
from r1c.passes.rewrite import NameGen, is_pure

# Max relative logit error per unit of element error (unit_error: the format's worst |x - dq(q(x))| / amax of
# the scale group), measured by bench/kv_quant_error.py on r1-tiny with dense FFNs, where the logits are a
# smooth function of the cache (worst over 16 seeds and int8/int4/fp8: 1.86), doubled as a margin. MoE routing
# flips are jumps no error-proportional bound covers; docs/passes.md (## kv-quant) has the numbers.
AMPLIFICATION = 4.0


def kv_quant_tolerance(options: dict[str, Any]) -> float:
    """The numerics check's allowance for kv-quant: the element error model times the measured amplification."""
    return AMPLIFICATION * unit_error(options["dtype"], options["bits"])


class _Rewriter:
    """Emits the quantized form of one function's attention ops; each cached value is quantized once."""

    def __init__(self, f: Function, dtype: DType, bits: int) -> None:
        self.names = NameGen(f)
        self.dtype, self.bits = dtype, bits
        self.out: list[Op] = []
        self.quantized: dict[tuple[Value, int, str], tuple[Value, Value]] = {}

    def emit(self, name: str, operands: tuple[Value, ...], hints: tuple[str, ...], loc: str | None, **attrs) -> Op:
        opdef = registry.get(name)
        full = opdef.complete_attrs(attrs)
        types = opdef.infer([v.type for v in operands], full)
        op = Op(name, operands, tuple(Value(self.names.fresh(h), t) for h, t in zip(hints, types)), full, loc)
        self.out.append(op)
        return op

    def quantize(self, x: Value, token_axis: int, granularity: str, loc: str | None) -> tuple[Value, Value]:
        key = (x, token_axis, granularity)
        if key not in self.quantized:
            op = self.emit(
                "quantize",
                (x,),
                (f"{x.name}.q", f"{x.name}.scale"),
                loc,
                dtype=self.dtype,
                bits=self.bits,
                granularity=granularity,
                token_axis=token_axis,
            )
            self.quantized[key] = (op.results[0], op.results[1])
        return self.quantized[key]


# The attention forms the pass rewrites; tiled_attention's block map and counts follow q, k, v.
ATTENTION_OPS = ("attention", "block_sparse_attention", "tiled_attention")


def _rewrite(op: Op, producers: dict[Value, Op], rw: _Rewriter, grans: dict[str, str]) -> Op:
    """The quantized-cache replacement of attention `op`; it defines the same result value."""
    q, k, v, *maps = op.operands
    mla = match_mla(k, v, producers)
    if mla is not None:
        latent = rw.quantize(mla.latent, 1, grans["latent"], op.loc)
        k_rot = rw.quantize(mla.k_rot, 1, grans["key"], op.loc)
        operands = (q, *latent, *k_rot, mla.weight, *maps)
        name, extra = "mla_attention_kvq", {"qk_nope_head_dim": mla.qk_nope_head_dim, "v_head_dim": mla.v_head_dim}
    else:
        key, value = rw.quantize(k, 2, grans["key"], op.loc), rw.quantize(v, 2, grans["value"], op.loc)
        operands = (q, *key, *value, *maps)
        name, extra = "attention_kvq", {}
    opdef = registry.get(name)
    attrs = opdef.complete_attrs({**op.attrs, "bits": rw.bits, **extra})  # the mask and tiling carry over
    if opdef.infer([x.type for x in operands], attrs) != [op.result.type]:
        raise OpError(f"kv-quant: {name} would change the type of %{op.result.name}")
    return Op(name, operands, op.results, attrs, op.loc)


def _erase_unused(f: Function, candidates: list[Op]) -> None:
    """Drop the ops that only fed rewritten attention (the per-head K/V expansion), and nothing else."""
    uses: dict[Value, int] = {v: 0 for v in f.values()}
    for op in f.body:
        for x in op.operands:
            uses[x] += 1
    for r in f.results:
        uses[r] += 1
    producers = f.producers()
    dead: set[int] = set()
    while candidates:
        op = candidates.pop()
        if id(op) in dead or not is_pure(op) or any(uses[r] for r in op.results):
            continue
        dead.add(id(op))
        for x in op.operands:
            uses[x] -= 1
            if x in producers:
                candidates.append(producers[x])
    f.body = [op for op in f.body if id(op) not in dead]


def _rewrite_function(f: Function, dtype: DType, bits: int, grans: dict[str, str]) -> None:
    producers = f.producers()
    rw = _Rewriter(f, dtype, bits)
    replaced: list[Op] = []
    for op in f.body:
        # K/V already stored in 8 bits or fewer are left alone: the pass is idempotent.
        if op.name in ATTENTION_OPS and op.operands[1].type.dtype.itemsize > 1:
            rw.out.append(_rewrite(op, producers, rw, grans))
            replaced += [producers[x] for x in op.operands if x in producers]
        else:
            rw.out.append(op)
    f.body = rw.out
    _erase_unused(f, replaced)


def _check_options(module: Module, dtype: DType, bits: int, grans: dict[str, str], functions: str) -> list[str]:
    if dtype not in QUANT_DTYPES:
        raise PipelineError(f"kv-quant: dtype must be int8 or fp8e4m3, got {dtype}")
    try:
        qmax(dtype, bits)
    except OpError as e:
        raise PipelineError(f"kv-quant: {e}") from None
    for what, g in grans.items():
        if g not in GRANULARITIES:
            raise PipelineError(f"kv-quant: {what}_granularity must be one of {', '.join(GRANULARITIES)}, got {g!r}")
    # Paged steps (ir/ops/paged.py) are inference-only by construction, so they are rewritten by default too,
    # when their 8-bit pools can hold the format (4-bit applies to the other functions; naming a paged one fails).
    paged = [n for n, f in module.functions.items() if has_float_pool(f) and n != module.main.name and bits == 8]
    names = [n.strip() for n in functions.split(",") if n.strip()] or [module.main.name, *paged]
    missing = [n for n in names if n not in module.functions]
    if missing:
        raise PipelineError(f"kv-quant: module @{module.name} has no function(s) {', '.join('@' + n for n in missing)}")
    return names


@register_pass(
    "kv-quant",
    "Store the KV cache (MLA: latent + rotary key) as int8/4-bit/fp8e4m3 with per-token or per-channel scales; "
    "attention dequantizes inside (attention_kvq, absorbed mla_attention_kvq).",
    tolerance=kv_quant_tolerance,
)
def kv_quant(
    module: Module,
    *,
    dtype: DType = DType.int8,
    bits: int = 8,
    key_granularity: str = "per_channel",
    value_granularity: str = "per_token",
    latent_granularity: str = "per_token",
    functions: str = "",
) -> Module:
    """`functions`: comma-separated names to rewrite (empty: the entry function and, with 8 bits, every paged step)."""
    grans = {"key": key_granularity, "value": value_granularity, "latent": latent_granularity}
    for name in _check_options(module, dtype, bits, grans, functions):
        f = module.functions[name]
        if has_float_pool(f):
            rewrite_paged(f, dtype, bits)
        _rewrite_function(f, dtype, bits, grans)
    return module
