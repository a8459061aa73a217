"""How much of the forward a gradient function keeps live across its backward: the memory that gradient
checkpointing trades for recomputation."""

from __future__ import annotations

from dataclasses import dataclass

from r1c.ir.core import Function, Value
from r1c.ir.types import DType


@dataclass(frozen=True)
class Liveness:
    values: int  # forward activations (not parameters or arguments) still read after the loss is computed
    elements: dict[str, int]  # their element counts per dtype, for the given symbolic-dim bindings

    def bytes(self) -> int:
        return sum(DType(d).itemsize * n for d, n in self.elements.items())


def live_across_backward(f: Function, env: dict[str, int] | None = None) -> Liveness:
    """Forward values of a `<function>_grad` function that are used after the op defining the loss (its first
    result): what must stay in memory from the forward into the backward."""
    loss = f.results[0]
    split = next((i for i, op in enumerate(f.body) if loss in op.results), None)
    if split is None:
        raise ValueError(f"@{f.name}: the loss %{loss.name} is not computed by an op of the function")
    forward = {r for op in f.body[: split + 1] if op.name != "param" for r in op.results}
    used_later: set[Value] = {v for op in f.body[split + 1 :] for v in op.operands} | set(f.results[1:])
    live = sorted((v for v in forward & used_later), key=lambda v: v.name)
    elements: dict[str, int] = {}
    for v in live:
        n = 1
        for d in v.type.concrete(env or {}):
            n *= d
        elements[v.type.dtype.value] = elements.get(v.type.dtype.value, 0) + n
    return Liveness(len(live), elements)
