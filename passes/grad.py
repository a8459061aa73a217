"""Reverse-mode autodiff as an IR transform (docs/autodiff.md).

`grad{function="loss"}` adds `@loss_grad`: the forward ops of `@loss` copied, then the VJP of every op on a
path from a parameter to the loss, in reverse order. Its results are the loss and the gradient of each
float parameter `@loss` reads, in `module.params` order; that order is recorded in the module attribute
`grad_params.loss` so a runtime needs no guessing.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.ir import registry
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.ops.grad_util import accumulate, scalar, zeros
from r1c.ir.verifier import verify
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import clone_module, erase_dead

CHECKPOINT_MODES = ("none", "layer")
_LAYER = re.compile(r"^(model\.layers\.\d+)(?:\.|$)")


class GradError(ValueError):
    pass


def layer_of(op: Op) -> str | None:
    """The `model.layers.N` prefix of an op's loc: the unit that `checkpoint="layer"` recomputes."""
    match = _LAYER.match(op.loc or "")
    return match.group(1) if match else None


def active_ops(f: Function, outputs: set[Value], leaves: set[Value] = frozenset()) -> list[Op]:
    """Ops on a path from a float parameter (or a float leaf value) to an output: the only ones whose VJP is
    needed."""
    varied: set[Value] = set(leaves)
    for op in f.body:
        if op.name == "param" or any(v in varied for v in op.operands):
            varied.update(r for r in op.results if r.type.dtype.is_float)
    useful: set[Value] = set(outputs)
    active: list[Op] = []
    for op in reversed(f.body):
        if any(r in useful for r in op.results) and any(r in varied for r in op.results):
            active.append(op)
            useful.update(v for v in op.operands if v in varied)
    return active[::-1]


class _Emitter:
    """Re-emits ops of the source function into the gradient function, mapping source values to new ones."""

    def __init__(self, fb: FunctionBuilder) -> None:
        self.fb = fb
        self.env: dict[Value, Value] = {}

    def emit(self, op: Op, env: dict[Value, Value]) -> None:
        if op.name == "param":
            env[op.result] = self.fb.param(op.attrs["name"])
            return
        with _at(self.fb, op.loc):
            out = self.fb.op(op.name, *(env[v] for v in op.operands), **op.attrs)
        env.update(zip(op.results, out if isinstance(out, tuple) else (out,)))


def _at(fb: FunctionBuilder, loc: str | None) -> AbstractContextManager:
    """Emit under the source op's loc: copies, recomputations and backward ops stay attributed to their layer."""
    return fb.scope(loc) if loc else nullcontext()


def grad_function(module: Module, function: str = "loss", checkpoint: str = "none") -> Module:
    """A copy of `module` with `@<function>_grad` added (see the module docstring)."""
    if checkpoint not in CHECKPOINT_MODES:
        raise GradError(f"grad: checkpoint must be one of {list(CHECKPOINT_MODES)}, got {checkpoint!r}")
    if function not in module.functions:
        raise GradError(f"grad: module @{module.name} has no function @{function} (has {sorted(module.functions)})")
    src = module.functions[function]
    out_name = f"{function}_grad"
    if out_name in module.functions:
        raise GradError(f"grad: module @{module.name} already has a function @{out_name}")
    if len(src.results) != 1 or src.results[0].type.rank != 0 or not src.results[0].type.dtype.is_float:
        got = ", ".join(str(r.type) for r in src.results)
        raise GradError(f"grad: @{function} must return one float scalar (the loss), it returns {got or 'nothing'}")
    (loss,) = src.results

    mb = ModuleBuilder(module.name)
    mb.module = clone_module(module)
    fb = mb.function(out_name, **{a.name: a.type for a in src.args})
    em = _Emitter(fb)
    fwd = dict(zip(src.args, fb.args))
    for op in src.body:
        em.emit(op, fwd)

    active = active_ops(src, {loss})
    segments = _segments(src.body) if checkpoint == "layer" else {}
    recomputed: dict[int, dict[Value, Value]] = {}
    cts: dict[Value, Value | None] = {loss: scalar(fb, 1.0, loss.type.dtype)}
    for op in reversed(active):
        if op.name == "param":  # a leaf: its accumulated cotangent is the gradient
            continue
        seed = [cts.pop(r, None) for r in op.results]
        if all(c is None for c in seed):
            continue
        env = fwd
        seg = segments.get(id(op))
        if seg is not None:  # checkpointing: values inside the layer are recomputed here, from its inputs
            if id(seg) not in recomputed:
                recomputed[id(seg)] = _recompute(em, seg, fwd)
            env = recomputed[id(seg)]
        for v, g in zip(op.operands, _vjp(fb, op, env, seed)):
            if g is not None:
                cts[v] = accumulate(fb, cts.get(v), g)

    names, grads = _param_grads(fb, src, fwd, cts, module)
    fb.ret(fwd[loss], *grads)
    erase_dead(fb.function)
    mb.module.attrs[f"grad_params.{function}"] = tuple(names)
    return verify(mb.module)


def _vjp(fb: FunctionBuilder, op: Op, env: dict[Value, Value], seed: list[Value | None]) -> list[Value | None]:
    rule = registry.get(op.name).vjp
    where = f"'{op.name}' defining {', '.join(str(r) for r in op.results)}" + (f" (at {op.loc})" if op.loc else "")
    if rule is None:
        raise GradError(f"grad: op {where} has no VJP rule; it is on the path from a parameter to the loss")
    view = Op(op.name, tuple(env[v] for v in op.operands), tuple(env[r] for r in op.results), op.attrs, op.loc)
    with _at(fb, op.loc):
        out = rule(fb, view, seed)
    if len(out) != len(op.operands):
        raise GradError(f"grad: the VJP of {where} gave {len(out)} cotangents for {len(op.operands)} operands")
    for v, g in zip(view.operands, out):
        if g is not None and g.type != v.type:
            raise GradError(f"grad: the VJP of {where} gave {g.type} for operand {v} of type {v.type}")
    return out


def _segments(body: list[Op]) -> dict[int, list[Op]]:
    """Ops grouped into maximal runs of one layer: id(op) -> its run (the ops to recompute; dead copies of ops
    the backward does not read are dropped afterwards)."""
    out: dict[int, list[Op]] = {}
    run: list[Op] = []
    for op in body:
        if op.name == "param":  # params carry no loc and stay live anyway: they must not split a layer
            continue
        if run and layer_of(op) != layer_of(run[0]):
            run = []
        if layer_of(op) is not None:
            run.append(op)
            out[id(op)] = run
    return out


def _recompute(em: _Emitter, seg: list[Op], fwd: dict[Value, Value]) -> dict[Value, Value]:
    """Re-emit the forward ops of a layer; their results map to the new copies, everything else to the forward."""
    env = dict(fwd)
    for op in seg:
        em.emit(op, env)
    return env


def _param_grads(
    fb: FunctionBuilder, src: Function, fwd: dict[Value, Value], cts: dict[Value, Value | None], module: Module
) -> tuple[list[str], list[Value]]:
    """Gradients of the float parameters `src` reads, in module.params order (zeros where no path reaches)."""
    read = {op.attrs["name"]: op.result for op in src.body if op.name == "param"}
    names = [n for n in module.params if n in read and module.params[n].type.dtype.is_float]
    grads = [cts.get(read[n]) or zeros(fb, fwd[read[n]].type) for n in names]
    return names, grads


@register_pass(
    "grad",
    "Reverse-mode autodiff: add @<function>_grad returning the loss and every parameter gradient (order in attr "
    'grad_params.<function>); checkpoint="layer" recomputes each model.layers.N in the backward.',
)
def grad(module: Module, *, function: str = "loss", checkpoint: str = "none") -> Module:
    return grad_function(module, function, checkpoint)
