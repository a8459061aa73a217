"""Model statistics from the IR alone: parameter counts (total and activated per token) and forward FLOPs.

FLOPs come from each op's cost rule (`r1c.ir.registry`), evaluated with the symbolic dims bound to
B=batch, S=seq, and divided by the number of tokens. Activated parameters count routed expert weights
(operands 4-6 of `moe_experts`) at k/E of their size: a token reads k of the E experts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from r1c.ir import dims, registry
from r1c.ir.core import DimList, Function, Module, Op, Value, symbolic_dims
from r1c.ir.types import TensorType

# Ops that only change how a weight is viewed; a parameter seen through them is still that parameter.
_VIEW_OPS = frozenset({"cast", "reshape", "transpose"})
NO_LOC = "(no loc)"


class StatsError(ValueError):
    pass


@dataclass(frozen=True)
class OpKindRow:
    op: str
    count: int
    flops: int
    bytes: int


@dataclass(frozen=True)
class LayerRow:
    layer: str
    ops: int
    flops: int
    params: int
    activated_params: int


@dataclass(frozen=True)
class ModelStats:
    module: str
    function: str
    batch: int
    seq: int
    total_params: int
    activated_params: int  # per token, embedding table and lm_head included
    embedding_params: int  # tables only read by `embedding` lookups (a tied lm_head makes it compute: not counted)
    flops: int  # forward, whole batch x sequence
    bytes: int
    by_op: tuple[OpKindRow, ...]
    by_layer: tuple[LayerRow, ...]

    @property
    def activated_params_excl_embedding(self) -> int:
        return self.activated_params - self.embedding_params

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.tokens


def layer_of(loc: str | None) -> str:
    """The layer a location belongs to: the path up to its first index ("model.layers.3.mlp" -> "model.layers.3")."""
    if not loc:
        return NO_LOC
    parts = loc.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return loc


def source_param(v: Value, producers: dict[Value, Op]) -> str | None:
    op = producers.get(v)
    while op is not None and op.name in _VIEW_OPS:
        op = producers.get(op.operands[0])
    return op.attrs["name"] if op is not None and op.name == "param" else None


def _numel(t: TensorType) -> int:
    return int(np.prod(t.concrete({}), dtype=np.int64))


def _param_fractions(m: Module, f: Function) -> tuple[dict[str, Fraction], set[str]]:
    """Per-token fraction of each parameter that is read, and the parameters that are pure lookup tables."""
    producers = f.producers()
    routed: dict[str, Fraction] = {}
    dense: set[str] = set()  # read in full by some op: a routed fraction no longer applies
    lookup_only: dict[str, bool] = {}
    for op in f.body:
        if op.name in _VIEW_OPS:
            continue
        if op.name == "moe_experts":
            k, e = op.operands[1].type.shape[1], op.operands[3].type.shape[0]
            if not isinstance(k, int) or not isinstance(e, int):
                raise StatsError(f"moe_experts at {op.loc or '?'}: top-k {k} and expert count {e} must be static")
        for i, v in enumerate(op.operands):
            name = source_param(v, producers)
            if op.name == "moe_experts" and i >= 3:
                if name is None:
                    raise StatsError(
                        f"moe_experts at {op.loc or '?'}: expert weight %{v.name} is not a parameter; "
                        "cannot count activated parameters"
                    )
                routed[name] = Fraction(k, e)
            elif name is not None:
                dense.add(name)
            if name is not None:
                lookup_only[name] = lookup_only.get(name, True) and op.name == "embedding" and i == 0
    fractions = {name: routed[name] if name in routed and name not in dense else Fraction(1) for name in m.params}
    return fractions, {n for n, only in lookup_only.items() if only}


def _param_layers(f: Function) -> dict[str, str]:
    """Each parameter belongs to the layer of its first user (param ops themselves carry no loc)."""
    producers = f.producers()
    out: dict[str, str] = {}
    for op in f.body:
        if op.name in _VIEW_OPS or op.name == "param":
            continue
        for v in op.operands:
            name = source_param(v, producers)
            if name is not None and name not in out:
                out[name] = layer_of(op.loc)
    return out


def _concrete(t: TensorType, env: dict[str, int]) -> TensorType:
    return TensorType(t.dtype, t.concrete(env))


def op_cost(op: Op, env: dict[str, int]) -> registry.Cost:
    """`op`'s cost rule on its types with the symbolic dims bound by `env` (shared with pipeline-partition)."""
    attrs = {k: DimList(dims.evaluate(d, env) for d in v) if isinstance(v, DimList) else v for k, v in op.attrs.items()}
    return registry.get(op.name).cost(
        [_concrete(v.type, env) for v in op.operands], [_concrete(r.type, env) for r in op.results], attrs
    )


def compute(m: Module, seq: int = 4096, batch: int = 1, function: str | None = None) -> ModelStats:
    if seq < 1 or batch < 1:
        raise StatsError(f"seq and batch must be >= 1, got seq={seq}, batch={batch}")
    f = m.functions[function] if function else m.main
    unknown = symbolic_dims([a.type for a in f.args]) - {"B", "S"}
    if unknown:
        raise StatsError(
            f"@{f.name} has symbolic dims {', '.join(sorted(unknown))}; stats binds only B (batch) and S (sequence)"
        )
    env = {"B": batch, "S": seq}
    by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    layer_ops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total_flops = total_bytes = 0
    for op in f.body:
        if op.name == "param":
            continue
        cost = op_cost(op, env)
        row = by_op[op.name]
        row[0], row[1], row[2] = row[0] + 1, row[1] + cost.flops, row[2] + cost.bytes
        lrow = layer_ops[layer_of(op.loc)]
        lrow[0], lrow[1] = lrow[0] + 1, lrow[1] + cost.flops
        total_flops += cost.flops
        total_bytes += cost.bytes

    fractions, lookup = _param_fractions(m, f)
    sizes = {name: _numel(p.type) for name, p in m.params.items()}
    activated = {name: sizes[name] * fractions[name] for name in m.params}
    owner = _param_layers(f)
    layer_params: dict[str, list] = defaultdict(lambda: [0, Fraction(0)])
    for name in m.params:
        entry = layer_params[owner.get(name, "(unused)")]
        entry[0] += sizes[name]
        entry[1] += activated[name]

    layers = list(dict.fromkeys([*layer_ops, *layer_params]))  # program order, then parameter-only groups
    return ModelStats(
        module=m.name,
        function=f.name,
        batch=batch,
        seq=seq,
        total_params=sum(sizes.values()),
        activated_params=round(sum(activated.values(), Fraction(0))),
        embedding_params=sum(sizes[n] for n in lookup),
        flops=total_flops,
        bytes=total_bytes,
        by_op=tuple(sorted((OpKindRow(n, c, fl, b) for n, (c, fl, b) in by_op.items()), key=lambda r: -r.flops)),
        by_layer=tuple(
            LayerRow(
                name,
                *layer_ops.get(name, (0, 0)),
                layer_params.get(name, (0, 0))[0],
                round(layer_params.get(name, (0, 0))[1]),
            )
            for name in layers
        ),
    )


__all__ = ["LayerRow", "ModelStats", "OpKindRow", "StatsError", "compute", "layer_of", "op_cost", "source_param"]
