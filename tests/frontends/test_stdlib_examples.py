"""The example models written with the DeepSeek stdlib: they lower, verify, run, and have the published sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from r1c.frontends.dsl import load
from r1c.ir import init_weights, random_inputs, run, verify

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def param_count(module) -> int:
    return sum(int(np.prod(p.type.shape, dtype=np.int64)) for p in module.params.values())


@pytest.mark.parametrize("name", ["r1-tiny", "deepseek-v2-lite", "deepseek-v3"])
def test_example_lowers_and_verifies(name: str) -> None:
    module = load(EXAMPLES / f"{name}.r1")
    verify(module)
    assert module.attrs["num_layers"] == sum(p.endswith("input_layernorm.weight") for p in module.params)


def test_r1_tiny_runs_on_random_tokens() -> None:
    module = load(EXAMPLES / "r1-tiny.r1")
    weights = init_weights(module, seed=0)
    (tokens,) = random_inputs(module, module.main, {"B": 2, "S": 6}, seed=1)
    assert tokens.max() < 512 and tokens.any()
    (logits,) = run(module, [tokens], weights)
    assert logits.shape == (2, 6, 512)
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0
    # Causal: logits at a position do not depend on later tokens.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    (logits2,) = run(module, [changed], weights)
    np.testing.assert_allclose(logits2[:, :-1], logits[:, :-1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits2[:, -1], logits[:, -1])


def test_r1_tiny_structure() -> None:
    module = load(EXAMPLES / "r1-tiny.r1")
    params = module.params
    assert "model.layers.0.mlp.gate_proj.weight" in params  # first_k_dense = 1
    assert params["model.layers.1.mlp.experts.gate_proj"].type.shape == (8, 32, 64)
    assert params["model.layers.1.mlp.experts.down_proj"].type.shape == (8, 64, 32)
    assert params["model.layers.2.mlp.gate.e_score_correction_bias"].type.shape == (8,)
    assert params["model.layers.2.mlp.shared_experts.up_proj.weight"].type.shape == (32, 64)
    assert params["model.layers.0.self_attn.q_a_layernorm.weight"].init == "ones"
    assert "model.layers.0.self_attn.q_proj.weight" not in params
    assert sum(op.name == "moe_experts" for op in module.main.body) == 2


def test_deepseek_v3_parameter_count() -> None:
    # Hand count: 671,026,419,200 with embedding and lm_head, without the multi-token-prediction module.
    module = load(EXAMPLES / "deepseek-v3.r1")
    assert param_count(module) == 671_026_419_200
    assert abs(param_count(module) - 671.03e9) < 0.01e9


def test_deepseek_v2_lite_parameter_count() -> None:
    # DeepSeek-V2-Lite is published as 15.7B parameters.
    module = load(EXAMPLES / "deepseek-v2-lite.r1")
    assert abs(param_count(module) - 15.7e9) < 0.05e9
    assert "model.layers.0.self_attn.q_proj.weight" in module.params
    assert "model.layers.5.mlp.gate.e_score_correction_bias" not in module.params


def test_no_routed_experts_means_all_dense() -> None:
    module = load(EXAMPLES / "r1-tiny.r1", overrides={"n_routed_experts": 0, "q_lora_rank": 0, "rope_scaling": "none"})
    assert not any(".experts." in p or ".gate." in p for p in module.params)
    assert "model.layers.2.mlp.down_proj.weight" in module.params
    assert "model.layers.2.self_attn.q_proj.weight" in module.params
    (tokens,) = random_inputs(module, module.main, {"B": 1, "S": 4}, seed=2)
    (logits,) = run(module, [tokens], init_weights(module, seed=3))
    assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize(
    "key, value, message", [("scoring", "relu", "scoring must be"), ("group_score", "mean", "group_score must be")]
)
def test_unsupported_routing_choice_is_a_located_error(key: str, value: str, message: str) -> None:
    from r1c.frontends.dsl import DSLError

    with pytest.raises(DSLError, match=message) as err:
        load(EXAMPLES / "r1-tiny.r1", overrides={key: value})
    assert err.value.filename.endswith("deepseek.r1")
