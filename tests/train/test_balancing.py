"""The aux-loss-free balancing rule inside the train step: each MoE layer's e_score_correction_bias moves by
gamma * sign(mean load - load), with the load counted from the experts the batch was routed to."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.ir import run
from r1c.train.config import TrainConfig
from r1c.train.runtime import Trainer
from r1c.train.step import TrainStepError, build_train_step


def routed_ids(module, state, tokens, labels) -> dict[str, np.ndarray]:
    """The expert ids of every moe_experts op of @loss, read by returning them from a copy of the function."""
    f = module.functions["loss"]
    moe = [op for op in f.body if op.name == "moe_experts"]
    probe = dataclasses.replace(f, results=[op.operands[1] for op in moe])
    m = dataclasses.replace(module, functions={"loss": probe})
    return {op.loc: ids for op, ids in zip(moe, run(m, [tokens, labels], state, function="loss"))}


def test_bias_update_matches_numpy(tiny, corpus_tokens) -> None:
    gamma = 0.003
    trainer = Trainer.create(tiny, TrainConfig.from_attrs(tiny.attrs, steps=3, bias_gamma=gamma), corpus_tokens)
    trainer.state = {k: v.copy() for k, v in trainer.state.items()}
    biases = [n for n in trainer.state_names if n.endswith("e_score_correction_bias")]
    assert biases == [
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.gate.e_score_correction_bias",
    ]
    for _ in range(2):
        before = {n: trainer.state[n].copy() for n in trainer.state}
        sampler_state = trainer.data.state()
        tokens, labels = trainer.data.next()
        trainer.data.restore(sampler_state)  # the step draws this same batch
        ids = routed_ids(tiny, before, tokens, labels)
        trainer.run_step()
        for bias in biases:
            layer = bias.rsplit(".gate.", 1)[0]
            load = np.bincount(ids[f"{layer}.experts"].ravel(), minlength=8).astype(np.float64)
            want = before[bias] + gamma * np.sign(load.mean() - load)
            np.testing.assert_allclose(trainer.state[bias], want, rtol=0, atol=1e-7)
            assert np.abs(trainer.state[bias] - before[bias]).max() > 0


def test_bias_untouched_by_gradients_when_off(tiny) -> None:
    module = build_train_step(tiny, TrainConfig.from_attrs(tiny.attrs))
    assert not any("e_score_correction_bias" in n for n in module.attrs["train_step.state"].split(","))


def test_bias_update_needs_biases(tiny) -> None:
    v2_style = r1c.load(Path(__file__).parents[2] / "examples/r1-tiny.r1", overrides={"use_score_bias": False})
    with pytest.raises(TrainStepError, match="has no routing bias"):
        build_train_step(v2_style, TrainConfig.from_attrs(v2_style.attrs, bias_gamma=0.01))


def test_training_with_the_balance_loss(tiny, corpus_tokens) -> None:
    from r1c.train.config import TrainConfig
    from r1c.train.runtime import Trainer

    cfg = TrainConfig(steps=2, batch=2, seq=8)
    plain = Trainer.create(tiny, cfg, corpus_tokens).run_step().loss
    balanced = Trainer.create(tiny, cfg.replace(aux_loss_alpha=0.01), corpus_tokens).run_step().loss
    # r1-tiny has two MoE layers with a balance loss of about 1 each at init (same weights and batch).
    assert 0.01 < balanced - plain < 0.04
