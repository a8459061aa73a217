"""LoRA: adapters on the target projections start as an exact no-op (B = 0) and are the only params that train."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.ir import run
from r1c.train.config import TrainConfig
from r1c.train.lora import LoRAError, apply_lora
from r1c.train.runtime import Trainer, initial_state


def test_rewrite_adds_adapters_and_keeps_outputs(tiny) -> None:
    m = apply_lora(tiny, rank=4, alpha=8.0, targets=["q_b_proj", "o_proj"])
    added = sorted(set(m.params) - set(tiny.params))
    assert len(added) == 2 * 2 * 3  # A and B, two targets, three layers
    assert m.params["model.layers.2.self_attn.o_proj.lora_A.weight"].type.shape == (4, 64)
    assert m.params["model.layers.2.self_attn.o_proj.lora_B.weight"].init == "zeros"
    state = initial_state(tiny, m, seed=0)
    tokens = np.random.default_rng(3).integers(0, 512, (2, 9)).astype(np.int32)
    (base,) = run(tiny, [tokens], state)
    (adapted,) = run(m, [tokens], state)
    np.testing.assert_array_equal(adapted, base)  # B = 0: the adapters add exactly nothing yet
    state = {k: (v + 0.05 if k.endswith("lora_B.weight") else v) for k, v in state.items()}
    (moved,) = run(m, [tokens], state)
    assert np.abs(moved - base).max() > 1e-4
    # scale = alpha / rank: doubling alpha doubles the adapters' contribution
    (doubled,) = run(apply_lora(tiny, rank=4, alpha=16.0, targets=["q_b_proj", "o_proj"]), [tokens], state)
    assert np.abs(doubled - base).max() > 1.5 * np.abs(moved - base).max()


def test_only_adapters_train(tiny, corpus_tokens) -> None:
    cfg = TrainConfig.from_attrs(tiny.attrs, steps=6, lora_rank=4, lora_targets="q_b_proj,kv_b_proj,o_proj")
    trainer = Trainer.create(tiny, cfg, corpus_tokens)
    trainable = trainer.module.attrs["train_step.trainable"].split(",")
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.copy() for k, v in trainer.state.items()}
    losses = [trainer.run_step().loss for _ in range(6)]
    for name in tiny.params:
        np.testing.assert_array_equal(trainer.state[name], before[name], err_msg=name)
    assert all(not np.array_equal(trainer.state[n], before[n]) for n in trainable if "lora_B" in n)
    assert losses[-1] < losses[0]
    # the frozen weights' gradients are dead code in the step: none of them is computed
    step_ops = trainer.module.functions["train_step"].body
    assert len(step_ops) < len(
        Trainer.create(tiny, cfg.replace(lora_rank=0), corpus_tokens).module.functions["train_step"].body
    )


@pytest.mark.parametrize(
    "targets,match",
    [(["gate_proj2"], "matches no linear projection"), (["q_b_proj", ""], None), ([""], "at least one target")],
)
def test_bad_targets(tiny, targets, match) -> None:
    if match is None:
        apply_lora(tiny, 2, 4.0, targets)  # empty entries are ignored
        return
    with pytest.raises(LoRAError, match=match):
        apply_lora(tiny, 2, 4.0, targets)


def test_routed_experts_are_not_linear(tiny) -> None:
    with pytest.raises(LoRAError, match="routed experts are stacked"):
        apply_lora(tiny, 2, 4.0, ["experts.down_proj"])
