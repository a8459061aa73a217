"""`r1c train`: progress, checkpoints, losses.json, loss.png, resume, and clean errors."""

from __future__ import annotations

import json

from r1c.cli import main
from tests.train.conftest import CORPUS, TINY


def test_train_writes_outputs_and_resumes(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", str(TINY), "--data", str(CORPUS), "--steps", "6", "--out", str(out), "--save-every", "3"]
    assert main(argv) == 0
    assert "trained @r1_tiny to step 6" in capsys.readouterr().out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    full = json.loads((out / "losses.json").read_text())
    assert [r["step"] for r in full] == list(range(1, 7))
    resumed = tmp_path / "resumed"
    argv = ["train", str(TINY), "--data", str(CORPUS), "--steps", "6", "--out", str(resumed)]
    assert main(argv + ["--resume", str(out / "checkpoint-3.safetensors")]) == 0
    assert json.loads((resumed / "losses.json").read_text()) == full


def test_errors_are_one_line(tmp_path, capsys) -> None:
    base = ["train", str(TINY), "--out", str(tmp_path)]
    cases = [
        (["--data", str(tmp_path / "none.txt")], "no such file or directory"),
        (["--data", str(CORPUS), "--precision", "fp8"], "train.precision must be one of"),
        (["--data", str(CORPUS), "--lora-rank", "2", "--lora-targets", "qq_proj"], "LoRA target 'qq_proj'"),
        (["--data", str(CORPUS), "--resume", str(CORPUS)], "not a readable safetensors checkpoint"),
        (["--data", str(CORPUS), "--set", "vocab_size=200"], "vocab_size >= 256"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith("r1c: error:") and message in err and len(err.strip().splitlines()) == 1, err
