"""`r1c stats` (parameters and FLOPs per token, as rich tables) and `r1c viz` (draw the dataflow graph)."""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from r1c.api import InputError
from r1c.cli_common import add_set_flag, console, human, load_model

DEFAULT_MAX_OPS = 1500  # `dot` takes minutes beyond a few thousand nodes


def add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="parameter counts and FLOPs per token",
        description="Total and activated parameters, and forward FLOPs per token for a sequence of "
        "--seq tokens at batch 1, from the IR's op cost rules.",
    )
    p.add_argument("model", help="model file (.r1 or .ir)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length S (default: 4096)")
    add_set_flag(p)
    p.set_defaults(run=run_stats)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def run_stats(args: argparse.Namespace) -> int:
    import r1c

    if args.seq < 1:
        raise InputError(f"--seq must be >= 1, got {args.seq}")
    s = r1c.stats(load_model(args.model, args.sets), seq=args.seq)
    out = console()

    summary = Table(title=f"@{s.module}: forward at B=1, S={s.seq}")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_column("exact", justify="right")
    for label, n in (
        ("total parameters", s.total_params),
        ("activated parameters / token (incl. embedding)", s.activated_params),
        ("activated parameters / token (excl. embedding)", s.activated_params_excl_embedding),
    ):
        summary.add_row(label, human(n), f"{n:,}")
    summary.add_row("FLOPs / token (forward)", human(s.flops_per_token, "FLOP"), f"{s.flops_per_token:,.0f}")
    out.print(summary)

    per_tok = s.tokens
    ops = Table(title="FLOPs by op kind")
    for col, just in (("op", "left"), ("count", "right"), ("FLOPs / token", "right"), ("share", "right")):
        ops.add_column(col, justify=just)
    for row in s.by_op:
        ops.add_row(row.op, str(row.count), human(row.flops / per_tok, "FLOP"), _pct(row.flops, s.flops))
    out.print(ops)

    layers = Table(title="by layer (from op locations)")
    for col, just in (
        ("layer", "left"),
        ("ops", "right"),
        ("parameters", "right"),
        ("activated", "right"),
        ("FLOPs / token", "right"),
        ("share", "right"),
    ):
        layers.add_column(col, justify=just)
    for row in s.by_layer:
        layers.add_row(
            row.layer,
            str(row.ops),
            human(row.params),
            human(row.activated_params),
            human(row.flops / per_tok, "FLOP"),
            _pct(row.flops, s.flops),
        )
    out.print(layers)
    return 0


def add_viz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz",
        help="draw the main function's dataflow graph",
        description="Draw the main function with graphviz: one node per op (name and result type).",
    )
    p.add_argument("model", help="model file (.r1 or .ir)")
    p.add_argument("-o", "--output", required=True, metavar="GRAPH", help="output file: .svg, .png, .pdf or .dot")
    p.add_argument("--cluster-by-loc", action="store_true", help="group ops into nested boxes by their loc path")
    p.add_argument(
        "--max-ops", type=int, default=DEFAULT_MAX_OPS, help=f"draw at most this many ops (default: {DEFAULT_MAX_OPS})"
    )
    add_set_flag(p)
    p.set_defaults(run=run_viz)


def run_viz(args: argparse.Namespace) -> int:
    from r1c.viz import draw, render

    module = load_model(args.model, args.sets)
    drawing = draw(module, cluster_by_loc=args.cluster_by_loc, max_ops=args.max_ops)
    path = render(drawing, args.output)
    if drawing.truncated:
        print(
            f"r1c: note: graph truncated: drew the first {drawing.shown_ops} of {drawing.total_ops} ops "
            f"(raise --max-ops to draw more)",
            file=sys.stderr,
        )
    print(f"wrote {path} ({drawing.shown_ops} ops of @{module.main.name})")
    return 0
