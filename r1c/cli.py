"""The `r1c` command line: argument parsing, dispatch, and turning errors into one clean message.

Exit status: 0 ok, 1 an expected error (bad model, bad artifact, bad input), 2 a usage error (argparse),
3 an unexpected exception (a bug). R1C_TRACEBACK=1 shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

import r1c
from r1c import cli_generate, cli_inspect, cli_model, cli_opt, cli_partition, cli_serve, cli_train, cli_tune

COMMANDS = (
    cli_model.add_compile,
    cli_model.add_run,
    cli_generate.add_generate,
    cli_opt.add_opt,
    cli_opt.add_passes,
    cli_inspect.add_stats,
    cli_inspect.add_viz,
    cli_partition.add_partition,
    cli_train.add_train,
    cli_tune.add_tune,
    cli_serve.add_serve,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1c", description="A compiler for DeepSeek-style models.")
    parser.add_argument("--version", action="version", version=f"r1c {r1c.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug in r1c: reported as one line (or one located block)."""
    from r1c.api import InputError
    from r1c.artifact import ArtifactError
    from r1c.backends import TargetError
    from r1c.frontends.dsl.errors import DSLError
    from r1c.frontends.hf import HFConfigError, HFWeightError
    from r1c.frontends.hf.safetensors_io import SafetensorsError
    from r1c.ir.dims import DimError
    from r1c.ir.interpreter import InterpreterError
    from r1c.ir.parser import IRParseError
    from r1c.ir.verifier import VerifyError
    from r1c.model_stats import StatsError
    from r1c.passes import NumericsError, PipelineError
    from r1c.viz import VizError

    return (
        InputError,
        ArtifactError,
        TargetError,
        DSLError,
        HFConfigError,
        HFWeightError,
        SafetensorsError,
        DimError,
        InterpreterError,
        IRParseError,
        VerifyError,
        NumericsError,
        PipelineError,
        StatsError,
        VizError,
        OSError,
    )


def _message(e: BaseException) -> str:
    from r1c.frontends.dsl.errors import DSLError

    if isinstance(e, DSLError):
        text = str(e)  # already `file:line:col: error: ...` with the source line, caret and hint
    elif isinstance(e, OSError) and e.filename and e.strerror:  # raised by the OS: "[Errno 2] ..." reads badly
        text = f"r1c: error: {e.strerror.lower()}: {e.filename}"
    else:
        text = f"r1c: error: {e}"
    notes = getattr(e, "__notes__", [])  # e.g. "while running pass 'cse'" from the pass manager
    return "\n".join([text, *(f"note: {n}" for n in notes)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0): argparse already printed
        return int(e.code or 0)
    show_traceback = os.environ.get("R1C_TRACEBACK", "") not in ("", "0")
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("r1c: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if show_traceback:
            traceback.print_exc()
        if isinstance(e, expected_errors()):
            print(_message(e), file=sys.stderr)
            return 1
        print(
            f"r1c: internal error: {type(e).__name__}: {e}\n"
            "please report this bug (run with R1C_TRACEBACK=1 to see the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
