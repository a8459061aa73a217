"""The target registry: each backend registers a name, a compile function and (optionally) a runner.

A target that is planned but not written yet is a clear error, never a silent fallback to another one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Module

CompileFn = Callable[["Module", dict[str, np.ndarray], Path, Mapping[str, Any]], "Artifact"]
RunFn = Callable[["Artifact", list[np.ndarray]], list[np.ndarray]]


class TargetError(ValueError):
    """Unknown or not-yet-implemented target."""


@dataclass(frozen=True)
class Target:
    name: str
    compile: CompileFn
    description: str
    run: RunFn | None = None  # None: artifacts of this target cannot be executed in this process


_TARGETS: dict[str, Target] = {}

# Targets on the roadmap (DESIGN.md). Naming them keeps `--target cuda` from reading like a typo.
PLANNED: dict[str, str] = {}

# Modules that register targets on import; loaded on first lookup so `import r1c` stays cheap.
_BUILTIN = ("r1c.backends.ref", "r1c.backends.cuda.target", "r1c.backends.cpu.target", "r1c.backends.tpu.target")


def register_target(name: str, compile_fn: CompileFn, description: str, run_fn: RunFn | None = None) -> Target:
    if name in _TARGETS:
        raise ValueError(f"target '{name}' is registered twice")
    _TARGETS[name] = Target(name, compile_fn, description, run_fn)
    return _TARGETS[name]


def _ensure_loaded() -> None:
    for mod in _BUILTIN:
        importlib.import_module(mod)


def all_targets() -> dict[str, Target]:
    _ensure_loaded()
    return dict(_TARGETS)


def get_target(name: str) -> Target:
    _ensure_loaded()
    if name in _TARGETS:
        return _TARGETS[name]
    available = ", ".join(sorted(_TARGETS)) or "none"
    if name in PLANNED:
        raise TargetError(
            f"target '{name}' is not implemented yet (planned: {PLANNED[name]}); available targets: {available}"
        )
    raise TargetError(
        f"unknown target '{name}'; available targets: {available}"
        + (f" (planned: {', '.join(sorted(PLANNED))})" if PLANNED else "")
    )


def check_options(target: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TargetError(f"target '{target}' has no option(s) {', '.join(unknown)}; it takes {', '.join(allowed)}")


def optimized_entry(
    target: str, module: "Module", options: Mapping[str, Any], default_pipeline: str
) -> tuple["Module", str]:
    """The module after the `passes` option's pipeline (default_pipeline if absent, none if ""), verified, and the
    name of the function to compile (the `entry` option, default the module's main)."""
    from r1c.ir.verifier import verify
    from r1c.passes import PassManager

    passes = options.get("passes", default_pipeline)
    if passes:
        module = PassManager(passes).run(module)
    verify(module)
    entry = options.get("entry") or module.main.name
    if entry not in module.functions:
        have = ", ".join(module.functions)
        raise TargetError(f"target '{target}': no function '{entry}' to compile; the module has {have}")
    return module, entry


__all__ = [
    "PLANNED",
    "Target",
    "TargetError",
    "all_targets",
    "check_options",
    "get_target",
    "optimized_entry",
    "register_target",
]
