"""GPipe and 1F1B pipeline schedules for S stages and M micro-batches, and their predicted bubble.

A schedule is each stage's order of actions, F(m) (forward of micro-batch m) and B(m) (its backward):
- GPipe: every forward, then every backward in reverse micro-batch order.
- 1F1B (PipeDream-flush, as in Megatron-LM): stage k runs min(S-k-1, M) warm-up forwards, then alternates one
  forward and one backward, then drains the remaining backwards. Same bubble as GPipe, but stage k holds at
  most S-k micro-batches of activations instead of M.
A forward-only (inference) function has no B actions: both schedules are the same stream of forwards.

Times come from simulating those orders: an action starts when its stage is free and its input is ready
(F(k,m) after F(k-1,m); B(k,m) after B(k+1,m); the last stage's B(m) after its F(m)). Stage durations
include their sends. Slots are the same simulation with every action taking one time unit: the grid of the
usual pipeline diagrams. The bubble is the idle fraction of S x makespan; for S equal stages it is the
ideal (S-1)/(M+S-1).
"""

from __future__ import annotations

from dataclasses import dataclass

from r1c.passes.pipeline_cost import PartitionError

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    slot: int  # start on the unit-time grid
    stage: int
    micro_batch: int
    kind: str  # "F" or "B"
    start: float  # predicted seconds from the step's start
    end: float


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    micro_batches: int
    actions: tuple[Action, ...]  # sorted by (slot, stage)
    makespan: float
    bubble: float  # predicted idle fraction from the stage costs
    peak_in_flight: tuple[int, ...]  # per stage: micro-batches whose activations are held at once

    @property
    def ideal_bubble(self) -> float:
        return ideal_bubble(self.stages, self.micro_batches)

    def order_text(self) -> tuple[str, ...]:
        """Per stage, its actions in order ("F0 F1 B0 ..."): the compact form kept in module attributes."""
        by_stage: list[list[Action]] = [[] for _ in range(self.stages)]
        for a in sorted(self.actions, key=lambda a: (a.start, a.slot)):
            by_stage[a.stage].append(a)
        return tuple(" ".join(f"{a.kind}{a.micro_batch}" for a in acts) for acts in by_stage)


def ideal_bubble(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


def stage_orders(name: str, stages: int, micro_batches: int, training: bool) -> list[list[tuple[str, int]]]:
    if name not in SCHEDULES:
        raise PartitionError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if micro_batches < 1:
        raise PartitionError(f"micro_batches must be >= 1, got {micro_batches}")
    m = micro_batches
    fwd = [("F", i) for i in range(m)]
    if not training:
        return [list(fwd) for _ in range(stages)]
    if name == "gpipe":
        return [fwd + [("B", i) for i in reversed(range(m))] for _ in range(stages)]
    orders = []
    for k in range(stages):
        warm = min(stages - k - 1, m)
        order = fwd[:warm]
        for i in range(m - warm):
            order += [("F", warm + i), ("B", i)]
        orders.append(order + [("B", i) for i in range(m - warm, m)])
    return orders


def _simulate(orders: list[list[tuple[str, int]]], fwd: list[float], bwd: list[float]) -> dict:
    """Start and end time of every (kind, stage, micro-batch), each stage running its order."""
    stages = len(orders)
    done: dict[tuple[str, int, int], tuple[float, float]] = {}
    pos, free = [0] * stages, [0.0] * stages
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for k in range(stages):
            while pos[k] < len(orders[k]):
                kind, mb = orders[k][pos[k]]
                dep = ("F", k - 1, mb) if kind == "F" else ("B", k + 1, mb) if k + 1 < stages else ("F", k, mb)
                if kind == "F" and k == 0:
                    ready = 0.0
                elif dep in done:
                    ready = done[dep][1]
                else:
                    break
                start = max(free[k], ready)
                free[k] = start + (fwd[k] if kind == "F" else bwd[k])
                done[(kind, k, mb)] = (start, free[k])
                pos[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # the orders above never deadlock; a new schedule that does is a bug to report
            raise PartitionError("pipeline schedule deadlocks: no stage can run its next action")
    return done


def build_schedule(name: str, fwd: list[float], bwd: list[float], micro_batches: int, training: bool) -> Schedule:
    """Schedule `name` for stages with forward/backward times `fwd`/`bwd` (seconds per micro-batch)."""
    stages = len(fwd)
    orders = stage_orders(name, stages, micro_batches, training)
    timed = _simulate(orders, fwd, bwd)
    slots = _simulate(orders, [1.0] * stages, [1.0] * stages)
    actions = sorted(
        (Action(int(slots[key][0]), key[1], key[2], key[0], t[0], t[1]) for key, t in timed.items()),
        key=lambda a: (a.slot, a.stage),
    )
    makespan = max(a.end for a in actions)
    busy = micro_batches * sum(f + (b if training else 0.0) for f, b in zip(fwd, bwd))
    peaks = []
    for order in orders:
        held = peak = 0
        for kind, _ in order:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak if training else 1)  # inference keeps nothing for a backward pass
    # max(): summing the durations in another order than the simulation can round the idle time below zero
    bubble = max(0.0, 1.0 - busy / (stages * makespan)) if makespan > 0 else 0.0
    return Schedule(name, stages, micro_batches, tuple(actions), makespan, bubble, tuple(peaks))
