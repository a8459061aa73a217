"""Kill-and-resume: a run resumed from the checkpoint of step k continues bit-for-bit like the uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.train.checkpoint import CheckpointError
from r1c.train.config import TrainConfig
from r1c.train.runtime import Trainer

N, K = 8, 3


def test_resume_is_bit_identical(tiny, corpus_tokens, tmp_path) -> None:
    cfg = TrainConfig.from_attrs(tiny.attrs, steps=N, bias_gamma=0.01)  # the balancing biases are state too
    full = Trainer.create(tiny, cfg, corpus_tokens)
    for _ in range(K):
        full.run_step()
    ckpt = full.save(tmp_path / "k.safetensors")
    rest = [full.run_step() for _ in range(N - K)]

    resumed = Trainer.create(tiny, cfg, corpus_tokens)  # a fresh process would start like this
    resumed.restore(ckpt)
    assert resumed.step == K and [r.step for r in resumed.history] == list(range(1, K + 1))
    again = [resumed.run_step() for _ in range(N - K)]
    assert [r.loss for r in again] == [r.loss for r in rest]
    assert set(resumed.state) == set(full.state)
    for name, value in full.state.items():
        np.testing.assert_array_equal(resumed.state[name], value, err_msg=name)
    init = Trainer.create(tiny, cfg, corpus_tokens).state
    assert all(not np.array_equal(full.state[n], init[n]) for n in full.module.attrs["train_step.trainable"].split(","))


def test_checkpoint_of_another_setup_is_refused(tiny, corpus_tokens, tmp_path) -> None:
    adamw = Trainer.create(tiny, TrainConfig.from_attrs(tiny.attrs, steps=2), corpus_tokens)
    adamw.run_step()
    ckpt = adamw.save(tmp_path / "a.safetensors")
    sgd = Trainer.create(tiny, TrainConfig.from_attrs(tiny.attrs, steps=2, optimizer="sgd"), corpus_tokens)
    with pytest.raises(CheckpointError, match="another training state"):
        sgd.restore(ckpt)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        sgd.restore(tmp_path / "bad.safetensors")
