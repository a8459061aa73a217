"""The pass manager: runs a pipeline with optional instrumentation (print IR after passes, verify after
each pass, time passes, and check numerics against the reference interpreter after each pass)."""

from __future__ import annotations

import difflib
import sys
import time
from typing import Any, TextIO

from r1c.ir.core import Module
from r1c.ir.printer import print_module
from r1c.ir.verifier import VerifyError, verify
from r1c.passes.numerics import NumericsError, Reference
from r1c.passes.pipeline import PipelineSpec, parse_pipeline
from r1c.passes.registry import PipelineError, get_pass
from r1c.passes.rewrite import clone_module


def _spec(pipeline: str | list) -> PipelineSpec:
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    out: PipelineSpec = []
    for item in pipeline:
        if isinstance(item, str):
            out += parse_pipeline(item)
        else:
            name, options = item
            get_pass(name).bind_options(options)  # fail now, not halfway through a run
            out.append((name, dict(options)))
    return out


class PassManager:
    def __init__(
        self,
        pipeline: str | list,
        verify_each: bool = False,
        print_ir_after: set[str] | str | None = None,
        print_changed: bool = False,
        time_passes: bool = False,
        check_numerics: bool = False,
        numerics_env: dict[str, int] | None = None,
        numerics_tol: float = 1e-4,
        seed: int = 0,
        out: TextIO | None = None,
    ) -> None:
        self.pipeline = _spec(pipeline)
        if isinstance(print_ir_after, str) and print_ir_after != "all":
            raise PipelineError(f"print_ir_after must be a set of pass names or 'all', got {print_ir_after!r}")
        for name in print_ir_after if isinstance(print_ir_after, set) else ():
            get_pass(name)
        self.print_ir_after = print_ir_after
        self.print_changed = print_changed
        self.verify_each = verify_each
        self.time_passes = time_passes
        self.check_numerics = check_numerics
        self.numerics_env = {"B": 2, "S": 8} if numerics_env is None else dict(numerics_env)
        self.numerics_tol = numerics_tol
        self.seed = seed
        self.out = out

    @property
    def _out(self) -> TextIO:
        return self.out if self.out is not None else sys.stderr  # looked up late so pytest capture sees it

    def _should_print(self, name: str) -> bool:
        return self.print_ir_after == "all" or (isinstance(self.print_ir_after, set) and name in self.print_ir_after)

    def run(self, module: Module) -> Module:
        """Run the pipeline on a copy of `module` and return the result; `module` is left unchanged."""
        if self.verify_each:
            try:
                verify(module)
            except VerifyError as e:
                raise VerifyError(f"IR is invalid before the pipeline: {e}") from None
        reference = Reference(module, self.numerics_env, self.seed) if self.check_numerics else None
        m = clone_module(module)
        timings: list[tuple[str, float]] = []
        # The check compares with the original module, so the allowances of lossy passes add up for later passes.
        tolerance = self.numerics_tol
        for name, options in self.pipeline:
            info = get_pass(name)
            before = print_module(m) if self.print_changed else ""
            start = time.perf_counter()
            try:
                m = info(m, **options)
            except Exception as e:
                e.add_note(f"while running pass '{name}'")
                raise
            timings.append((name, time.perf_counter() - start))
            if self.verify_each:
                try:
                    verify(m)
                except VerifyError as e:
                    raise VerifyError(f"IR is invalid after pass '{name}': {e}") from None
            if self._should_print(name):
                self._out.write(f"// ----- IR after {name} -----\n{print_module(m)}")
            if self.print_changed:
                self._out.write(_changes(name, before, print_module(m)))
            if reference is not None:
                tolerance += info.tolerance_for(options)
                self._check(reference, m, name, tolerance)
        if self.time_passes:
            self._out.write(_timing_table(timings))
        return m

    def _check(self, reference: Reference, m: Module, name: str, tolerance: float) -> None:
        try:
            err = reference.error_of(m)
        except NumericsError as e:
            raise NumericsError(f"pass '{name}' broke the numerics check: {e}") from None
        if not err <= tolerance:
            raise NumericsError(
                f"pass '{name}' changed the result: max relative error {err:.3g} > tolerance "
                f"{tolerance:g} (env {self.numerics_env}, seed {self.seed})"
            )
        self._out.write(f"// numerics after {name}: max relative error {err:.3g} (tolerance {tolerance:g})\n")


def _changes(name: str, before: str, after: str) -> str:
    """A unified diff of the module text across one pass: what a reader of a long pipeline wants to see."""
    diff = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"before {name}", f"after {name}", n=1
    )
    text = "".join(diff)
    return f"// ----- changes by {name} -----\n" + (text or "// (no change)\n")


def _timing_table(timings: list[tuple[str, float]]) -> str:
    total = sum(t for _, t in timings)
    width = max([len(n) for n, _ in timings] + [len("total")])
    lines = ["// ----- pass timings -----", f"{'pass':<{width}}  {'ms':>10}  {'%':>6}"]
    for name, t in timings:
        lines.append(f"{name:<{width}}  {t * 1e3:>10.3f}  {100 * t / total if total else 0.0:>6.1f}")
    lines.append(f"{'total':<{width}}  {total * 1e3:>10.3f}  {100.0 if total else 0.0:>6.1f}")
    return "\n".join(lines) + "\n"


def run_pipeline(module: Module, pipeline: str | list, **kwargs: Any) -> Module:
    """Shorthand for `PassManager(pipeline, **kwargs).run(module)`."""
    return PassManager(pipeline, **kwargs).run(module)
