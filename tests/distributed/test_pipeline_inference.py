"""Pipelined and expert-parallel inference (`r1c run --pipeline S --expert-parallel E`) of r1-tiny on gloo (CPU
processes) against the interpreter.

The forward is split into S stages, one process each, with the batch streamed through them in micro-batches, and
replicated E times over the rows with the routed experts split over the replicas; the logits of the last stage (of
replica 0) equal the single-process interpreter's (1e-6 relative, f32), for 2 and 4 ranks and several micro-batches
and rows. Under `torchrun` the CLI prints or writes the same as plain `r1c run`; bad options are one-line errors.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.artifact import write
from r1c.cli import main
from r1c.distributed.inference import RunSpec, build_inference
from r1c.distributed.launch import free_port, spawn_inference
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


def _logits(outcomes: list, holder: int = -1) -> np.ndarray:
    """The logits of rank `holder` (the last stage of replica 0), checking that no other rank returned any."""
    failed = [f"rank {o.rank}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
    holder %= len(outcomes)
    assert all(o.result is None for o in outcomes if o.rank != holder)
    return outcomes[holder].result[0]


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= RTOL, f"logits differ by {err:.2e} (relative to the largest)"


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (4, 2)])
def test_pipelined_forward_matches_interpreter(batch, reference, stages: int, micro_batches: int) -> None:
    spec = RunSpec(str(TINY), batch, PipelineConfig(stages, micro_batches, timeout_s=TIMEOUT_S))
    _close(_logits(spawn_inference(spec)), reference)


@pytest.mark.parametrize("stages, micro_batches", [(1, 2), (2, 2)])
def test_expert_parallel_forward_matches_interpreter(batch, reference, stages: int, micro_batches: int) -> None:
    """`--expert-parallel 2`, alone (2 ranks) and with `--pipeline 2` (4): replica r runs rows 2r and 2r+1, each
    rank with half of its stage's experts; the last stage of replica 0 returns the whole batch's logits."""
    pc = PipelineConfig(stages, micro_batches, timeout_s=TIMEOUT_S, data_parallel=2, expert_parallel=2)
    base = r1c.load(TINY)
    module, plans = build_inference(base, "forward", pc, len(batch), batch.shape[1])
    experts = sorted(n for p in plans for n in p.experts)  # each declared as a block of 4 of the 8 experts
    assert experts == sorted(n for n in base.params if ".experts." in n)
    assert {module.params[n].type.shape[0] for n in experts} == {4}
    _close(_logits(spawn_inference(RunSpec(str(TINY), batch, pc)), holder=stages - 1), reference)


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


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_cli_expert_parallel_prints_what_run_prints(batch) -> None:
    """`torchrun --nproc-per-node 2 r1c run MODEL --expert-parallel 2` prints plain `r1c run`'s top-k table, once."""
    cmd = ["-m", "r1c.cli", "run", str(TINY), *_tokens_args(batch)]
    single = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    ep = subprocess.run(
        ["torchrun", "--nproc-per-node", "2", *cmd, "--expert-parallel", "2", "--timeout", "60"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert "top-5 next tokens" in single.stdout and ep.stdout == single.stdout


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
        ([str(TINY), *rows, "--micro-batches", "2"], "--timeout and --comm apply to --pipeline / --expert"),
        ([str(TINY), *rows, "--expert-parallel", "2"], "start it with `torchrun --nproc-per-node N r1c run ...`"),
        ([str(TINY), *rows, "--expert-parallel", "3"], "multiple of --micro-batches (1) times --expert-parallel (3)"),
        ([str(TINY), *_tokens_args(batch[:3]), "--expert-parallel", "3"], "3 must divide the number of routed experts"),
        ([str(TINY), *rows, "--expert-parallel", "2", "--set", "n_routed_experts=0"], "has no routed experts"),
        ([str(cpu_art), *rows, "--pipeline", "2"], "needs an artifact of target 'ref'"),
        ([str(cpu_art), *rows, "--seed", "1"], "--set, --seed and --weights apply to a model file"),
        ([str(TINY), "--tokens", "1 600", "--pipeline", "2"], "token id 600 is out of range [0, 512)"),
    ):
        code = main(["run", *argv])
        err = capsys.readouterr().err
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    # Under torchrun (its environment) with the wrong process count: an error before joining the job, which would
    # otherwise wait for ranks that never come.
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for layout, words in (
        (
            ["--pipeline", "2", "--expert-parallel", "2"],
            "--pipeline 2 --expert-parallel 2 needs 4 processes, the job has 2",
        ),
        (["--expert-parallel", "4"], "--expert-parallel 4 needs 4 processes, the job has 2"),
    ):
        code = main(["run", str(TINY), *rows, *layout, "--timeout", "5"])  # a regression fails, not hangs
        err = capsys.readouterr().err
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, (layout, err)
