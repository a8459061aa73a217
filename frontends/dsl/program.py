"""Gather a model and its imports into one program: every block, the entry funcs and the evaluated config."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import r1c
from r1c.frontends.dsl import nodes as n
from r1c.frontends.dsl.errors import DSLError, Pos
from r1c.frontends.dsl.syntax import parse


def stdlib_dir() -> Path:
    return Path(r1c.__file__).parent / "stdlib"


@dataclass
class Program:
    main: n.File
    blocks: dict[str, n.Callable] = field(default_factory=dict)
    funcs: dict[str, n.Callable] = field(default_factory=dict)


def did_you_mean(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def gather(main: n.File, main_path: Path | None, search_path: list[Path], reserved: set[str]) -> Program:
    """Resolve imports depth-first (each file once) and collect definitions; a name defined twice is an error."""
    prog = Program(main)
    defined: dict[str, Pos] = {}
    visited: set[Path] = set()

    def define(c: n.Callable) -> None:
        if c.name in defined:
            first = defined[c.name]
            raise DSLError(
                f"'{c.name}' is defined twice", c.name_pos, hint=f"the first definition is at {first}; rename one"
            )
        if c.name in reserved:
            raise DSLError(
                f"{'func' if c.is_func else 'block'} '{c.name}' has the name of an op or builtin",
                c.name_pos,
                hint="rename it: calls to that name must keep meaning the op",
            )
        defined[c.name] = c.name_pos
        (prog.funcs if c.is_func else prog.blocks)[c.name] = c

    def visit(f: n.File, here: Path | None) -> None:
        for imp in f.imports:
            dirs = ([here] if here else []) + search_path + [stdlib_dir()]
            found = next((d / f"{imp.name}.r1" for d in dirs if (d / f"{imp.name}.r1").is_file()), None)
            if found is None:
                raise DSLError(
                    f"cannot find '{imp.name}.r1' to import",
                    imp.pos,
                    hint="looked in " + ", ".join(str(d) for d in dirs),
                )
            key = found.resolve()
            if key in visited:
                continue
            visited.add(key)
            sub = parse(found.read_text(), str(found))
            if sub.model_items:
                raise DSLError(
                    f"an imported file may hold only blocks and imports, but {found.name} has "
                    f"`model`, `config`, `train` or `func`",
                    sub.model_items[0],
                    hint="move config and funcs to the model file",
                )
            visit(sub, found.parent)
            for b in sub.blocks:
                define(b)

    if main_path is not None:
        visited.add(main_path.resolve())
    visit(main, main_path.parent if main_path is not None else None)
    for c in main.blocks + main.funcs:
        define(c)
    return prog
