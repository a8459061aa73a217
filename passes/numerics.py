"""The numerics oracle: run the reference interpreter on random weights and inputs before and after a
transformation and measure how far the outputs moved (max|a-b| / max(|b|, tiny), over all outputs)."""

from __future__ import annotations

import numpy as np

from r1c.ir.core import Module
from r1c.ir.interpreter import InterpreterError, init_weights, random_inputs, run

TINY = 1e-30


class NumericsError(RuntimeError):
    pass


def max_rel_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Max |got-want| / max(|want|) per output, maximized over outputs; NaN/inf in the same places agree."""
    if len(got) != len(want):
        raise NumericsError(f"{len(got)} outputs, expected {len(want)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if np.shape(a) != np.shape(b):
            raise NumericsError(f"output {i} has shape {np.shape(a)}, expected {np.shape(b)}")
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(a - b))
        if not np.all(np.isfinite(diff)):
            return float("inf")
        finite = np.abs(b[np.isfinite(b)])
        scale = max(float(finite.max()) if finite.size else 0.0, TINY)
        worst = max(worst, float(diff.max(initial=0.0)) / scale)
    return worst


def check_param_names(m: Module, weights: dict[str, np.ndarray]) -> None:
    """Weights are looked up by name across transformations; a renamed or new parameter has none."""
    for f in m.functions.values():
        for op in f.body:
            if op.name == "param" and op.attrs["name"] not in weights:
                raise NumericsError(
                    f"@{f.name} reads parameter @{op.attrs['name']}, which the original module "
                    f"does not have: the numerics check needs parameter names to stay stable"
                )


class Reference:
    """Random weights and inputs for `m`'s main function, and the reference outputs on them."""

    def __init__(
        self, m: Module, env: dict[str, int], seed: int = 0, weights: dict[str, np.ndarray] | None = None
    ) -> None:
        self.weights = init_weights(m, seed) if weights is None else weights
        self.inputs = random_inputs(m, m.main, env, seed)
        self.outputs = run(m, self.inputs, self.weights)

    def error_of(self, m: Module) -> float:
        """Max relative error of `m`'s main function against the reference outputs."""
        check_param_names(m, self.weights)
        try:
            got = run(m, self.inputs, self.weights)
        except InterpreterError as e:
            raise NumericsError(f"the reference interpreter failed: {e}") from None
        return max_rel_error(got, self.outputs)


def compare_modules(
    before: Module, after: Module, env: dict[str, int], seed: int = 0, weights: dict[str, np.ndarray] | None = None
) -> float:
    """Max relative error of `after` against `before` on random inputs (weights random unless given)."""
    return Reference(before, env, seed, weights).error_of(after)
