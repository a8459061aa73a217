"""Fixtures for the inference tests: r1-tiny with weights scaled away from ties (random init logits can be near-ties,
which would make greedy comparisons flaky), compiled for the reference target, and a one-layer draft of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.ir.interpreter import init_weights

TINY = Path(__file__).parents[2] / "examples" / "r1-tiny.r1"


def scaled_weights(module) -> dict:
    # larger projections than the init's std 0.02: logits far from ties, so the argmax path is meaningful
    w = init_weights(module, 0)
    return {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in w.items()}


@pytest.fixture(scope="session")
def tiny():
    m = r1c.load(TINY)
    return m, scaled_weights(m)


@pytest.fixture(scope="session")
def tiny_ref(tiny, tmp_path_factory):
    m, w = tiny
    return r1c.compile(m, target="ref", weights=w, out_dir=tmp_path_factory.mktemp("tiny-ref"))


@pytest.fixture(scope="session")
def draft_ref(tiny, tmp_path_factory):
    """r1-tiny cut to its first layer: the target's embedding, layer 0, norm and head (same vocabulary)."""
    _, w = tiny
    d = r1c.load(TINY, overrides={"num_layers": 1})
    return r1c.compile(d, target="ref", weights={k: w[k] for k in d.params}, out_dir=tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="session")
def hf_tokens(tiny) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 5, 9, 9 and 17 tokens and HF transformers' greedy continuations of 24 tokens (f32, eager)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from r1c.train.torch_ref import hf_model

    m, w = tiny
    model = hf_model(m.attrs, w).eval()
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 512, n).tolist() for n in (5, 9, 9, 17)]
    outs = []
    with torch.no_grad():
        for p in prompts:  # one at a time: HF's batched generate would need left padding and an attention mask
            hf = model.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                pad_token_id=0)  # fmt: skip
            outs.append(hf[0, len(p) :].tolist())
    return prompts, outs
