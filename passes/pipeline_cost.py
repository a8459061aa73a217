"""The cost model of `pipeline-partition`: a function cut into units (the atoms a stage boundary may fall
between), each with its time on a device, FLOPs, bytes, stored activations and parameters, plus the bytes
that cross every possible cut.

Time of an op = max(flops / peak FLOP/s, compulsory bytes / HBM bandwidth): a roofline, because a kernel is
bound by whichever of the two it saturates. FLOPs and bytes come from the op's registry cost rule on its
types with B (micro-batch size) and S (sequence) bound. Defaults model an H100 SXM: 989 TFLOP/s dense bf16,
3.35 TB/s HBM3, and 50 GB/s between neighbouring stages (one 400 Gb/s NIC: stages usually sit on different
nodes). Dtypes are the IR's own: an f32 model is costed as f32.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from r1c.ir.core import Function, Op, Value, symbolic_dims
from r1c.ir.types import TensorType
from r1c.model_stats import NO_LOC, layer_of, op_cost, source_param
from r1c.passes.registry import PipelineError

GRANULARITIES = ("op", "sublayer", "layer")


class PartitionError(PipelineError):
    """The function cannot be partitioned as asked (too few units, no fit under the memory cap, ...)."""


@dataclass(frozen=True)
class DeviceModel:
    peak_flops: float = 989e12  # FLOP/s, dense bf16 (H100 SXM)
    hbm_bandwidth: float = 3.35e12  # B/s
    link_bandwidth: float = 50e9  # B/s from one stage to the next

    def op_time(self, flops: int, nbytes: int) -> float:
        return max(flops / self.peak_flops, nbytes / self.hbm_bandwidth)

    def send_time(self, nbytes: int) -> float:
        return nbytes / self.link_bandwidth


H100 = DeviceModel()


@dataclass
class Unit:
    key: str  # layer or sublayer name (from op locs), or the op's result name at op granularity
    ops: list[Op]
    time: float = 0.0
    flops: int = 0
    bytes: int = 0
    act_bytes: int = 0  # op results (weight views excluded): what a training step keeps for the backward pass
    params: frozenset[str] = frozenset()


@dataclass
class Program:
    """A function prepared for partitioning: its non-rematerialized ops in units, in a topological order."""

    function: Function
    env: dict[str, int]
    units: list[Unit]
    remat: list[Op]  # ops that depend on no argument (params, constants): each stage recomputes what it reads
    unit_of: dict[Value, int]  # defining unit of every value a unit op produces
    last_use: dict[Value, int]  # last unit reading it; len(units) for the function's results
    param_bytes: dict[str, int]
    param_numel: dict[str, int]

    def crossing(self, cut: int) -> list[Value]:
        """Values made before unit `cut` and read at or after it, in definition order: what goes over that cut."""
        return [v for v, d in self.unit_of.items() if d < cut <= self.last_use.get(v, -1)]

    def cut_bytes(self) -> np.ndarray:
        """Bytes crossing each cut 0..n (cuts 0 and n cross nothing), by a difference array over value lifetimes."""
        n = len(self.units)
        diff = np.zeros(n + 2, dtype=np.float64)
        for v, d in self.unit_of.items():
            u = self.last_use.get(v, -1)
            if u > d:
                diff[d + 1] += value_bytes(v, self.env)
                diff[u + 1] -= value_bytes(v, self.env)
        out = np.cumsum(diff)[: n + 1]
        out[0] = out[n] = 0.0
        return out


def value_bytes(v: Value, env: dict[str, int]) -> int:
    return int(np.prod(v.type.concrete(env), dtype=np.int64)) * v.type.dtype.itemsize


def unit_key(op: Op, granularity: str) -> str:
    if granularity == "op":
        return op.results[0].name
    layer = layer_of(op.loc)
    if granularity == "layer" or layer == NO_LOC or not op.loc or op.loc == layer:
        return layer
    return ".".join(op.loc.split(".")[: layer.count(".") + 2])  # the layer plus one level: attention, mlp, ...


def _rematerialized(f: Function) -> set[int]:
    """Ids of the ops that read no function argument, directly or not: cheaper to recompute per stage than to
    send. (Ops are mutable dataclasses, so sets of them hold ids.)"""
    args, derived, out = set(f.args), set(), set()
    for op in f.body:
        if any(v in args or v in derived for v in op.operands):
            derived.update(op.results)
        else:
            out.add(id(op))
    return out


def layer_order(f: Function, remat: set[int]) -> list[Op]:
    """A topological order of the non-rematerialized ops that keeps each layer's ops together.

    Kahn's algorithm, always taking the ready op of the earliest layer (then the earliest in the body). An op
    without a loc belongs with the located op before it, so a loss tail stays after the lm_head instead of
    being hoisted to the front because its label input is ready at once.
    """
    ops = [op for op in f.body if id(op) not in remat]
    rank: dict[str, int] = {}
    current = NO_LOC
    prio: dict[int, tuple[int, int]] = {}
    for i, op in enumerate(ops):
        if op.loc:
            current = layer_of(op.loc)
        prio[i] = (rank.setdefault(current, len(rank)), i)
    producer = {r: i for i, op in enumerate(ops) for r in op.results}
    waiting = [0] * len(ops)
    users: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        deps = {producer[v] for v in op.operands if v in producer}
        waiting[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [prio[i] for i in range(len(ops)) if waiting[i] == 0]
    heapq.heapify(ready)
    order: list[Op] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(ops[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, prio[u])
    return order


def bind_env(f: Function, batch: int, seq: int) -> dict[str, int]:
    if batch < 1 or seq < 1:
        raise PartitionError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    unknown = symbolic_dims([a.type for a in f.args]) - {"B", "S"}
    if unknown:
        raise PartitionError(
            f"@{f.name} has symbolic dims {', '.join(sorted(unknown))}; pipeline-partition binds only "
            "B (batch) and S (seq)"
        )
    return {"B": batch, "S": seq}


def analyze(f: Function, params: dict[str, TensorType], env: dict[str, int], device: DeviceModel, granularity: str):
    """Cut `f` into units at `granularity` and cost them on `device`."""
    if granularity not in GRANULARITIES:
        raise PartitionError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    remat = _rematerialized(f)
    order = layer_order(f, remat)
    units: list[Unit] = []
    for op in order:
        key = unit_key(op, granularity)
        if not units or units[-1].key != key or granularity == "op":
            units.append(Unit(key, []))
        units[-1].ops.append(op)
    producers = f.producers()
    remat_cost_to = _remat_cost_owner(f, remat, order)
    for unit in units:
        used: set[str] = set()
        for op in unit.ops:
            cost = op_cost(op, env)
            for extra in remat_cost_to.get(id(op), ()):
                cost = cost + op_cost(extra, env)
            unit.flops += cost.flops
            unit.bytes += cost.bytes
            unit.time += device.op_time(cost.flops, cost.bytes)
            unit.act_bytes += sum(value_bytes(r, env) for r in op.results if source_param(r, producers) is None)
            used.update(n for v in op.operands if (n := source_param(v, producers)) is not None)
        unit.params = frozenset(used)
    unit_of = {r: i for i, u in enumerate(units) for op in u.ops for r in op.results}
    last_use: dict[Value, int] = {}
    for i, u in enumerate(units):
        for op in u.ops:
            for v in op.operands:
                last_use[v] = i
    for v in f.results:
        last_use[v] = len(units)
    numel = {n: int(np.prod(t.concrete({}), dtype=np.int64)) for n, t in params.items()}
    return Program(
        f,
        env,
        units,
        [op for op in f.body if id(op) in remat],
        unit_of,
        last_use,
        {n: numel[n] * t.dtype.itemsize for n, t in params.items()},
        numel,
    )


def _remat_cost_owner(f: Function, remat: set[int], order: list[Op]) -> dict[int, list[Op]]:
    """Charge each recomputed op (other than a parameter read, whose bytes its reader counts) to its first reader."""
    first_reader: dict[Value, Op] = {}
    for op in order:
        for v in op.operands:
            first_reader.setdefault(v, op)
    out: dict[int, list[Op]] = {}
    for op in f.body:
        if id(op) in remat and op.name != "param" and op.results[0] in first_reader:
            out.setdefault(id(first_reader[op.results[0]]), []).append(op)
    return out


def static_symbols(types: list[TensorType]) -> set[str]:
    """Plain symbols (a dim that is exactly `B`, not `B*S`): the ones the interpreter binds from an input shape."""
    return {d for t in types for d in t.shape if isinstance(d, str) and "*" not in d}
