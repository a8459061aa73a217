"""Fixtures shared by the distributed training tests: r1-tiny with a small training config (batch 4, seq 8, two
steps, clipping active: the gradient norm is about 5), the single-process reference run, and `ok`, which asserts
every rank of a spawned job succeeded and returns their results (a fixture, so no test module imports another)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import r1c
from r1c.distributed.launch import RankOutcome
from r1c.ir import run
from r1c.train.config import TrainConfig
from r1c.train.data import Batches, load_tokens
from r1c.train.runtime import Trainer, initial_state
from r1c.train.step import build_train_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup() -> tuple[r1c.ir.Module, TrainConfig, np.ndarray]:
    base = r1c.load(ROOT / "examples/r1-tiny.r1")
    cfg = TrainConfig.from_attrs(base.attrs, batch=4, seq=8, steps=2)
    return base, cfg, load_tokens(ROOT / "examples/data/tiny-corpus.txt", 512)


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """The single-process run: first-step loss and gradients (@loss_grad), state after two @train_step steps."""
    base, cfg, tokens = setup
    module = build_train_step(base, cfg)
    state = initial_state(base, module, cfg.seed)
    tk, lb = Batches(tokens, cfg.batch, cfg.seq, cfg.seed).next()
    loss, *grads = run(module, [tk, lb], state, function="loss_grad")
    trainer = Trainer(module, dict(state), Batches(tokens, cfg.batch, cfg.seq, cfg.seed))
    history = [trainer.run_step(), trainer.run_step()]
    return {
        "loss": float(loss),
        "grads": dict(zip(module.attrs["grad_params.loss"], grads)),
        "state": trainer.state,
        "losses": [r.loss for r in history],
        "norms": [r.grad_norm for r in history],
    }


def _ok(outcomes: list[RankOutcome]) -> list:
    failed = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    return [o.result for o in outcomes]


@pytest.fixture(scope="session")
def ok() -> Callable[[list[RankOutcome]], list]:
    return _ok


@pytest.fixture
def train_plain_and_torchrun(tmp_path) -> Callable[..., tuple[list[float], list[float], str, Path]]:
    """Runs `r1c train` on r1-tiny (2 steps, batch 2, seq 8) plainly and under `torchrun --nproc-per-node 2` with
    the given extra flags; returns both runs' losses, torchrun's stdout and its output directory."""

    def both(*extra: str) -> tuple[list[float], list[float], str, Path]:
        common = [str(ROOT / "examples/r1-tiny.r1"), "--data", str(ROOT / "examples/data/tiny-corpus.txt"),
                  "--steps", "2", "--batch", "2", "--seq", "8"]  # fmt: skip
        single = subprocess.run(
            [sys.executable, "-m", "r1c.cli", "train", *common, "--out", str(tmp_path / "single")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert single.returncode == 0, single.stderr
        out = tmp_path / "torchrun"
        run = subprocess.run(
            ["torchrun", "--nproc-per-node", "2", "-m", "r1c.cli", "train", *common, *extra, "--timeout", "60",
             "--out", str(out)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        losses = [[r["loss"] for r in json.loads((d / "losses.json").read_text())] for d in (tmp_path / "single", out)]
        return losses[0], losses[1], run.stdout, out

    return both
