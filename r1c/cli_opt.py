"""`r1c opt` (run a pass pipeline with instrumentation, print the IR) and `r1c passes` (list the passes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from r1c.cli_common import add_set_flag, console, load_model


def add_opt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "opt",
        help="run a pass pipeline and print the resulting IR",
        description="Run a pass pipeline on a .r1 model or .ir module. The final IR goes to stdout "
        "(or -o); instrumentation (IR after passes, timings) goes to stderr.",
    )
    p.add_argument("model", help="model file (.r1 or .ir)")
    p.add_argument(
        "--passes",
        required=True,
        metavar="PIPELINE",
        help='comma-separated passes with options, e.g. "canonicalize,cse" (see `r1c passes`)',
    )
    add_set_flag(p)
    show = p.add_mutually_exclusive_group()
    show.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    show.add_argument(
        "--print-ir-after",
        action="append",
        default=[],
        metavar="PASS",
        help="print the IR after this pass (repeatable)",
    )
    p.add_argument(
        "--print-changed", action="store_true", help="print what each pass changed, as a unified diff of the IR"
    )
    p.add_argument("--verify-each", action="store_true", help="run the verifier after every pass")
    p.add_argument("--time-passes", action="store_true", help="print the time each pass took")
    p.add_argument(
        "--check-numerics",
        action="store_true",
        help="run the reference interpreter after every pass and stop at the first that changes the result",
    )
    p.add_argument("-o", "--output", metavar="FILE.ir", help="write the final IR here instead of stdout")
    p.set_defaults(run=run_opt)


def run_opt(args: argparse.Namespace) -> int:
    import r1c
    from r1c.ir.printer import print_module

    module = load_model(args.model, args.sets)
    print_after: str | set[str] | None = "all" if args.print_ir_after_all else set(args.print_ir_after) or None
    result = r1c.optimize(
        module,
        args.passes,
        verify_each=args.verify_each,
        print_ir_after=print_after,
        print_changed=args.print_changed,
        time_passes=args.time_passes,
        check_numerics=args.check_numerics,
        out=sys.stderr,
    )
    text = print_module(result)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_passes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "passes",
        help="list the available passes and their options",
        description="List the registered passes, their descriptions and options.",
    )
    p.set_defaults(run=run_passes)


def run_passes(args: argparse.Namespace) -> int:
    from r1c.passes import all_passes

    table = Table(title='r1c passes (use as --passes "name,name{option=value}")')
    table.add_column("pass", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("options")
    for name, info in all_passes().items():
        options = "\n".join(str(o) for o in info.options.values()) or "-"
        table.add_row(name, info.description, options)
    console().print(table)
    return 0
