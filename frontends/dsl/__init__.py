"""The r1c model language (docs/dsl.md): `.r1` text -> r1c IR, through the Python builder."""

from __future__ import annotations

import re
from pathlib import Path

from r1c.build import ModuleBuilder
from r1c.frontends.dsl.config import evaluate_config, evaluate_train
from r1c.frontends.dsl.errors import DSLError, Pos, SourceFile
from r1c.frontends.dsl.lower import Lowerer, reserved_names
from r1c.frontends.dsl.program import gather, stdlib_dir
from r1c.frontends.dsl.syntax import parse
from r1c.ir.core import Module
from r1c.ir.verifier import VerifyError, verify

__all__ = ["DSLError", "compile_source", "load", "stdlib_dir"]


def load(path: str | Path, overrides: dict[str, object] | None = None) -> Module:
    """Parse, lower and verify a `.r1` model file; `overrides` replace config constants (e.g. {"num_layers": 2})."""
    path = Path(path)
    return _compile(path.read_text(), str(path), [], overrides, path)


def compile_source(
    text: str,
    filename: str = "<string>",
    search_path: list[Path] | None = None,
    overrides: dict[str, object] | None = None,
) -> Module:
    """Like `load` for text; imports look in `search_path`, then in the stdlib."""
    return _compile(text, filename, [Path(p) for p in search_path or []], overrides, None)


def _module_name(filename: str) -> str:
    stem = Path(filename).stem if not filename.startswith("<") else "model"
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "model"
    return "_" + name if name[0].isdigit() else name


def _compile(
    text: str, filename: str, search_path: list[Path], overrides: dict[str, object] | None, path: Path | None
) -> Module:
    main = parse(text, filename)
    prog = gather(main, path, search_path, reserved_names())
    config = evaluate_config(prog, dict(overrides or {}), SourceFile(filename, text))
    attrs = {**config, **evaluate_train(prog, config)}
    mb = ModuleBuilder(main.model[0] if main.model else _module_name(filename), attrs)
    lowerer = Lowerer(prog, config, mb)
    if not prog.funcs:
        raise DSLError(
            "the model has no `func`",
            Pos(SourceFile(filename, text), 1, 1, 1, 2),
            hint="add `func forward(tokens: int32[B, S]) { ... }`",
        )
    for func in prog.funcs.values():
        lowerer.lower_func(func)
    try:
        return verify(mb.module)
    except VerifyError as e:
        raise DSLError(
            f"the lowered IR does not verify: {e}",
            next(iter(prog.funcs.values())).name_pos,
            hint="this is a bug in the DSL lowering or an op's type rule; please report it",
        ) from None
