"""Pipelined inference (`r1c run --pipeline S`) of r1-tiny on gloo (CPU processes) against the interpreter.

The forward is split into S stages, one process each, with the batch streamed through them in micro-batches; the
last rank's logits equal the single-process interpreter's (1e-6 relative, f32), for 2 and 4 ranks and several
micro-batches and rows. Under `torchrun` the CLI writes the same logits as plain `r1c run`; bad options are errors.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.artifact import write
from r1c.cli import main
from r1c.distributed.inference import RunSpec
from r1c.distributed.launch import spawn_inference
from r1c.distributed.program import PipelineConfig
from r1c.ir import run
from r1c.ir.interpreter import init_weights

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"
RTOL = 1e-6  # relative to the largest logit
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, size=(4, 8)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(batch) -> np.ndarray:
    base = r1c.load(TINY)
    return run(base, [batch], init_weights(base, 0), function="forward")[0]


def _logits(outcomes: list) -> np.ndarray:
    failed = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    assert all(o.result is None for o in outcomes[:-1])  # only the last stage has the logits
    return outcomes[-1].result[0]


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= RTOL, f"logits differ by {err:.2e} (relative to the largest)"


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (4, 2)])
def test_pipelined_forward_matches_interpreter(batch, reference, stages: int, micro_batches: int) -> None:
    spec = RunSpec(str(TINY), batch, PipelineConfig(stages, micro_batches, timeout_s=TIMEOUT_S))
    _close(_logits(spawn_inference(spec)), reference)


def _tokens_args(batch: np.ndarray) -> list[str]:
    return [a for row in batch for a in ("--tokens", " ".join(map(str, row)))]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_cli_under_torchrun_matches_single_process(batch, reference, tmp_path, capsys) -> None:
    """An artifact of `r1c compile --target ref`: `torchrun --nproc-per-node 2 r1c run --pipeline 2` writes the logits
    of plain `r1c run` (of the artifact, and of the model file it was compiled from)."""
    art = tmp_path / "art"
    assert main(["compile", str(TINY), "--target", "ref", "-o", str(art)]) == 0
    assert main(["run", str(art), *_tokens_args(batch), "--output", str(tmp_path / "single.npy")]) == 0
    assert main(["run", str(TINY), *_tokens_args(batch), "--output", str(tmp_path / "model.npy")]) == 0
    capsys.readouterr()
    single = np.load(tmp_path / "single.npy")
    np.testing.assert_array_equal(single, np.load(tmp_path / "model.npy"))
    _close(single, reference)
    pipe = subprocess.run(
        ["torchrun", "--nproc-per-node", "2", "-m", "r1c.cli", "run", str(art), *_tokens_args(batch),
         "--pipeline", "2", "--micro-batches", "2", "--timeout", "60", "--output", str(tmp_path / "pipe.npy")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert pipe.returncode == 0, pipe.stderr[-3000:]
    assert pipe.stdout.count("saved logits [4, 8, 512]") == 1, pipe.stdout  # printed by the last rank only
    _close(np.load(tmp_path / "pipe.npy"), single)


def test_bad_options_are_errors(batch, tmp_path, capsys, monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    base = r1c.load(TINY)
    cpu_art = tmp_path / "cpu-art"  # the files of an artifact of another target (its kernels are not needed here)
    write(cpu_art, base, init_weights(base, 0), "cpu")
    rows = _tokens_args(batch)
    for argv, words in (
        ([str(TINY), *rows, "--pipeline", "2"], "start it with `torchrun --nproc-per-node N r1c run ...`"),
        ([str(TINY), *rows, "--pipeline", "1"], "--pipeline needs at least 2 stages, got 1"),
        ([str(TINY), *rows, "--pipeline", "2", "--micro-batches", "3"], "must be a multiple of --micro-batches (3)"),
        ([str(TINY), *rows, "--pipeline", "64"], "too few for 64 stages"),
        ([str(TINY), *rows, "--micro-batches", "2"], "--micro-batches and --timeout apply to --pipeline runs only"),
        ([str(cpu_art), *rows, "--pipeline", "2"], "needs an artifact of target 'ref'"),
        ([str(cpu_art), *rows, "--seed", "1"], "--set, --seed and --weights apply to a model file"),
        ([str(TINY), "--tokens", "1 600", "--pipeline", "2"], "token id 600 is out of range [0, 512)"),
    ):
        code = main(["run", *argv])
        err = capsys.readouterr().err
        assert code == 1 and words in err, (argv, err)
