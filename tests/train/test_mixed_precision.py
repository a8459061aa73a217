"""bf16 compute with f32 master weights: every float op of the loss runs in bf16, the step updates f32 params and
f32 optimizer state, and the loss stays close to the f32 one."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.ir import init_weights, run
from r1c.ir.types import DType
from r1c.train.config import TrainConfig
from r1c.train.mixed_precision import MixedPrecisionError, to_mixed_precision
from r1c.train.runtime import Trainer


def test_loss_computes_in_bf16(tiny, corpus_tokens) -> None:
    m = to_mixed_precision(tiny, "loss")
    f = m.functions["loss"]
    float_results = [r for op in f.body if op.name not in ("param", "cross_entropy") for r in op.results]
    float_results = [r for r in float_results if r.type.dtype.is_float]
    assert float_results and all(r.type.dtype == DType.bf16 for r in float_results)
    assert all(p.type.dtype == DType.f32 for p in m.params.values())
    w = init_weights(tiny, 0)
    tokens, labels = corpus_tokens[None, :33][:, :-1], corpus_tokens[None, 1:33]
    (lo,) = run(m, [tokens, labels], w, function="loss")
    (hi,) = run(tiny, [tokens, labels], w, function="loss")
    assert lo != hi and abs(float(lo) - float(hi)) < 0.05 * float(hi)


def test_bf16_training_keeps_f32_master_weights(tiny, corpus_tokens) -> None:
    f32 = Trainer.create(tiny, TrainConfig.from_attrs(tiny.attrs, steps=5), corpus_tokens)
    bf16 = Trainer.create(tiny, TrainConfig.from_attrs(tiny.attrs, steps=5, precision="bf16"), corpus_tokens)
    a = [f32.run_step().loss for _ in range(5)]
    b = [bf16.run_step().loss for _ in range(5)]
    np.testing.assert_allclose(b, a, rtol=0.03)
    assert a != b
    w = bf16.state["model.layers.0.self_attn.o_proj.weight"]
    assert w.dtype == np.float32
    # master weights keep f32 precision: updates are not rounded to bf16
    bits = w.view(np.uint32) & 0xFFFF
    assert (bits != 0).mean() > 0.5


def test_needs_the_named_function(tiny) -> None:
    with pytest.raises(MixedPrecisionError, match="no function @train"):
        to_mixed_precision(tiny, "train")
