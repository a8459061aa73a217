"""LoRA fine-tuning as an IR rewrite: `linear(x, W)` on a target projection becomes
`linear(x, W) + (alpha / rank) * linear(linear(x, A), B)` with new params `<proj>.lora_A.weight [rank, in]`
(normal init) and `<proj>.lora_B.weight [out, rank]` (zeros, so training starts from the base model exactly).
Only the adapters are trained (see `r1c.train.step`)."""

from __future__ import annotations

from r1c.build import FunctionBuilder
from r1c.ir.core import Module, Op, Value
from r1c.ir.types import TensorType
from r1c.ir.verifier import verify
from r1c.train.rebuild import Rewrite, rebuild

LORA_MARK = ".lora_"


class LoRAError(ValueError):
    pass


def apply_lora(module: Module, rank: int, alpha: float, targets: list[str], function: str = "loss") -> Module:
    """Add adapters to every `linear` whose weight param is `<...>.<target>.weight`, in every function."""
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise LoRAError("LoRA needs at least one target projection (e.g. q_b_proj,kv_b_proj,o_proj)")
    _check_targets(module, function, targets)
    std = float(module.attrs.get("init_std", 0.02))
    for name in list(module.functions):
        module = rebuild(module, name, _adapter(module.functions[name].producers(), targets, rank, alpha / rank, std))
    return verify(module)


def _adapter(producers: dict[Value, Op], targets: list[str], rank: int, scale: float, std: float) -> Rewrite:
    def rewrite(fb: FunctionBuilder, op: Op, operands: list[Value]) -> tuple[Value, ...] | None:
        weight = _weight_param(op, producers) if op.name == "linear" else None
        if weight is None or not any(weight.endswith(f".{t}.weight") for t in targets):
            return None
        x, w = operands
        out_dim, in_dim = w.type.shape
        base = weight[: -len(".weight")]
        a = fb.param(f"{base}.lora_A.weight", TensorType(w.type.dtype, (rank, in_dim)), f"normal({std})")
        b = fb.param(f"{base}.lora_B.weight", TensorType(w.type.dtype, (out_dim, rank)), "zeros")
        y = fb.linear(x, w)
        delta = fb.linear(fb.linear(x, a), b)
        return (fb.add(y, fb.mul(delta, fb.constant(value=scale, dtype=y.type.dtype, shape=()))),)

    return rewrite


def _weight_param(op: Op, producers: dict[Value, Op]) -> str | None:
    prod = producers.get(op.operands[1])
    return prod.attrs["name"] if prod is not None and prod.name == "param" else None


def _check_targets(module: Module, function: str, targets: list[str]) -> None:
    f = module.functions[function]
    producers = f.producers()
    projections = {
        _weight_param(op, producers).rsplit(".", 2)[-2]
        for op in f.body
        if op.name == "linear" and _weight_param(op, producers)
    }
    for t in targets:
        if t not in projections:
            stacked = any(".experts." in p and p.endswith(f".{t}") for p in module.params)
            why = "; routed experts are stacked moe_experts weights, not linear projections" if stacked else ""
            raise LoRAError(
                f"LoRA target '{t}' matches no linear projection of @{function}{why}; it has {sorted(projections)}"
            )
