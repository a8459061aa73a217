"""kv-quant for paged steps: a function whose argument is a paged latent pool (ir/ops/paged.py) gets a quantized
pool instead, the pool argument becoming int8/fp8e4m3 codes plus an f32 scale pool right after it, and the
function's results carrying both the same way; paged_write becomes paged_write_q (each token quantized as written)
and paged_mla_attention becomes paged_mla_attention_kvq.

Scales are per token (the only granularity a cache that grows a token at a time can keep, since a per-channel scale
would change under the tokens already stored) and per group of gcd(kv_lora_rank, rotary dim) channels: the rotary
key never shares a scale with the normalized latent, whose range differs, and for DeepSeek's 512 + 64 channels a
token has nine 64-channel scales.
"""

from __future__ import annotations

import math

from r1c.ir import registry
from r1c.ir.core import Function, Op, Value
from r1c.ir.types import DType, TensorType
from r1c.passes.registry import PipelineError
from r1c.passes.rewrite import NameGen

PAGED_OPS = ("paged_write", "paged_mla_attention")


def _pool(op: Op) -> Value:
    return op.operands[1 if op.name == "paged_mla_attention" else 0]


def has_float_pool(f: Function) -> bool:
    """Whether `f` reads a float paged pool (an unquantized paged step)."""
    return any(op.name in PAGED_OPS and _pool(op).type.dtype.itemsize > 1 for op in f.body)


def _groups(f: Function) -> int:
    """Scale groups per token: channels / gcd(latent rank, rotary dim), read off an attention on the pool."""
    for op in f.body:
        if op.name == "paged_mla_attention":
            latent = op.operands[4].type.shape[1]
            rotary = op.operands[0].type.shape[3] - op.attrs["qk_nope_head_dim"]
            if isinstance(latent, int) and isinstance(rotary, int) and rotary > 0:
                return (latent + rotary) // math.gcd(latent, rotary)
    return 1  # a pool nothing attends over: one scale per token


def _emit(name: str, operands: tuple[Value, ...], results: tuple[Value, ...], op: Op) -> Op:
    attrs = registry.get(name).complete_attrs(op.attrs)
    types = registry.get(name).infer([x.type for x in operands], attrs)
    if types != [r.type for r in results]:
        raise PipelineError(f"kv-quant: {name} would change the types of {', '.join(str(r) for r in results)}")
    return Op(name, operands, results, attrs, op.loc)


def rewrite_paged(f: Function, dtype: DType, bits: int) -> None:
    """Quantize every float pool argument of `f` and the paged ops that read or write it."""
    if bits != 8:
        raise PipelineError(f"kv-quant: @{f.name} has a paged cache; paged pools store 8-bit codes, not bits={bits}")
    names = NameGen(f)
    pools = {_pool(op) for op in f.body if op.name in PAGED_OPS}
    scaled: dict[Value, tuple[Value, Value]] = {}  # float pool value -> (codes, scales)
    args: list[Value] = []
    for a in f.args:
        if a not in pools or a.type.dtype.itemsize == 1:
            args.append(a)
            continue
        shape = a.type.shape
        codes = Value(a.name, TensorType(dtype, shape))
        scales = Value(names.fresh(f"{a.name}_scale"), TensorType(DType.f32, (*shape[:3], _groups(f))))
        scaled[a] = (codes, scales)
        args += [codes, scales]
    body: list[Op] = []
    for op in f.body:
        if op.name in PAGED_OPS and _pool(op).type.dtype.itemsize > 1 and _pool(op) not in scaled:
            raise PipelineError(
                f"kv-quant: @{f.name}: {op.name} reads pool %{_pool(op).name}, which is neither an "
                "argument of the function nor written by a paged_write"
            )
        if op.name == "paged_write" and op.operands[0] in scaled:
            codes, scales = scaled[op.operands[0]]
            r = op.results[0]
            new = (Value(r.name, TensorType(dtype, r.type.shape)), Value(names.fresh(f"{r.name}_scale"), scales.type))
            body.append(_emit("paged_write_q", (codes, scales, *op.operands[1:]), new, op))
            scaled[r] = new
        elif op.name == "paged_mla_attention" and op.operands[1] in scaled:
            q, pool, *rest = op.operands
            body.append(_emit("paged_mla_attention_kvq", (q, *scaled[pool], *rest), op.results, op))
        else:
            if any(x in scaled for x in op.operands):
                raise PipelineError(f"kv-quant: @{f.name}: {op.name} reads the paged pool; only paged ops may")
            body.append(op)
    results: list[Value] = []
    for r in f.results:
        results += list(scaled[r]) if r in scaled else [r]
    f.args, f.body, f.results = args, body, results
