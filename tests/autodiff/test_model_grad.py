"""Whole-model gradients: `loss_grad` of a model loaded from a tiny random HF DeepSeek checkpoint matches
torch autograd of the HF model's next-token cross-entropy, parameter by parameter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from r1c.frontends.hf import load_hf  # noqa: E402
from r1c.ir import run  # noqa: E402
from r1c.passes.grad import grad_function  # noqa: E402

CASES = {
    "v3-qlora-groups": ("v3", {}),
    "v3-no-qlora-yarn-unnormalized": ("v3", dict(q_lora_rank=None, norm_topk_prob=False, rope_parameters="YARN")),
    "v2-group-limited-qlora": (
        "v2",
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1),
    ),
    "v2-greedy-no-qlora": ("v2", dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=0)),
}


def hf_grads(model, tokens: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and parameter gradients by torch autograd, experts split into r1c's stacked gate/up layout."""
    model.zero_grad()
    logits = model(torch.tensor(tokens, dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.tensor(labels).long().flatten(), ignore_index=-100
    )
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            grads[prefix + "gate_proj"], grads[prefix + "up_proj"] = np.split(g, 2, axis=1)
        else:
            grads[name] = g
    return float(loss.detach()), grads


def next_token_labels(tokens: np.ndarray) -> np.ndarray:
    labels = np.concatenate([tokens[:, 1:], np.full((tokens.shape[0], 1), -100, np.int32)], axis=1)
    labels[0, 2] = -100  # an ignored position inside the sequence too
    return labels


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_grad_matches_hf_autograd(case: str, hf_exact, tmp_path: Path) -> None:
    kind, overrides = CASES[case]
    overrides = {k: (hf_exact.YARN if v == "YARN" else v) for k, v in overrides.items()}
    model = hf_exact.hf_model(kind, **overrides)
    model.save_pretrained(tmp_path)
    module, weights = load_hf(tmp_path)
    tokens = hf_exact.random_tokens(module.attrs["vocab_size"], seed=5)
    labels = next_token_labels(tokens)

    module = grad_function(module, "loss")
    names = module.attrs["grad_params.loss"]
    loss, *grads = run(module, [tokens, labels], weights, function="loss_grad")
    ref_loss, ref = hf_grads(model, tokens, labels)

    assert abs(float(loss) - ref_loss) / ref_loss < 1e-5
    buffers = {n for n, _ in model.named_buffers()}
    assert set(names) == set(ref) | (buffers & set(weights))
    for name, g in zip(names, grads):
        if name in buffers:  # e_score_correction_bias: a buffer in HF; it only steers routing, no gradient flows
            assert not g.any(), name
            continue
        assert g.shape == ref[name].shape, name
        assert np.abs(ref[name]).max() > 0, name
        err = np.abs(g - ref[name]).max() / np.abs(ref[name]).max()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
