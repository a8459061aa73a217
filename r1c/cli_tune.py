"""`r1c tune`: MetaSchedule tuning of a model's cpu kernels into the tuning database that `r1c compile` applies."""

from __future__ import annotations

import argparse
import re

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from r1c.api import InputError
from r1c.cli_common import add_set_flag, console, load_model

_SHAPE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*")


def parse_shapes(text: str | None) -> dict[str, int]:
    """ "B=1,S=128" -> {"B": 1, "S": 128}."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for item in text.split(","):
        m = _SHAPE.fullmatch(item)
        if not m or int(m.group(2)) < 1:
            raise InputError(f"--shapes {text!r}: expected SYMBOL=N[,SYMBOL=N...] with N >= 1, e.g. B=1,S=128")
        out[m.group(1)] = int(m.group(2))
    return out


def add_shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shapes", metavar="SYM=N,...", help="cpu: bind symbolic dims (a static-shape build), e.g. B=1,S=128"
    )
    p.add_argument("--tuning-db", metavar="DIR", help="cpu: tuning database directory (default ~/.cache/r1c/tune/..)")


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="autotune a model's cpu kernels with MetaSchedule",
        description="Tune the kernels of a model for the cpu target with MetaSchedule; `r1c compile` with the same "
        "--shapes then uses the records. Kernels whose best record is not faster than the default schedule keep "
        "the default.",
    )
    p.add_argument("model", help="model file (.r1 or .ir)")
    p.add_argument("--target", default="cpu", choices=("cpu",), help="target to tune for (default: cpu)")
    p.add_argument("--trials", type=int, default=64, help="measurements in all, split over the kernels (default 64)")
    p.add_argument("--entry", metavar="FUNC", help="the function to tune (default forward)")
    add_shape_flags(p)
    add_set_flag(p)
    p.set_defaults(run=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    import tvm

    from r1c.backends.cpu import tune
    from r1c.backends.cpu.target import build_relax

    if args.trials < 1:
        raise InputError(f"--trials must be >= 1, got {args.trials}")
    shapes = parse_shapes(args.shapes)
    if not shapes:
        raise InputError("r1c tune needs static shapes: give --shapes, e.g. --shapes B=1,S=128")
    module = load_model(args.model, args.sets)
    options = {"shapes": shapes, **({"entry": args.entry} if args.entry else {})}
    mod, plan, _ = build_relax(module, options, args.target)
    work_dir = args.tuning_db or tune.default_dir(plan["target"])
    out = console()
    out.print(f"tuning @{module.name} for {plan['target']['mcpu']} ({args.trials} trials) into {work_dir}")
    columns = (TextColumn("measured"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=not out.is_terminal) as bar:
        job = bar.add_task("tune", total=args.trials)
        try:
            report = tune.tune(mod, tvm.target.Target(plan["target"]), work_dir, args.trials,
                               lambda n: bar.advance(job, n))  # fmt: skip
        except ValueError as e:
            raise InputError(str(e)) from None
    table = Table(title="default schedule vs tuned (ms per call)")
    for col in ("kernel", "calls", "default", "tuned", "speedup", "used"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    mine = {name: report["kernels"][name] for name in report["this_model"]}  # not other models' in the database
    for name, k in sorted(mine.items(), key=lambda kv: -kv[1]["default_ms"] * kv[1]["calls"]):
        used = "yes" if k["hash"] not in report["rejected"] else "no (default faster)"
        table.add_row(name[:60], str(k["calls"]), f"{k['default_ms']:.3f}", f"{k['tuned_ms']:.3f}",
                      f"{k['default_ms'] / k['tuned_ms']:.2f}x", used)  # fmt: skip
    out.print(table)
    return 0
