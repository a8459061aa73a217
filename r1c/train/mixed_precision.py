"""Mixed precision: a function computes in bf16 while its parameters stay f32 master weights.

Every f32 parameter read gets a cast to the compute dtype, and every f32 the function makes (constants, casts,
one-hot masks) is made in the compute dtype instead, so each op runs in bf16 (the reference interpreter rounds each
result to bf16). The gradient of a cast is cast back, so parameter gradients (and the optimizer state) stay f32.
Float results are cast back to f32.
"""

from __future__ import annotations

from r1c.build import FunctionBuilder
from r1c.ir.core import Module, Op, Value
from r1c.ir.types import DType
from r1c.ir.verifier import verify
from r1c.train.rebuild import rebuild


class MixedPrecisionError(ValueError):
    pass


def to_mixed_precision(module: Module, function: str = "loss", dtype: DType = DType.bf16) -> Module:
    if function not in module.functions:
        raise MixedPrecisionError(f"mixed precision: module @{module.name} has no function @{function}")
    if dtype not in (DType.bf16, DType.f16):
        raise MixedPrecisionError(f"mixed precision computes in bf16 or f16, not {dtype}")
    f = module.functions[function]
    if any(a.type.dtype == DType.f32 for a in f.args):
        names = ", ".join(str(a) for a in f.args if a.type.dtype == DType.f32)
        raise MixedPrecisionError(f"mixed precision: @{function} takes f32 inputs ({names}); it expects token ids")

    def rewrite(fb: FunctionBuilder, op: Op, operands: list[Value]) -> tuple[Value, ...] | None:
        if op.name == "param":
            p = fb.param(op.attrs["name"])
            return (fb.cast(p, dtype=dtype) if p.type.dtype == DType.f32 else p,)
        if op.attrs.get("dtype") == DType.f32:
            out = fb.op(op.name, *operands, **{**op.attrs, "dtype": dtype})
            return out if isinstance(out, tuple) else (out,)
        return None

    out = rebuild(module, function, rewrite)
    fn = out.functions[function]
    narrow = [r for r in fn.results if r.type.dtype == dtype]
    if narrow:  # the loss comes out of cross_entropy in f32 already; anything else is widened back
        raise MixedPrecisionError(
            f"mixed precision: @{function} would return {', '.join(str(r.type) for r in narrow)}; return f32 values"
        )
    return verify(out)
