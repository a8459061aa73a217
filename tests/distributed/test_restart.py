"""Automatic restart: `torchrun --max-restarts 1 ... r1c train --pipeline 2 --resume auto` survives a worker killed
with SIGKILL (torchrun restarts the group, which resumes from the newest complete checkpoint) and ends with the
losses of an uninterrupted run, exactly; `--resume auto` skips checkpoint directories a crash left incomplete and
starts at step 0 when there is no checkpoint; a finished job started again ends well. The single-process trainer's
`--resume auto` too.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from r1c.cli import main
from r1c.distributed.checkpoint import newest_complete
from r1c.train.resume import newest_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"
CORPUS = ROOT / "examples/data/tiny-corpus.txt"
STEPS, SAVE_EVERY = 100, 5  # about 3 s of steps: the kill lands while the run is still training
TRAIN = [str(TINY), "--data", str(CORPUS), "--batch", "2", "--seq", "8", "--save-every", str(SAVE_EVERY)]
PIPELINE = [*TRAIN, "--steps", str(STEPS), "--pipeline", "2", "--timeout", "30", "--resume", "auto"]


def _torchrun(out: Path, max_restarts: int = 0) -> list[str]:
    # torch.distributed.run of this interpreter is torchrun; `-m r1c.cli` is `r1c` without a shell shim in between.
    return [sys.executable, "-m", "torch.distributed.run", "--max-restarts", str(max_restarts), "--nproc-per-node",
            "2", "-m", "r1c.cli", "train", *PIPELINE, "--out", str(out)]  # fmt: skip


def _worker(job: subprocess.Popen, rank: int) -> psutil.Process:
    """The first attempt's worker of that rank among torchrun's processes."""
    for w in psutil.Process(job.pid).children(recursive=True):
        try:
            env = w.environ()
        except psutil.Error:  # a process that just ended
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return w
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def _losses(out: Path) -> list[dict]:
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The run as it goes without failures: `--resume auto` on an empty --out."""
    out = tmp_path_factory.mktemp("uninterrupted")
    p = subprocess.run(_torchrun(out), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, out


def test_auto_without_checkpoint_starts_fresh(uninterrupted) -> None:
    p, out = uninterrupted
    assert f"no complete checkpoint under {out}: starting at step 0" in p.stdout
    assert [r["step"] for r in _losses(out)] == list(range(1, STEPS + 1))
    assert (out / "loss.png").is_file() and (out / "checkpoint/manifest.json").is_file()


def test_killed_worker_restarts_from_newest_checkpoint(uninterrupted, tmp_path) -> None:
    """SIGKILL rank 1 once checkpoint-10 is complete: rank 0 fails with a PeerError, torchrun restarts both, they
    resume from the newest complete checkpoint, and losses.json holds the uninterrupted run's history."""
    out = tmp_path / "run"
    job = subprocess.Popen(_torchrun(out, max_restarts=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-10/manifest.json").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before checkpoint-10"
            time.sleep(0.01)
        _worker(job, 1).send_signal(signal.SIGKILL)
        assert not (out / "checkpoint/manifest.json").is_file(), "the run finished before the kill: make it longer"
        stdout, stderr = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    resumed = re.search(rf"resumed from {re.escape(str(out))}/checkpoint-(\d+) at step (\d+) after restart 1", stdout)
    assert resumed, stdout[-3000:]
    assert resumed[1] == resumed[2] and int(resumed[2]) >= 10  # not an older checkpoint than the kill saw
    assert _losses(out) == _losses(uninterrupted[1])  # the whole history, bit for bit


def test_auto_skips_incomplete_checkpoints(uninterrupted, tmp_path) -> None:
    """Checkpoints 20 and 40 are complete; 60 lost its manifest and 80 a stage file (a crash mid-save): resume
    from 40, with the losses of the uninterrupted run."""
    _, ref = uninterrupted
    out = tmp_path / "run"
    for k in (20, 40, 60, 80):
        shutil.copytree(ref / f"checkpoint-{k}", out / f"checkpoint-{k}")
    (out / "checkpoint-60/manifest.json").unlink()
    (out / "checkpoint-80/stage-1.safetensors").unlink()
    (out / "checkpoint-90").mkdir()
    (out / "checkpoint-90/stage-0.safetensors.tmp").write_bytes(b"cut short")
    assert newest_complete(out)[0] == out / "checkpoint-40"
    p = subprocess.run(_torchrun(out), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-40'} at step 40\n" in p.stdout
    assert _losses(out) == _losses(ref)


def test_single_process_auto_resume(tmp_path, capsys) -> None:
    """`r1c train --resume auto` without --pipeline: a fresh start, then a longer run continuing from the newest
    readable checkpoint file (an unreadable newer one is skipped), equal to an uninterrupted run."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["train", *TRAIN, "--steps", "6", "--out", str(whole)]) == 0
    assert main(["train", *TRAIN, "--steps", "5", "--out", str(out), "--resume", "auto"]) == 0
    assert f"no complete checkpoint under {out}: starting at step 0" in capsys.readouterr().out
    (out / "checkpoint-6.safetensors").write_bytes(b"not a checkpoint")
    assert newest_file(out) == (out / "checkpoint.safetensors", 5)
    assert main(["train", *TRAIN, "--steps", "6", "--out", str(out), "--resume", "auto"]) == 0
    assert f"resumed from {out / 'checkpoint.safetensors'} at step 5" in capsys.readouterr().out
    assert _losses(out) == _losses(whole)
    assert main(["train", *TRAIN, "--steps", "6", "--out", str(out), "--resume", "auto"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_finished_job_started_again_ends_well(uninterrupted, tmp_path) -> None:
    """A restart after the final save (a rank failed while exiting) has nothing to train: it exits 0, so torchrun
    stops restarting, and rewrites losses.json from the manifest."""
    _, ref = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoint", out / "checkpoint")
    p = subprocess.run(_torchrun(out), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"nothing to train: {out / 'checkpoint'} is at step {STEPS} (--steps {STEPS})" in p.stdout
    assert _losses(out) == _losses(ref)
