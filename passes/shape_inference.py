"""Shape inference: re-derive every result type from the ops' type rules, in order, so types that went
stale after a rewrite (a parameter's type changed, an operand was swapped) become right again.

`bind="B=1,S=128"` also specializes symbolic dims to ints first, in argument types and in dim-list
attributes (reshape targets, broadcast shapes, ...); results then follow from the type rules.
"""

from __future__ import annotations

import re

from r1c.ir import dims
from r1c.ir.core import DimList, Function, Module, Value
from r1c.ir.dims import Dim
from r1c.ir.registry import OpError
from r1c.ir.types import TensorType
from r1c.ir.verifier import result_types
from r1c.passes.registry import PipelineError, register_pass

_BINDING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*")


class ShapeInferenceError(ValueError):
    pass


def parse_bindings(text: str) -> dict[str, int]:
    """`"B=1,S=128"` -> {"B": 1, "S": 128}."""
    env: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _BINDING.fullmatch(part)
        if not m:
            raise PipelineError(
                f'shape-inference: bad binding {part!r} in bind={text!r}; expected NAME=INT, e.g. bind="B=1,S=128"'
            )
        if m.group(1) in env:
            raise PipelineError(f"shape-inference: symbol {m.group(1)} is bound twice in bind={text!r}")
        env[m.group(1)] = int(m.group(2))
    return env


def substitute(d: Dim, env: dict[str, int]) -> Dim:
    """Replace bound symbols in a dim by their values: B*S with B=2 -> S*2."""
    if isinstance(d, int):
        return d
    return dims.mul(*(env.get(p, int(p) if p.isdigit() else p) for p in d.split("*")))


def _bind_type(t: TensorType, env: dict[str, int]) -> TensorType:
    return t.with_shape(tuple(substitute(d, env) for d in t.shape))


def _bind_attrs(attrs: dict, env: dict[str, int]) -> dict:
    return {
        k: DimList(substitute(d, env) if d != -1 else d for d in v) if isinstance(v, DimList) else v
        for k, v in attrs.items()
    }


def infer_function(m: Module, f: Function, env: dict[str, int]) -> None:
    # Operands are looked up by name: a stale Value object carries a stale type.
    current: dict[str, Value] = {}
    f.args = [Value(a.name, _bind_type(a.type, env)) for a in f.args]
    current.update((a.name, a) for a in f.args)
    for op in f.body:
        missing = [v.name for v in op.operands if v.name not in current]
        if missing:
            raise ShapeInferenceError(f"@{f.name}: '{op.name}' uses %{missing[0]} before it is defined")
        op.operands = tuple(current[v.name] for v in op.operands)
        if env:
            op.attrs = _bind_attrs(op.attrs, env)
        try:
            types = result_types(m, op)
        except OpError as e:
            lhs = ", ".join(str(r) for r in op.results)
            raise ShapeInferenceError(f"@{f.name}: '{op.name}' defining {lhs}: {e}") from None
        if len(types) != len(op.results):
            raise ShapeInferenceError(
                f"@{f.name}: '{op.name}' gives {len(types)} results, the op lists {len(op.results)}"
            )
        op.results = tuple(r if r.type == t else Value(r.name, t) for r, t in zip(op.results, types))
        current.update((r.name, r) for r in op.results)
    f.results = [current[r.name] for r in f.results]


def _symbols(m: Module) -> set[str]:
    found: set[str] = set()
    for f in m.functions.values():
        for a in f.args:
            for d in a.type.shape:
                found |= dims.symbols(d)
    return found


@register_pass(
    "shape-inference",
    'Re-derive every result type from the type rules; bind="B=1,S=128" specializes symbolic dims to ints.',
)
def shape_inference(module: Module, *, bind: str = "") -> Module:
    env = parse_bindings(bind)
    unknown = sorted(set(env) - _symbols(module))
    if unknown:
        raise PipelineError(
            f"shape-inference: bind names symbol(s) {', '.join(unknown)} that no function "
            f"argument of @{module.name} uses (they use {sorted(_symbols(module)) or 'none'})"
        )
    for f in module.functions.values():
        infer_function(module, f, env)
    return module
