"""Pipeline-parallel training of r1-tiny on gloo (CPU processes) against the single-process trainer.

Each rank owns one stage; after one step the loss and every parameter gradient, and after two optimizer steps every
parameter and optimizer-state tensor, equal the single-process run's within 1e-5 (f32). A rank that dies stops
every other rank with an error naming the failed transfer. Per-stage checkpoints resume at another stage count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from r1c.distributed.launch import TrainSpec, spawn_training, train_rank
from r1c.distributed.program import DistributedError, PipelineConfig, build_pipeline
from r1c.train.runtime import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"
CORPUS = ROOT / "examples/data/tiny-corpus.txt"
TOL = 1e-5
TIMEOUT_S = 30.0  # gloo's per-transfer timeout in these tests; a dead peer is normally seen at once


def _check_against_reference(results: list, reference: dict, stages: int) -> None:
    # Every parameter's gradient comes from exactly one rank.
    names = [n for r in results for n in r.first_grads]
    assert len(names) == len(set(names)) and set(names) == set(reference["grads"])
    for r in results:
        assert abs(r.first_loss - reference["loss"]) <= TOL
        for name, g in r.first_grads.items():
            err = float(np.max(np.abs(g - reference["grads"][name])))
            assert err <= TOL, f"{stages} stages: gradient of {name} differs by {err}"
        assert [h.loss for h in r.history] == pytest.approx(reference["losses"], abs=TOL)
        assert [h.grad_norm for h in r.history] == pytest.approx(reference["norms"], rel=TOL)
    # After two optimizer steps: every parameter and AdamW moment, each owned by exactly one rank.
    owned = [n for r in results for n in r.state]
    assert len(owned) == len(set(owned)) and set(owned) == set(reference["state"])
    for r in results:
        for name, value in r.state.items():
            err = float(np.max(np.abs(value - reference["state"][name])))
            assert err <= TOL, f"{stages} stages: {name} after 2 steps differs by {err}"


@pytest.fixture(scope="module")
def two_stage_run(setup, ok, tmp_path_factory) -> tuple[list, Path]:
    """2 ranks, 1F1B over 4 micro-batches of 1 sequence (stage 0 runs F0 F1 B0 F2 B1 F3 B2 B3); saves per-stage
    checkpoints after step 1 (for the resume test)."""
    base, cfg, tokens = setup
    out = tmp_path_factory.mktemp("pp2")
    spec = TrainSpec(str(TINY), cfg, PipelineConfig(2, 4, "1f1b", TIMEOUT_S), tokens, out=str(out), save_every=1)
    return ok(spawn_training(replace(spec, keep_grads=True))), out


def test_two_stages_1f1b_match_single_process(two_stage_run, reference) -> None:
    results, _ = two_stage_run
    _check_against_reference(results, reference, 2)


def test_four_stages_gpipe_match_single_process(setup, reference, ok) -> None:
    base, cfg, tokens = setup
    spec = TrainSpec(str(TINY), cfg, PipelineConfig(4, 2, "gpipe", TIMEOUT_S), tokens, keep_grads=True)
    _check_against_reference(ok(spawn_training(spec)), reference, 4)


def test_data_parallel_replicas_match_single_process(setup, reference, ok, tmp_path) -> None:
    """2 stages x 2 replicas (4 processes): each replica trains on 2 of the 4 rows in 2 micro-batches and the
    gradients are all-reduced per stage: the single-process step; both replicas hold the same state, and replica 0
    writes the usual per-stage checkpoint."""
    base, cfg, tokens = setup
    pc = PipelineConfig(2, 2, "1f1b", TIMEOUT_S, data_parallel=2)
    results = ok(spawn_training(TrainSpec(str(TINY), cfg, pc, tokens, out=str(tmp_path), keep_grads=True)))
    files = ["manifest.json", "stage-0.safetensors", "stage-1.safetensors"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == files
    _check_against_reference(results[:2], reference, 2)  # replica 0: ranks 0 and 1
    for first, second in zip(results[:2], results[2:]):  # replica 1 (ranks 2, 3): the same stage, bit for bit
        assert first.first_grads.keys() == second.first_grads.keys() and first.state.keys() == second.state.keys()
        for name in first.state:
            np.testing.assert_array_equal(first.state[name], second.state[name])
        assert [h.loss for h in first.history] == [h.loss for h in second.history]


def test_checkpoint_from_two_stages_resumes_on_four(two_stage_run, setup, reference, ok) -> None:
    """Step 1 trained on 2 stages, step 2 on 4 stages from its per-stage checkpoint: the single-process result."""
    (_, out), (_, cfg, tokens) = two_stage_run, setup
    ckpt = out / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "stage-0.safetensors", "stage-1.safetensors"]
    spec = TrainSpec(str(TINY), cfg, PipelineConfig(4, 1, "gpipe", TIMEOUT_S), tokens, resume=str(ckpt))
    results = ok(spawn_training(spec))
    for r in results:
        assert [h.step for h in r.history] == [1, 2]  # the history travels with the checkpoint
        assert [h.loss for h in r.history] == pytest.approx(reference["losses"], abs=TOL)
    merged = {n: v for r in results for n, v in r.state.items()}
    assert set(merged) == set(reference["state"])
    worst = max(float(np.max(np.abs(v - reference["state"][n]))) for n, v in merged.items())
    assert worst <= TOL


def test_killed_rank_stops_every_rank(setup) -> None:
    """Rank 1 of 4 exits abruptly (no cleanup) in step 2: every other rank stops with a PeerError, well within the
    timeout, and no process is left running."""
    base, cfg, tokens = setup
    spec = TrainSpec(str(TINY), cfg, PipelineConfig(4, 2, "1f1b", TIMEOUT_S), tokens, crash_at=(1, 2))
    outcomes = spawn_training(spec)
    assert not outcomes[1].ok and outcomes[1].error == "died with exit code 17"
    for o in outcomes[:1] + outcomes[2:]:
        assert not o.ok, f"rank {o.rank} did not notice that rank 1 died"
        assert o.error.startswith(f"PeerError: rank {o.rank}: ") and "failed (a rank died" in o.error, o.error
        assert o.seconds < outcomes[1].seconds + TIMEOUT_S
    # Ranks next to the dead one name it; rank 3 names rank 2, which stopped because of it.
    assert "with rank 1 failed" in outcomes[0].error and "with rank 1 failed" in outcomes[2].error
    assert "with rank 2 failed" in outcomes[3].error


def test_unsupported_options_are_errors(setup) -> None:
    base, cfg, _ = setup
    for change, words in (
        ({"aux_loss_alpha": 0.01}, "expert balance loss"),
        ({"recompute": "layer"}, "recompute=layer"),
    ):
        with pytest.raises(DistributedError, match=words):
            build_pipeline(base, cfg.replace(**change), PipelineConfig(2, 2))
    with pytest.raises(DistributedError, match="multiple of --micro-batches"):
        build_pipeline(base, cfg, PipelineConfig(2, 3))
    with pytest.raises(DistributedError, match=r"multiple of --micro-batches \(2\) times --data-parallel \(4\)"):
        build_pipeline(base, cfg, PipelineConfig(2, 2, data_parallel=4))
    with pytest.raises(DistributedError, match="--data-parallel must be >= 1"):
        PipelineConfig(2, 1, data_parallel=0)
    with pytest.raises(DistributedError, match="--pipeline 2 --data-parallel 2 needs 4 processes, the job has 2"):
        train_rank(0, 2, TrainSpec(str(TINY), cfg, PipelineConfig(2, 1, data_parallel=2), np.zeros(64, np.int32)))
    with pytest.raises(DistributedError, match="at least 2 stages"):
        PipelineConfig(1)
    with pytest.raises(DistributedError, match="schedule"):
        PipelineConfig(2, 2, "interleaved")


@pytest.mark.parametrize(
    "options, micro_batches, replicas, tol",
    [({"lora_rank": 4}, 2, 1, 1e-7), ({"precision": "bf16"}, 1, 1, 0.0), ({"bias_gamma": 0.01}, 1, 2, 2e-7)],
    ids=["lora", "bf16", "bias-update"],
)
def test_training_options_match_single_process(
    setup, ok, options: dict, micro_batches: int, replicas: int, tol: float
) -> None:
    """LoRA adapters and bf16 mixed precision are applied before partitioning, as `build_train_step` applies them,
    and the balancing-bias rule moves each routing bias by its layer's expert load over the whole batch (every
    micro-batch and replica): two steps on 2 stages equal the single-process trainer's (bf16 bit for bit with one
    micro-batch: more would round each micro-batch's bf16 backward on its own), the frozen weights untouched."""
    base, cfg, tokens = setup
    cfg = cfg.replace(**options)
    trainer = Trainer.create(base, cfg, tokens)
    history = [trainer.run_step(), trainer.run_step()]
    pc = PipelineConfig(2, micro_batches, "1f1b", TIMEOUT_S, data_parallel=replicas)
    spec = TrainSpec(str(TINY), cfg, pc, tokens)
    results = ok(spawn_training(spec))[:2]  # replica 0
    state = {n: v for r in results for n, v in r.state.items()}
    assert set(state) == set(trainer.state)
    for name, want in trainer.state.items():
        assert float(np.max(np.abs(state[name] - want))) <= tol, name
    assert [h.loss for h in results[0].history] == pytest.approx([h.loss for h in history], abs=tol)
    if "bias_gamma" in options:
        init = Trainer.create(base, cfg, tokens).state
        assert all(not np.array_equal(state[n], init[n]) for n in init if n.endswith("e_score_correction_bias"))
    if "lora_rank" in options:
        init = Trainer.create(base, cfg, tokens).state
        frozen = [n for n in init if "lora_" not in n and not n.startswith(("adamw.", "sgd."))]
        assert frozen and all(np.array_equal(state[n], init[n]) for n in frozen)


def test_cli_pipeline_needs_torchrun(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    args = [sys.executable, "-m", "r1c.cli", "train", str(TINY), "--data", str(CORPUS), "--out", str(tmp_path)]
    p = subprocess.run([*args, "--pipeline", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and "torchrun --nproc-per-node N" in p.stderr, p.stderr
    p = subprocess.run(
        [*args, "--pipeline", "2", "--aux-loss-alpha", "0.01"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 1 and "does not support the expert balance loss" in p.stderr, p.stderr
    p = subprocess.run([*args, "--micro-batches", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "apply to --pipeline training only" in p.stderr, p.stderr
    p = subprocess.run([*args, "--data-parallel", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--data-parallel apply to --pipeline training only" in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_cli_under_torchrun_matches_single_process(train_plain_and_torchrun) -> None:
    """`torchrun --nproc-per-node 2 r1c train --pipeline 2` and plain `r1c train`: the same losses, step by step."""
    flags = ("--pipeline", "2", "--micro-batches", "2", "--schedule", "1f1b")
    single, pipe, stdout, out = train_plain_and_torchrun(*flags)
    assert "trained with 2 pipeline stages (1f1b, 2 micro-batches)" in stdout
    assert pipe == pytest.approx(single, abs=TOL)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "manifest.json",
        "stage-0.safetensors",
        "stage-1.safetensors",
    ]


def test_program_is_ir_that_round_trips(setup) -> None:
    """The stage, VJP and update functions are ordinary IR: they verify and print/parse back to the same text."""
    from r1c.ir.parser import parse_module
    from r1c.ir.printer import print_module

    base, cfg, _ = setup
    module, plans = build_pipeline(base, cfg, PipelineConfig(4, 2))
    text = print_module(module)
    assert print_module(parse_module(text)) == text
    for k, plan in enumerate(plans):
        assert plan.vjp.name == f"loss.stage{k}.vjp" and plan.update.name == f"loss.stage{k}.update"
        assert len(plan.vjp.results) == plan.n_received_float + len(plan.grad_params)
    assert plans[0].received == () and plans[0].inputs == ("tokens",) and plans[-1].inputs == ("labels",)
