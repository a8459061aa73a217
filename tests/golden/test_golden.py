"""Runs every golden file under tests/golden/<pass>/: parse -> verify -> pipeline -> verify -> exact IR text,
and the reference interpreter before/after agrees on random inputs."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import pytest

from r1c.ir import VerifyError, parse_module, print_module, verify
from r1c.passes import PassManager, all_passes, compare_modules, get_pass, parse_pipeline

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("r1c_golden_format", HERE / "golden.py")
golden = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = golden  # dataclasses look their module up there
_spec.loader.exec_module(golden)

FILES = sorted(HERE.glob("*/*.ir"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(HERE)) for p in FILES])
def test_golden(path: Path) -> None:
    g = golden.load(path)
    before = parse_module(g.input_ir, str(path))
    if g.input_invalid:
        with pytest.raises(VerifyError):
            verify(before)
    else:
        verify(before)
    after = PassManager(g.pipeline).run(before)
    verify(after)
    got = print_module(after)
    if got != g.expected:
        diff = "".join(difflib.unified_diff(g.expected.splitlines(True), got.splitlines(True), "expected", "got"))
        pytest.fail(f"{path.name}: output of `{g.pipeline}` differs from // CHECK:\n{diff}")
    assert parse_module(got) == after  # the expected text is itself valid, round-tripping IR
    if not g.input_invalid and not g.no_numerics:
        # Lossy passes (kv-quant) declare how much error they may add; exact passes add none.
        allowed = 1e-6 + sum(get_pass(name).tolerance_for(options) for name, options in parse_pipeline(g.pipeline))
        assert compare_modules(before, after, g.env, seed=1) <= allowed


def test_every_builtin_pass_has_golden_files() -> None:
    by_pass: dict[str, int] = {}
    for path in FILES:
        by_pass[path.parent.name] = by_pass.get(path.parent.name, 0) + 1
    for name in all_passes():
        assert by_pass.get(name, 0) >= 3, f"pass '{name}' has {by_pass.get(name, 0)} golden files, want >= 3"
