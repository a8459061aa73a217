"""Helpers shared by the CLI subcommands: `--set key=value`, model loading, rich console, number formatting."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from rich.console import Console

from r1c.api import InputError, load

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def add_set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config constant of a .r1 model (repeatable), e.g. --set num_layers=2",
    )


def parse_value(text: str) -> Any:
    """`2` -> int, `1e-6` -> float, `true`/`false` -> bool, `"x"` or anything else -> str."""
    if text in ("true", "false"):
        return text == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key) or not value.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_layers=2")
        if key in out:
            raise InputError(f"--set {key} is given twice")
        out[key] = parse_value(value.strip())
    return out


def load_model(path: str, sets: list[str]):
    return load(path, overrides=parse_sets(sets) or None)


def console() -> Console:
    # Piped or captured output gets a fixed width so tables do not wrap at 80 columns.
    out = sys.stdout
    return Console(file=out, width=None if out.isatty() else 120, highlight=False)


def human(n: float, unit: str = "") -> str:
    """671026419200 -> "671.0B"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{' ' if unit else ''}{suffix}{unit}"
    text = f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"
    return f"{text} {unit}" if unit else text
