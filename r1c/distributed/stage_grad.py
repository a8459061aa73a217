"""The backward of one pipeline stage: a vector-Jacobian product function built from the ops' VJP rules.

Why not partition `@loss_grad`: its backward ops are interleaved with the forward in one function, and a
pipeline stage must run its forward and its backward at different times (other micro-batches run in between).
Why not `grad` on sum(stage_output * cotangent): that gives parameter gradients only, while a stage must also
send the cotangent of every activation it received back to the previous stage.

So `stage_vjp` runs the same reverse-mode loop as the `grad` pass (`r1c.passes.grad`: `_vjp` applies each op's
registered rule, cotangents of multi-use values are summed with `add`), seeded with one cotangent argument per
float result of the stage instead of 1.0 at the loss. For a stage function F(inputs, received) -> outputs and
cotangents c of the outputs, `@<stage>.vjp(inputs, received, c)` returns

    (c^T dF/d received_i for each float received value, then c^T dF/d p for each parameter p the stage reads),

which is exact: the same VJP rules the single-process `@loss_grad` applies, on the same values. The
forward ops are copied first, so the function recomputes the stage's forward from what it received: a stage
only keeps its received activations per micro-batch in flight (the stage boundary is the checkpoint), and the
recomputed values are bit-for-bit those of the forward run (same ops, same inputs, same interpreter).
"""

from __future__ import annotations

from typing import Callable

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.ir.core import Function, Module, Value
from r1c.ir.ops.grad_util import accumulate, zeros
from r1c.passes.grad import _Emitter, _vjp, active_ops  # the grad pass's own analysis, copier and VJPs
from r1c.passes.rewrite import erase_dead

VJP_SUFFIX = ".vjp"


def float_values(values: list[Value]) -> list[Value]:
    return [v for v in values if v.type.dtype.is_float]


def stage_vjp(
    module: Module,
    stage: Function,
    received: list[Value],
    wrt: Callable[[str], bool] | None = None,
    extra: Callable[[FunctionBuilder, dict[Value, Value]], list[Value]] | None = None,
) -> tuple[Function, list[str]]:
    """Add `@<stage>.vjp` to `module` (in place) and return it with the names of the parameters whose gradients
    it returns after the received values' cotangents (module.params order, float parameters only; of those, the
    ones `wrt` accepts: LoRA's frozen weights get none). `extra(fb, env)` may add results after the gradients,
    computed from the recomputed forward (`env` maps the stage's values to the VJP's): the MoE expert loads.

    `received` are the stage's arguments that come from the previous stage; their float ones get cotangents.
    The function's arguments are the stage's arguments, then one cotangent per float result (same type)."""
    outputs = float_values(stage.results)
    recv_float = float_values(received)
    mb = ModuleBuilder(module.name)
    mb.module = module
    cot_args = {f"cot.{r.name}": r.type for r in outputs}
    fb: FunctionBuilder = mb.function(stage.name + VJP_SUFFIX, **{a.name: a.type for a in stage.args}, **cot_args)
    em = _Emitter(fb)
    fwd: dict[Value, Value] = dict(zip(stage.args, fb.args))
    for op in stage.body:
        em.emit(op, fwd)
    seeds = fb.args[len(stage.args) :]
    cts: dict[Value, Value | None] = {}
    for r, c in zip(outputs, seeds):
        # A value sent twice, or a received value forwarded unchanged, gets the sum of its cotangents.
        cts[r] = accumulate(fb, cts.get(r), c)
    for op in reversed(active_ops(stage, set(outputs), set(recv_float))):
        if op.name == "param":
            continue
        seed = [cts.pop(r, None) for r in op.results]
        if all(c is None for c in seed):
            continue
        for v, g in zip(op.operands, _vjp(fb, op, fwd, seed)):
            if g is not None:
                cts[v] = accumulate(fb, cts.get(v), g)
    read = {op.attrs["name"]: op.result for op in stage.body if op.name == "param"}
    names = [n for n in module.params if n in read and module.params[n].type.dtype.is_float and (not wrt or wrt(n))]
    recv_cts = [cts.get(v) or zeros(fb, fwd[v].type) for v in recv_float]
    grads = [cts.get(read[n]) or zeros(fb, fwd[read[n]].type) for n in names]
    fb.ret(*recv_cts, *grads, *(extra(fb, fwd) if extra else []))
    erase_dead(fb.function)  # forward copies no cotangent reads
    return fb.function, names
