"""Fixtures for the CLI tests: a tiny MoE model as IR text, a compiled artifact, and a main(argv) runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_tiny_model import tiny_lm

from r1c.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    def run(*argv: str) -> Result:
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def tiny_ir(tmp_path) -> Path:
    path = tmp_path / "tiny.ir"
    path.write_text(str(tiny_lm()))
    return path


@pytest.fixture
def tiny_artifact(tmp_path, tiny_ir, cli) -> Path:
    out = tmp_path / "art"
    res = cli("compile", str(tiny_ir), "--target", "ref", "-o", str(out), "--seed", "3")
    assert res.code == 0, res.err
    return out
