"""Property tests over random modules: every built-in pass keeps the module valid and its reference
result unchanged, and canonicalize/cse/dce are idempotent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from r1c.ir import dims, parse_module, print_module, verify
from r1c.passes import PassManager, compare_modules, get_pass

_path = Path(__file__).parents[1] / "ir" / "strategies.py"
_spec = importlib.util.spec_from_file_location("r1c_test_strategies", _path)
strategies = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = strategies
    _spec.loader.exec_module(strategies)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PASSES = ["canonicalize", "cse", "dce", "constant-fold", "shape-inference"]


def _copy(m):
    return parse_module(print_module(m))


def _bind_all(m) -> str:
    used = sorted({s for a in m.main.args for d in a.type.shape for s in dims.symbols(d)})
    return ",".join(f"{s}={strategies.ENV[s]}" for s in used)


def _check_preserves(name: str, m) -> None:
    out = get_pass(name)(_copy(m))
    verify(out)
    assert parse_module(print_module(out)) == out
    assert compare_modules(m, out, strategies.ENV, seed=3) == 0.0


@pytest.mark.parametrize("name", PASSES)
@SETTINGS
@given(m=strategies.modules())
def test_pass_preserves_validity_and_numerics(name, m) -> None:
    _check_preserves(name, m)


# Graphs made only of the ops the rewriting passes have patterns for, and more of them: a wrong pattern
# (say `0 - x -> x`) shows up within this many examples, where the general graphs rarely reach it.
@pytest.mark.parametrize("name", ["canonicalize", "constant-fold", "cse"])
@settings(SETTINGS, max_examples=150)
@given(m=strategies.modules(kinds=strategies.REWRITE_KINDS))
def test_rewrites_preserve_validity_and_numerics(name, m) -> None:
    _check_preserves(name, m)


@pytest.mark.parametrize("name", ["canonicalize", "cse", "dce"])
@SETTINGS
@given(m=strategies.modules())
def test_pass_is_idempotent(name, m) -> None:
    once = get_pass(name)(_copy(m))
    text = print_module(once)
    assert print_module(get_pass(name)(once)) == text


@SETTINGS
@given(m=strategies.modules(max_ops=16))
def test_full_pipeline_with_instrumentation(m) -> None:
    bind = _bind_all(m)
    pipeline = "canonicalize,cse,constant-fold,canonicalize,dce"
    if bind:
        pipeline += f',shape-inference{{bind="{bind}"}}'
    out = PassManager(
        pipeline, verify_each=True, check_numerics=True, numerics_env=strategies.ENV, numerics_tol=0.0
    ).run(m)
    assert all(a.type.is_static for a in out.main.args)
    used = {v for op in out.main.body for v in op.operands} | set(out.main.results)
    assert all(any(r in used for r in op.results) for op in out.main.body)  # dce ran last: nothing dead
