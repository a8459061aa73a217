"""The partition plan: which units each pipeline stage gets, what it costs, what crosses its boundaries, and the
GPipe/1F1B schedules of the result. `pipeline_partition.py` turns a plan into IR; `r1c partition` prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r1c.ir.core import Module
from r1c.passes.pipeline_cost import H100, DeviceModel, PartitionError, Program, analyze, bind_env, value_bytes
from r1c.passes.pipeline_partitioner import MemoryCap, min_max_partition
from r1c.passes.pipeline_schedule import SCHEDULES, Schedule, build_schedule


@dataclass(frozen=True)
class StagePlan:
    index: int
    units: tuple[int, int]  # [first, end) unit indices
    first: str  # key of its first and last unit (layer / sublayer / op)
    last: str
    ops: int
    flops: int
    bytes: int
    params: int  # parameter elements it reads (a weight shared by two stages counts in both)
    param_bytes: int
    act_bytes: int  # stored activations of one micro-batch
    peak_in_flight: int  # micro-batches held at once under the chosen schedule
    recv_bytes: int  # activations received from the previous stage, per micro-batch
    send_bytes: int  # activations sent to the next stage, per micro-batch
    fwd_time: float  # seconds per micro-batch, sends included
    bwd_time: float

    @property
    def cost(self) -> float:
        return self.fwd_time + self.bwd_time

    @property
    def act_memory(self) -> int:
        return self.act_bytes * self.peak_in_flight

    @property
    def memory(self) -> int:
        return self.param_bytes + self.act_memory


@dataclass(frozen=True)
class PartitionPlan:
    function: str
    batch: int
    seq: int
    micro_batches: int
    granularity: str
    training: bool
    backward_ratio: float
    device: DeviceModel
    schedule: str  # the one the memory numbers (and cap) use
    stages: tuple[StagePlan, ...]
    schedules: dict[str, Schedule] = field(default_factory=dict)

    @property
    def imbalance(self) -> float:
        costs = [s.cost for s in self.stages]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "batch": self.batch,
            "seq": self.seq,
            "micro_batches": self.micro_batches,
            "granularity": self.granularity,
            "training": self.training,
            "backward_ratio": self.backward_ratio,
            "device": {
                "peak_flops": self.device.peak_flops,
                "hbm_bandwidth": self.device.hbm_bandwidth,
                "link_bandwidth": self.device.link_bandwidth,
            },
            "imbalance": self.imbalance,
            "stages": [
                {
                    "stage": s.index,
                    "first": s.first,
                    "last": s.last,
                    "ops": s.ops,
                    "flops": s.flops,
                    "bytes": s.bytes,
                    "params": s.params,
                    "param_bytes": s.param_bytes,
                    "act_bytes_per_micro_batch": s.act_bytes,
                    "peak_in_flight": s.peak_in_flight,
                    "act_memory_bytes": s.act_memory,
                    "recv_bytes": s.recv_bytes,
                    "send_bytes": s.send_bytes,
                    "fwd_s": s.fwd_time,
                    "bwd_s": s.bwd_time,
                    "cost_s": s.cost,
                }
                for s in self.stages
            ],
            "schedules": {
                name: {
                    "makespan_s": sch.makespan,
                    "bubble": sch.bubble,
                    "ideal_bubble": sch.ideal_bubble,
                    "peak_in_flight": list(sch.peak_in_flight),
                    "actions": [[a.slot, a.stage, a.micro_batch, a.kind] for a in sch.actions],
                }
                for name, sch in self.schedules.items()
            },
        }


def is_training(program: Program) -> bool:
    """A function returning one float scalar is a loss: its pipeline runs a backward pass too."""
    res = program.function.results
    return len(res) == 1 and res[0].type.rank == 0 and res[0].type.dtype.is_float


def plan_partition(
    m: Module,
    *,
    stages: int,
    function: str = "forward",
    batch: int = 1,
    seq: int = 4096,
    micro_batches: int = 8,
    granularity: str = "sublayer",
    device: DeviceModel = H100,
    backward_ratio: float = -1.0,
    memory_cap_gb: float = 0.0,
    schedule: str = "1f1b",
) -> tuple[PartitionPlan, Program]:
    if function not in m.functions:
        raise PartitionError(f"module @{m.name} has no function @{function} (it has {', '.join(m.functions)})")
    if schedule not in SCHEDULES:
        raise PartitionError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if micro_batches < 1:
        raise PartitionError(f"micro_batches must be >= 1, got {micro_batches}")
    f = m.functions[function]
    program = analyze(f, {n: p.type for n, p in m.params.items()}, bind_env(f, batch, seq), device, granularity)
    training = is_training(program)
    ratio = (2.0 if training else 0.0) if backward_ratio < 0 else backward_ratio
    if ratio > 0 and not training:
        raise PartitionError(
            f"@{function} is not a training function (it does not return one float scalar loss); "
            "backward_ratio must be 0 or -1 (auto) for it"
        )
    n = len(program.units)
    if n < stages:
        raise PartitionError(
            f"@{function} has {n} unit(s) at granularity '{granularity}', too few for {stages} stages"
            + ("; try granularity=op" if granularity != "op" else "")
        )
    times = np.array([u.time for u in program.units])
    cut_bytes = program.cut_bytes()
    send = np.array([device.send_time(int(b)) for b in cut_bytes])

    def in_flight(k: int) -> int:
        if not training:
            return 1
        return micro_batches if schedule == "gpipe" else min(stages - k, micro_batches)

    cap = None
    if memory_cap_gb > 0:
        param_per_unit = [sum(program.param_bytes[p] for p in u.params) for u in program.units]
        cap = MemoryCap(
            memory_cap_gb * 1e9,
            np.concatenate([[0.0], np.cumsum(param_per_unit)]),
            np.concatenate([[0.0], np.cumsum([u.act_bytes for u in program.units])]),
            in_flight,
        )
    cuts, _ = min_max_partition(times, send, stages, 1.0 + ratio, training, cap)
    plans = []
    for k in range(stages):
        i, j = cuts[k], cuts[k + 1]
        units = program.units[i:j]
        params = frozenset().union(*(u.params for u in units))
        op_time = float(times[i:j].sum())
        plans.append(
            StagePlan(
                index=k,
                units=(i, j),
                first=units[0].key,
                last=units[-1].key,
                ops=sum(len(u.ops) for u in units),
                flops=sum(u.flops for u in units),
                bytes=sum(u.bytes for u in units),
                params=sum(program.param_numel[p] for p in params),
                param_bytes=sum(program.param_bytes[p] for p in params),
                act_bytes=sum(u.act_bytes for u in units),
                peak_in_flight=in_flight(k),
                recv_bytes=int(sum(value_bytes(v, program.env) for v in program.crossing(i))),
                send_bytes=int(cut_bytes[j]),
                fwd_time=op_time + float(send[j]),
                bwd_time=ratio * op_time + (float(send[i]) if training else 0.0),
            )
        )
    fwd, bwd = [p.fwd_time for p in plans], [p.bwd_time for p in plans]
    schedules = {name: build_schedule(name, fwd, bwd, micro_batches, training) for name in SCHEDULES}
    plan = PartitionPlan(
        function, batch, seq, micro_batches, granularity, training, ratio, device, schedule, tuple(plans), schedules
    )
    return plan, program
