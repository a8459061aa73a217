"""The installed `r1c` script, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

R1C = shutil.which("r1c") or pytest.skip("the r1c console script is not installed", allow_module_level=True)


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [R1C, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "R1C_TRACEBACK": "", **(env or {})},
    )


def test_script_compiles_and_runs(tiny_ir, tmp_path):
    out = tmp_path / "art"
    res = _run("compile", str(tiny_ir), "--target", "ref", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").is_file() and (out / "weights.safetensors").is_file()
    res = _run("run", str(out), "--tokens", "3 1 4 1 5", "--top", "2")
    assert res.returncode == 0, res.stderr
    assert "rank" in res.stdout and "logit" in res.stdout


def test_script_error_exit_codes(tiny_ir, tmp_path):
    res = _run("compile", str(tiny_ir), "--target", "fpga", "-o", str(tmp_path / "o"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[0].startswith("r1c: error: unknown target 'fpga'")
    assert "Traceback" not in res.stderr
    res = _run("compile", "--bogus")
    assert res.returncode == 2 and "usage:" in res.stderr


def test_module_invocation_version():
    res = subprocess.run([sys.executable, "-m", "r1c.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("r1c ")
