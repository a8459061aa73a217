"""Training on the cuda target (Triton kernels; the interpreter on machines without a GPU) against the reference
interpreter: the gradients of `@loss_grad`, and whole `@train_step` runs (losses, norms, state, checkpoints)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.ir import run
from r1c.train.config import TrainConfig
from r1c.train.data import Batches
from r1c.train.runtime import Trainer, initial_state
from r1c.train.step import build_train_step
from r1c.train.step_runner import TrainTargetError, loss_passes

STEPS = 3


@pytest.fixture(scope="module")
def cfg(tiny) -> TrainConfig:
    return TrainConfig.from_attrs(tiny.attrs, batch=2, seq=8, steps=STEPS, bias_gamma=0.01)


@pytest.fixture(scope="module")
def runs(tiny, cfg, corpus_tokens) -> tuple[Trainer, Trainer]:
    """The same STEPS steps on ref and on cuda, from the same init on the same batches."""
    ref, cuda = (Trainer.create(tiny, cfg, corpus_tokens, target) for target in ("ref", "cuda"))
    for _ in range(STEPS):
        ref.run_step()
        cuda.run_step()
    return ref, cuda


def test_loss_gradients_match_reference(tiny, cfg, corpus_tokens) -> None:
    """Every parameter's gradient of the (expert-fused) loss, from the cuda plan of @loss_grad."""
    module = build_train_step(tiny, cfg, loss_passes=loss_passes("cuda"))
    state = initial_state(tiny, module, cfg.seed)
    batch = list(Batches(corpus_tokens, cfg.batch, cfg.seq, cfg.seed).next())
    names = list(module.attrs["grad_params.loss"])
    want = run(module, batch, state, function="loss_grad")
    art = r1c.compile(module, target="cuda", weights=state, options={"entry": "loss_grad", "passes": ""})
    got = art.run(batch)
    assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
    for name, g, w in zip(names, got[1:], want[1:]):
        scale = float(np.max(np.abs(w))) or 1.0
        assert float(np.max(np.abs(g - w))) <= 2e-5 * scale, name


def test_train_steps_match_reference(runs) -> None:
    ref, cuda = runs
    assert [r.loss for r in cuda.history] == pytest.approx([r.loss for r in ref.history], rel=1e-5)
    assert [r.grad_norm for r in cuda.history] == pytest.approx([r.grad_norm for r in ref.history], rel=1e-4)
    assert [r.lr for r in cuda.history] == pytest.approx([r.lr for r in ref.history], rel=1e-6)
    got, want = cuda.state, ref.state
    assert set(got) == set(want)
    for name in want:
        # AdamW moves every weight by about lr per step whatever the gradient's size, so a weight whose gradient
        # is ~0 may move either way: compare the state as a whole, and nearly every element alone.
        diff = np.abs(got[name] - want[name])
        assert float(np.mean(diff > 1e-5 + 1e-4 * np.abs(want[name]))) <= 1e-3, name
        assert float(np.linalg.norm(diff)) <= 1e-3 * max(float(np.linalg.norm(want[name])), 1e-6), name


def test_training_moved_the_state(runs, tiny, cfg, corpus_tokens) -> None:
    _, cuda = runs
    init = Trainer.create(tiny, cfg, corpus_tokens).state
    trainable = cuda.module.attrs["train_step.trainable"].split(",")
    assert all(not np.array_equal(cuda.state[n], init[n]) for n in trainable)


def test_checkpoint_round_trip_on_cuda(runs, tiny, cfg, corpus_tokens, tmp_path) -> None:
    """A cuda run's checkpoint resumes on cuda (state bit-identical) and continues like the ref run from it."""
    _, cuda = runs
    path = cuda.save(tmp_path / "c.safetensors")
    again = Trainer.create(tiny, cfg.replace(steps=STEPS + 1), corpus_tokens, "cuda")
    again.restore(path)
    for name, value in cuda.state.items():
        np.testing.assert_array_equal(again.state[name], value, err_msg=name)
    ref = Trainer.create(tiny, cfg.replace(steps=STEPS + 1), corpus_tokens)
    ref.restore(path)
    assert again.run_step().loss == pytest.approx(ref.run_step().loss, rel=1e-5)


def test_unknown_target_is_refused(tiny, cfg, corpus_tokens) -> None:
    with pytest.raises(TrainTargetError, match="training target must be one of ref, cuda"):
        Trainer.create(tiny, cfg, corpus_tokens, "tpu")


@pytest.mark.parametrize(
    "options",
    [
        {"lora_rank": 4},
        pytest.param({"recompute": "layer"}, marks=pytest.mark.slow),
        pytest.param({"aux_loss_alpha": 0.01}, marks=pytest.mark.slow),
        pytest.param({"optimizer": "sgd", "momentum": 0.9}, marks=pytest.mark.slow),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_training_options_on_cuda(tiny, corpus_tokens, options) -> None:
    """LoRA adapters, layer recomputation, the expert balance loss (added before expert fusion) and SGD: one step
    on cuda equals the reference's."""
    cfg = TrainConfig.from_attrs(tiny.attrs, batch=2, seq=8, steps=2, **options)
    ref, cuda = (Trainer.create(tiny, cfg, corpus_tokens, target) for target in ("ref", "cuda"))
    a, b = ref.run_step(), cuda.run_step()
    assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)


def test_cli_train_on_cuda(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [sys.executable, "-m", "r1c.cli", "train", str(root / "examples/r1-tiny.r1"), "--target", "cuda",
         "--data", str(root / "examples/data/tiny-corpus.txt"), "--steps", "1", "--batch", "1", "--seq", "8",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "trained @r1_tiny to step 1" in p.stdout
    assert (tmp_path / "checkpoint.safetensors").is_file()
