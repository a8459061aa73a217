"""`r1c partition`: split a model's function into pipeline stages and print the per-stage cost table and the
schedule summary (the plan of the `pipeline-partition` pass; `-o` writes the partitioned IR)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from r1c.api import InputError
from r1c.cli_common import add_set_flag, console, human, load_model
from r1c.passes.pipeline_cost import GRANULARITIES, DeviceModel
from r1c.passes.pipeline_schedule import SCHEDULES


def add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partition",
        help="split a function into balanced pipeline stages",
        description="Partition a function into --stages contiguous pipeline stages minimizing the largest stage "
        "cost (roofline time of its ops on the device model, plus sends), and predict the GPipe and 1F1B bubble "
        "for --micro-batches micro-batches.",
    )
    p.add_argument("model", help="model file (.r1 or .ir)")
    p.add_argument("--stages", type=int, required=True, help="number of pipeline stages")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (default: 8)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length S (default: 4096)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size B (default: 1)")
    p.add_argument("--function", default="forward", help="function to partition (default: forward; loss trains)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="schedule for the memory columns")
    p.add_argument("--granularity", choices=GRANULARITIES, default="sublayer", help="where cuts may fall")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device dense TFLOP/s (default: H100 989)")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="device HBM TB/s (default: H100 3.35)")
    p.add_argument("--link-gbps", type=float, default=50.0, help="GB/s between stages (default: 50)")
    p.add_argument("--memory-cap-gb", type=float, default=0.0, help="per-stage memory cap in GB (0: none)")
    p.add_argument("--json", metavar="OUT", help="also write the plan (stages, schedules) as JSON")
    p.add_argument("-o", "--output", metavar="OUT.ir", help="write the partitioned module as IR text")
    add_set_flag(p)
    p.set_defaults(run=run_partition)


def _layers(first: str, last: str) -> str:
    return first if first == last else f"{first} .. {last}"


def run_partition(args: argparse.Namespace) -> int:
    from r1c.ir.printer import print_module
    from r1c.passes.pipeline_partition import apply_plan
    from r1c.passes.pipeline_plan import plan_partition

    for flag, value in (("--stages", args.stages), ("--micro-batches", args.micro_batches)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    module = load_model(args.model, args.sets)
    plan, program = plan_partition(
        module,
        stages=args.stages,
        function=args.function,
        batch=args.batch,
        seq=args.seq,
        micro_batches=args.micro_batches,
        granularity=args.granularity,
        device=DeviceModel(args.peak_tflops * 1e12, args.hbm_tbps * 1e12, args.link_gbps * 1e9),
        memory_cap_gb=args.memory_cap_gb,
        schedule=args.schedule,
    )
    out = console()
    mode = f"training (backward = {plan.backward_ratio:g} x forward)" if plan.training else "forward only"
    table = Table(
        title=f"@{module.name}: @{plan.function} in {len(plan.stages)} stages at B={plan.batch}, S={plan.seq}, "
        f"{mode}; per micro-batch"
    )
    columns = ["stage", "layers", "ops", "FLOPs", "bytes", "params", "act. memory", "send", "cost", "share"]
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 1 else "right")
    total = sum(s.cost for s in plan.stages)
    for s in plan.stages:
        table.add_row(
            str(s.index),
            _layers(s.first, s.last),
            str(s.ops),
            human(s.flops, "FLOP"),
            human(s.bytes, "B"),
            human(s.params),
            f"{human(s.act_memory, 'B')} ({s.peak_in_flight} mb)",
            human(s.send_bytes, "B"),
            f"{s.cost * 1e3:.4g} ms",
            f"{100 * s.cost / total:.1f}%" if total else "-",
        )
    out.print(table)
    out.print(f"imbalance (max/mean stage cost): {plan.imbalance:.4f}")
    summary = Table(title=f"schedules for {plan.micro_batches} micro-batches")
    for i, col in enumerate(("schedule", "step time", "bubble (predicted)", "bubble (ideal)", "peak in-flight")):
        summary.add_column(col, justify="left" if i == 0 else "right")
    for name, sch in plan.schedules.items():
        marker = " *" if name == args.schedule else ""
        summary.add_row(
            name + marker,
            f"{sch.makespan * 1e3:.4g} ms",
            f"{sch.bubble:.4f}",
            f"{sch.ideal_bubble:.4f}",
            ",".join(map(str, sch.peak_in_flight)),
        )
    out.print(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    if args.output:
        Path(args.output).write_text(print_module(apply_plan(module, plan, program)))
    return 0
