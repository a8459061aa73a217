"""`pipeline-partition`: split a function into S pipeline stages of balanced cost, as S IR functions.

The boundary between stages is the function boundary: stage k is `@<fn>.stage<k>`, whose arguments are the
original inputs its ops read, then the values stage k-1 sends it; its results are the values it sends to
stage k+1 (its own and those it forwards for later stages: neighbours only talk to neighbours, as in a real
pipeline), and the last stage returns the original results. Values keep their names, so stage k's results
are exactly stage k+1's received arguments, and running the stages in sequence (`run_stages`) reproduces
the function. Ops that read no input (parameter reads, constants) are recomputed in each stage that needs
them instead of being sent. The original function stays as the unpartitioned program.

Module attributes `pipeline_<fn>_*` record the stage names (space-separated: IR attributes cannot hold a list
of strings), per-stage cost, boundary bytes, imbalance and both schedules (compact: each stage's action order,
stages separated by "; "), with the predicted and ideal bubble.
"""

from __future__ import annotations

import numpy as np

from r1c.ir import dims
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.interpreter import run_function
from r1c.passes.pipeline_cost import DeviceModel, PartitionError, Program, static_symbols
from r1c.passes.pipeline_plan import PartitionPlan, plan_partition
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import clone_module


def stage_name(function: str, k: int) -> str:
    return f"{function}.stage{k}"


def attr_prefix(function: str) -> str:
    return "pipeline_" + function.replace(".", "_")


def _needed_remat(program: Program, values: set[Value]) -> list[Op]:
    """The recomputed ops (params, constants, weight-only chains) that `values` depend on, in body order."""
    need = set(values)
    out = []
    for op in reversed(program.remat):
        if any(r in need for r in op.results):
            out.append(op)
            need.update(op.operands)
    return out[::-1]


def _symbols_of(ops: list[Op], values: list[Value]) -> set[str]:
    out = {s for v in values for d in v.type.shape for s in dims.symbols(d)}
    for op in ops:
        out |= {s for v in op.results for d in v.type.shape for s in dims.symbols(d)}
        for a in op.attrs.values():
            if isinstance(a, tuple):
                out |= {s for d in a if isinstance(d, str) for s in dims.symbols(d)}
    return out


def build_stage(program: Program, k: int, cuts: list[int]) -> Function:
    f, n = program.function, len(program.units)
    i, j = cuts[k], cuts[k + 1]
    ops = [op for u in program.units[i:j] for op in u.ops]
    received = program.crossing(i)
    results = list(f.results) if j == n else program.crossing(j)
    read = {v for op in ops for v in op.operands} | set(results)
    remat = _needed_remat(program, read)
    read |= {v for op in remat for v in op.operands}
    inputs = [a for a in f.args if a in read]
    # The interpreter binds B, S from argument shapes: a stage that only receives [B*S, D] values (inside an MoE
    # block) also takes an original input that carries the plain symbols its reshapes need.
    missing = _symbols_of(remat + ops, received + inputs) - static_symbols([v.type for v in inputs + received])
    for a in f.args:
        if a not in inputs and missing & static_symbols([a.type]):
            inputs.append(a)
            missing -= static_symbols([a.type])
    inputs.sort(key=f.args.index)
    return Function(stage_name(f.name, k), inputs + received, [*remat, *ops], results)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _plan_attrs(plan: PartitionPlan, names: list[str]) -> dict:
    p = attr_prefix(plan.function)
    out = {
        f"{p}_stages": " ".join(names),
        f"{p}_micro_batches": plan.micro_batches,
        f"{p}_stage_ms": tuple(_sig(s.cost * 1e3) for s in plan.stages),
        f"{p}_send_bytes": tuple(s.send_bytes for s in plan.stages[:-1]),
        f"{p}_imbalance": _sig(plan.imbalance),
        f"{p}_bubble_ideal": _sig(next(iter(plan.schedules.values())).ideal_bubble),
    }
    for name, sch in plan.schedules.items():
        out[f"{p}_bubble_{name}"] = _sig(sch.bubble)
        out[f"{p}_schedule_{name}"] = "; ".join(sch.order_text())
    return out


@register_pass(
    "pipeline-partition",
    "Split a function into S pipeline stages (functions @<fn>.stage<k>) balancing a roofline cost model; "
    "records per-stage cost, boundary bytes and the GPipe/1F1B schedules with their predicted bubble",
)
def pipeline_partition(
    module: Module,
    *,
    stages: int = 2,
    function: str = "forward",
    batch: int = 1,
    seq: int = 4096,
    micro_batches: int = 8,
    granularity: str = "sublayer",
    peak_tflops: float = 989.0,
    hbm_tbps: float = 3.35,
    link_gbps: float = 50.0,
    backward_ratio: float = -1.0,
    memory_cap_gb: float = 0.0,
    schedule: str = "1f1b",
) -> Module:
    plan, program = plan_partition(
        module,
        stages=stages,
        function=function,
        batch=batch,
        seq=seq,
        micro_batches=micro_batches,
        granularity=granularity,
        device=DeviceModel(peak_tflops * 1e12, hbm_tbps * 1e12, link_gbps * 1e9),
        backward_ratio=backward_ratio,
        memory_cap_gb=memory_cap_gb,
        schedule=schedule,
    )
    return apply_plan(module, plan, program)


def apply_plan(module: Module, plan: PartitionPlan, program: Program) -> Module:
    """`module` plus the stage functions of `plan` and its summary attributes."""
    names = [stage_name(plan.function, k) for k in range(len(plan.stages))]
    taken = [n for n in names if n in module.functions]
    if taken:
        raise PartitionError(f"module @{module.name} already has @{taken[0]}: @{plan.function} is already partitioned")
    out = clone_module(module)
    cuts = [s.units[0] for s in plan.stages] + [plan.stages[-1].units[1]]
    for k, name in enumerate(names):
        out.functions[name] = build_stage(program, k, cuts)
    out.attrs.update(_plan_attrs(plan, names))
    return out


def stage_functions(m: Module, function: str) -> list[Function]:
    key = f"{attr_prefix(function)}_stages"
    if key not in m.attrs:
        raise PartitionError(f"module @{m.name} has no pipeline partition of @{function} (no attribute {key})")
    return [m.functions[n] for n in m.attrs[key].split()]


def run_stages(m: Module, function: str, inputs: list[np.ndarray], weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the stages of a partitioned function in sequence on the reference interpreter.

    Each stage takes the original inputs it names and what the previous stage returned (matched by value name,
    which the pass keeps), and nothing else: a stage that reads a value its neighbour did not send fails here.
    """
    original = {a.name: x for a, x in zip(m.functions[function].args, inputs)}
    sent: dict[str, np.ndarray] = {}
    outs: list[np.ndarray] = []
    for k, stage in enumerate(stage_functions(m, function)):
        missing = [a.name for a in stage.args if a.name not in original and a.name not in sent]
        if missing:
            raise PartitionError(f"@{stage.name} reads %{missing[0]}, which stage {k - 1} does not send")
        args = [original[a.name] if a.name in original else sent[a.name] for a in stage.args]
        outs = run_function(m, stage, args, weights)
        sent = {r.name: x for r, x in zip(stage.results, outs)}
    return outs


__all__ = ["apply_plan", "pipeline_partition", "run_stages", "stage_functions", "stage_name"]
