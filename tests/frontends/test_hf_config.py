"""HF config.json -> stdlib config constants, and the generated model source."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1c.frontends.dsl import compile_source, load
from r1c.frontends.hf import HFConfigError, config_from_hf, model_source

# The published config.json files (fields that matter here), as on the Hugging Face hub.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
}


def test_v3_config() -> None:
    c = config_from_hf(DEEPSEEK_V3)
    assert c["scoring"] == "sigmoid" and c["group_score"] == "top2sum" and c["use_score_bias"] is True
    assert (c["n_group"], c["topk_group"], c["experts_per_tok"], c["first_k_dense"]) == (8, 4, 8, 3)
    assert (c["rope_scaling"], c["rope_factor"], c["rope_original_max_position"]) == ("yarn", 40.0, 4096)
    assert (c["rope_mscale"], c["rope_mscale_all_dim"], c["rope_beta_fast"]) == (1.0, 1.0, 32.0)
    assert c["q_lora_rank"] == 1536 and c["rope_interleave"] is True and c["norm_topk_prob"] is True


def test_v2_lite_config() -> None:
    c = config_from_hf(DEEPSEEK_V2_LITE)
    assert (c["scoring"], c["group_score"], c["use_score_bias"]) == ("softmax", "max", False)
    assert (c["q_lora_rank"], c["n_group"], c["topk_group"], c["experts_per_tok"]) == (0, 1, 1, 6)
    assert c["rope_mscale_all_dim"] == 0.707 and c["rope_interleave"] is True


def test_defaults_follow_transformers() -> None:
    c = config_from_hf({"model_type": "deepseek_v2", "num_experts_per_tok": 4, "n_routed_experts": 8})
    assert (c["hidden_size"], c["moe_intermediate_size"], c["q_lora_rank"], c["n_group"]) == (4096, 1407, 1536, 1)
    assert (c["rope_scaling"], c["rope_theta"], c["rope_original_max_position"]) == ("none", 10000.0, 2048)
    # transformers 5 writes rope_parameters; the YaRN factor falls back to the context extension ratio.
    c = config_from_hf(
        {
            "model_type": "deepseek_v3",
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "original_max_position_embeddings": 2048},
        }
    )
    assert (c["rope_factor"], c["rope_theta"], c["rope_mscale"]) == (4.0, 5e4, 0.0)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "llama"}, "model_type='llama'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
        ({"topk_method": "group_limited_greedy"}, "topk_method='group_limited_greedy'"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ({"n_group": 256}, "n_group=256"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "attention_factor": 1.2}}, "attention_factor=1.2"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "truncate": False}}, "truncate=False"),
    ],
)
def test_unsupported_v3_values_are_named(patch: dict, message: str) -> None:
    with pytest.raises(HFConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf({**DEEPSEEK_V3, **patch})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"norm_topk_prob": True}, "norm_topk_prob=True"),
        ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 2}, "n_group/topk_group"),
    ],
)
def test_unsupported_v2_values_are_named(patch: dict, message: str) -> None:
    with pytest.raises(HFConfigError, match=message):
        config_from_hf({**DEEPSEEK_V2_LITE, **patch})


def test_model_source_text() -> None:
    c = config_from_hf(DEEPSEEK_V3)
    lines = model_source(c, name="v3").splitlines()
    assert lines[1:5] == ["model v3", "import deepseek", "", "config {"]
    assert [line.split("=")[0].strip() for line in lines[5 : 5 + len(c)]] == list(c)
    assert "  rms_eps" in lines[5 + list(c).index("rms_eps")] and lines[5 + len(c)] == "}"
    forward = lines.index("func forward(tokens: int32[B, S]) {")
    assert lines[forward + 1 : forward + 3] == ["  return causal_lm(tokens)", "}"]
    loss = lines.index("func loss(tokens: int32[B, S], labels: int32[B, S]) {")
    assert lines[loss + 1 : loss + 3] == ["  return lm_loss(tokens, labels)", "}"]
    with pytest.raises(ValueError, match="not an identifier"):
        model_source(c, name="deepseek-v3")
    with pytest.raises(ValueError, match="no .r1 literal"):
        model_source({**c, "rope_factor": float("nan")})


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("hf, example", [(DEEPSEEK_V3, "deepseek-v3.r1"), (DEEPSEEK_V2_LITE, "deepseek-v2-lite.r1")])
def test_examples_hold_the_published_configs(hf: dict, example: str) -> None:
    assert load(EXAMPLES / example).attrs == config_from_hf(hf)


def test_generated_source_compiles_to_the_config() -> None:
    c = {
        **config_from_hf(DEEPSEEK_V2_LITE),
        "num_layers": 2,
        "vocab_size": 64,
        "hidden_size": 32,
        "num_heads": 2,
        "n_routed_experts": 4,
        "experts_per_tok": 2,
        "tie_embeddings": True,
    }
    module = compile_source(model_source(c, name="tiny_v2"), "<tiny_v2>.r1")
    assert module.name == "tiny_v2" and module.attrs == c
    assert "lm_head.weight" not in module.params and "model.embed_tokens.weight" in module.params
