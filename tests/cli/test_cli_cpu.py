"""`r1c compile --target cpu` with --shapes and --tuning-db, and `r1c tune`'s errors (the tuning run itself is a
slow test in tests/backends/cpu/test_cpu_kernels.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")


def test_compile_cpu_with_static_shapes_runs(cli, tiny_ir, tmp_path):
    out = tmp_path / "art"
    res = cli("compile", str(tiny_ir), "--target", "cpu", "--shapes", "B=1,S=4", "--tuning-db", str(tmp_path / "db"),
              "-o", str(out))  # fmt: skip
    assert res.code == 0, res.err
    plan = json.loads((out / "cpu_plan.json").read_text())
    assert plan["shapes"] == {"B": 1, "S": 4} and plan["tuned"] == []
    res = cli("run", str(out), "--tokens", "1 2 3 4", "--output", str(tmp_path / "l.npy"))
    assert res.code == 0, res.err
    assert np.isfinite(np.load(tmp_path / "l.npy")).all()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "B=one"], "expected SYMBOL=N"),
        (["--shapes", "B=0"], "N >= 1"),
        ([], "needs static shapes: give --shapes"),
        (["--shapes", "B=1,S=4", "--trials", "0"], "--trials must be >= 1"),
    ],
)
def test_tune_errors_are_one_line(cli, tiny_ir, argv, message):
    res = cli("tune", str(tiny_ir), *argv)
    assert res.code == 1 and message in res.err and "Traceback" not in res.err, res.err


def test_shapes_flag_needs_a_cpu_target(cli, tiny_ir, tmp_path):
    res = cli("compile", str(tiny_ir), "--target", "ref", "--shapes", "B=1", "-o", str(tmp_path / "a"))
    assert res.code == 1 and "--shapes and --tuning-db apply to --target cpu" in res.err
