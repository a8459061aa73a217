"""Expert-parallel training of r1-tiny on gloo (CPU processes) against the single-process trainer.

E ranks are data-parallel replicas (each on 1/E of the batch) that hold 1/E of the routed experts each; tokens go
to their experts' ranks and back by all-to-all. The loss, every gradient (an expert's from the rank that holds
it), and after two AdamW steps every parameter and moment equal the single-process run's within 1e-5 (f32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.cli import main
from r1c.distributed.launch import TrainSpec, spawn_training, train_rank
from r1c.distributed.program import DistributedError, PipelineConfig, build_pipeline

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"
CORPUS = ROOT / "examples/data/tiny-corpus.txt"
TOL = 1e-5
TIMEOUT_S = 30.0


def _whole(name: str, rows: dict[str, tuple[int, int]], full: np.ndarray) -> np.ndarray:
    """The part of a single-process tensor a rank holds: its expert block's rows, or all of it."""
    return full[slice(*rows[name])] if name in rows else full


def _check(results: list, reference: dict, replicas: int) -> None:
    """Every rank against the single process: loss, gradients, and the state after two steps."""
    blocks: dict[str, set[tuple[int, int]]] = {}
    for r in results:
        assert abs(r.first_loss - reference["loss"]) <= TOL
        assert [h.loss for h in r.history] == pytest.approx(reference["losses"], abs=TOL)
        assert [h.grad_norm for h in r.history] == pytest.approx(reference["norms"], rel=TOL)
        for kind, got, want in (("gradient", r.first_grads, "grads"), ("state", r.state, "state")):
            for name, value in got.items():
                err = float(np.max(np.abs(value - _whole(name, r.expert_rows, reference[want][name]))))
                assert err <= TOL, f"rank {r.rank}: {kind} of {name} differs by {err}"
        for name, rows in r.expert_rows.items():
            blocks.setdefault(name, set()).add(rows)
    # Every expert tensor is split into `replicas` disjoint blocks covering all its rows; the stages together hold
    # every gradient and every state tensor.
    assert blocks
    for name, b in blocks.items():
        assert len(b) == replicas and sum(stop - start for start, stop in b) == len(reference["state"][name])
    assert set().union(*(r.first_grads for r in results)) == set(reference["grads"])
    assert set().union(*(r.state for r in results)) == set(reference["state"])


@pytest.fixture(scope="module")
def two_rank_run(setup, ok, tmp_path_factory) -> tuple[list, Path]:
    """--expert-parallel 2 (2 processes, 4 experts each), 2 micro-batches per replica; checkpoints every step."""
    base, cfg, tokens = setup
    out = tmp_path_factory.mktemp("ep2")
    pc = PipelineConfig(1, 2, "gpipe", TIMEOUT_S, data_parallel=2, expert_parallel=2)
    spec = TrainSpec(str(TINY), cfg, pc, tokens, out=str(out), save_every=1, keep_grads=True)
    return ok(spawn_training(spec)), out


def test_two_ranks_match_single_process(two_rank_run, reference) -> None:
    results, out = two_rank_run
    _check(results, reference, 2)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "manifest.json",
        "stage-0-experts-1.safetensors",
        "stage-0.safetensors",
    ]


def test_four_ranks_pipeline_and_experts_match_single_process(setup, reference, ok) -> None:
    """--pipeline 2 --expert-parallel 2 (4 processes): the experts of each stage split over its 2 replicas."""
    base, cfg, tokens = setup
    pc = PipelineConfig(2, 1, "1f1b", TIMEOUT_S, data_parallel=2, expert_parallel=2)
    _check(ok(spawn_training(TrainSpec(str(TINY), cfg, pc, tokens, keep_grads=True))), reference, 2)


def test_four_ranks_match_single_process(setup, reference, ok) -> None:
    """--expert-parallel 4 (4 processes, 2 experts and 1 batch row each)."""
    base, cfg, tokens = setup
    pc = PipelineConfig(1, 1, "gpipe", TIMEOUT_S, data_parallel=4, expert_parallel=4)
    _check(ok(spawn_training(TrainSpec(str(TINY), cfg, pc, tokens, keep_grads=True))), reference, 4)


def test_checkpoint_resumes_without_expert_parallelism(two_rank_run, setup, reference, ok) -> None:
    """Step 1 on 2 expert-parallel ranks, step 2 on a 2-stage pipeline without expert parallelism from its
    checkpoint (the expert blocks joined by name): the single-process state after two steps."""
    (_, out), (_, cfg, tokens) = two_rank_run, setup
    spec = TrainSpec(str(TINY), cfg, PipelineConfig(2, 1, "gpipe", TIMEOUT_S), tokens, resume=str(out / "checkpoint-1"))
    results = ok(spawn_training(spec))
    assert [h.loss for h in results[0].history] == pytest.approx(reference["losses"], abs=TOL)
    merged = {n: v for r in results for n, v in r.state.items()}
    assert set(merged) == set(reference["state"])
    assert max(float(np.max(np.abs(v - reference["state"][n]))) for n, v in merged.items()) <= TOL


def test_bad_layouts_are_errors(setup) -> None:
    base, cfg, _ = setup
    with pytest.raises(DistributedError, match="--expert-parallel 3 must divide the number of routed experts"):
        build_pipeline(base, cfg.replace(batch=3), PipelineConfig(1, 1, data_parallel=3, expert_parallel=3))
    dense = r1c.load(TINY, overrides={"n_routed_experts": 0})
    with pytest.raises(DistributedError, match="has no routed experts"):
        build_pipeline(dense, cfg, PipelineConfig(1, 1, data_parallel=2, expert_parallel=2))
    with pytest.raises(DistributedError, match=r"it needs --data-parallel 2 \(or none\), got 4"):
        PipelineConfig(2, 1, data_parallel=4, expert_parallel=2)
    with pytest.raises(DistributedError, match="at least 2 stages"):
        PipelineConfig(1, 1, data_parallel=2)
    with pytest.raises(DistributedError, match="--pipeline 2 --expert-parallel 2 needs 4 processes, the job has 2"):
        pc = PipelineConfig(2, 1, data_parallel=2, expert_parallel=2)
        train_rank(0, 2, TrainSpec(str(TINY), cfg, pc, np.zeros(64, np.int32)))


def test_cli_bad_layouts_fail_before_joining(tmp_path, capsys, monkeypatch) -> None:
    """Without torchrun: the layout is checked against the model first, so a bad one is one clear error."""
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    args = ["train", str(TINY), "--data", str(CORPUS), "--out", str(tmp_path)]
    for extra, words in (
        (["--batch", "6", "--expert-parallel", "3"], "must divide the number of routed experts"),
        (["--expert-parallel", "2", "--set", "n_routed_experts=0"], "has no routed experts"),
    ):
        assert main([*args, *extra]) == 1
        assert words in capsys.readouterr().err, extra


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_cli_under_torchrun_matches_single_process(train_plain_and_torchrun) -> None:
    """`torchrun --nproc-per-node 2 r1c train --expert-parallel 2` and plain `r1c train`: the same losses."""
    single, ep, stdout, out = train_plain_and_torchrun("--expert-parallel", "2")
    assert "trained with 2-way expert parallelism (1 micro-batches)" in stdout
    assert ep == pytest.approx(single, abs=TOL)
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["manifest.json", "stage-0-experts-1.safetensors", "stage-0.safetensors"]


def test_dead_rank_is_a_peer_error(setup) -> None:
    """Rank 1 of 2 exits abruptly in step 2: rank 0, waiting in an expert all-to-all, stops with a PeerError."""
    base, cfg, tokens = setup
    pc = PipelineConfig(1, 1, "gpipe", TIMEOUT_S, data_parallel=2, expert_parallel=2)
    outcomes = spawn_training(TrainSpec(str(TINY), cfg, pc, tokens, crash_at=(1, 2)))
    assert not outcomes[1].ok and outcomes[1].error == "died with exit code 17"
    error = outcomes[0].error or ""
    assert error.startswith("PeerError: rank 0: the expert") and "all-to-all of stage 0" in error, error
    assert outcomes[0].seconds < outcomes[1].seconds + TIMEOUT_S
