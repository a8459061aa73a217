"""Pipeline stages on the cuda target: each rank compiles its stage's forward, VJP and update for the cuda backend and
keeps its state on its device (without a GPU: Triton's interpreter on CPU tensors), over gloo here; against the
single-process reference run. NCCL (one GPU per rank) needs a multi-GPU host: bench/pipeline_cuda.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r1c.distributed.launch import TrainSpec, spawn_training
from r1c.distributed.program import DistributedError, PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"


def test_two_cuda_stages_match_single_process(setup, reference, ok) -> None:
    base, cfg, tokens = setup
    pc = PipelineConfig(2, 2, "1f1b", 120.0, target="cuda", comm="gloo")
    results = ok(spawn_training(TrainSpec(str(TINY), cfg, pc, tokens, keep_grads=True), timeout_s=300.0))
    names = [n for r in results for n in r.first_grads]
    assert len(names) == len(set(names)) and set(names) == set(reference["grads"])
    for r in results:
        assert r.first_loss == pytest.approx(reference["loss"], rel=1e-5)
        for name, g in r.first_grads.items():
            want = reference["grads"][name]
            assert float(np.max(np.abs(g - want))) <= 2e-5 * max(float(np.max(np.abs(want))), 1e-6), name
        assert [h.loss for h in r.history] == pytest.approx(reference["losses"], rel=1e-5)
        assert [h.grad_norm for h in r.history] == pytest.approx(reference["norms"], rel=1e-4)
        assert len(r.busy_s) == len(r.wall_s) == 2 and all(0 < b <= w for b, w in zip(r.busy_s, r.wall_s))
    owned = {n: v for r in results for n, v in r.state.items()}
    assert set(owned) == set(reference["state"])
    for name, value in owned.items():  # as tests/train/test_train_cuda.py: AdamW may move ~0-gradient weights apart
        want = reference["state"][name]
        diff = np.abs(value - want)
        assert float(np.mean(diff > 1e-5 + 1e-4 * np.abs(want))) <= 1e-3, name


def test_cuda_layout_errors() -> None:
    with pytest.raises(DistributedError, match="--comm nccl moves GPU tensors: it needs --target cuda"):
        PipelineConfig(2, 1, comm="nccl")
    with pytest.raises(DistributedError, match="--expert-parallel runs on the reference interpreter only"):
        PipelineConfig(1, 1, data_parallel=2, expert_parallel=2, target="cuda")
    with pytest.raises(DistributedError, match="--comm must be gloo or nccl"):
        PipelineConfig(2, 1, comm="mpi")


def test_cli_comm_needs_pipeline(tmp_path) -> None:
    args = [sys.executable, "-m", "r1c.cli", "train", str(TINY), "--data", str(ROOT / "examples/data/tiny-corpus.txt")]
    p = subprocess.run([*args, "--out", str(tmp_path), "--comm", "gloo"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--comm apply to --pipeline training only" in p.stderr, p.stderr


def test_pipelined_cuda_artifact_matches_interpreter(tmp_path) -> None:
    """`r1c run --pipeline 2` of an artifact compiled for cuda: each rank compiles its stage of the artifact's
    (expert-fused) forward and runs it on its device; the last stage's logits equal the interpreter's."""
    import r1c
    from r1c.distributed.inference import RunSpec
    from r1c.distributed.launch import spawn_inference
    from r1c.ir import run
    from r1c.ir.interpreter import init_weights

    base = r1c.load(TINY)
    weights = init_weights(base, 0)
    batch = np.random.default_rng(0).integers(0, 512, size=(4, 8)).astype(np.int32)
    want = run(base, [batch], weights, function="forward")[0]
    r1c.compile(base, target="cuda", weights=weights, out_dir=tmp_path / "art")
    spec = RunSpec(str(tmp_path / "art"), batch, PipelineConfig(2, 2, timeout_s=120.0, target="cuda", comm="gloo"))
    outcomes = spawn_inference(spec, timeout_s=300.0)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert outcomes[0].result is None
    got = outcomes[1].result[0]
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-5
