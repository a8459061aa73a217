"""Map a Hugging Face DeepseekV2/V3 `config.json` dict to the config constants of `r1c/stdlib/deepseek.r1`.

Defaults are those of transformers' `DeepseekV2Config` / `DeepseekV3Config`; the semantics are those of
transformers' modeling code (the reference the HF frontend is tested against). Anything the stdlib cannot
express raises `HFConfigError` naming the field and its value instead of being silently dropped.
"""

from __future__ import annotations

from typing import Any


class HFConfigError(ValueError):
    pass


_COMMON_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 1536,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "rope_interleave": True,
    },
    "deepseek_v2": {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "q_lora_rank": 1536,
        "n_group": None,
        "topk_group": None,
        "num_experts_per_tok": None,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "max_position_embeddings": 2048,
        "topk_method": "greedy",
        "mlp_bias": False,
    },
}


def _unsupported(field: str, value: Any, why: str) -> HFConfigError:
    return HFConfigError(f"unsupported HF config value {field}={value!r}: {why}")


def _rope_constants(get) -> dict[str, object]:
    """RoPE/YaRN constants, following transformers' `convert_rope_params_to_dict`/`_compute_yarn_parameters`."""
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", get("rope_theta") if get("rope_theta") is not None else 10000.0)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(
            "rope_parameters.partial_rotary_factor",
            rope["partial_rotary_factor"],
            "MLA rotates the whole qk_rope_head_dim",
        )
    out: dict[str, object] = {
        "rope_theta": float(theta),
        "rope_scaling": "none",
        "rope_factor": 1.0,
        "rope_original_max_position": int(get("max_position_embeddings")),
        "rope_beta_fast": 32.0,
        "rope_beta_slow": 1.0,
        "rope_mscale": 0.0,
        "rope_mscale_all_dim": 0.0,
    }
    if kind == "default":
        return out
    if kind != "yarn":
        raise _unsupported("rope_parameters.rope_type", kind, "only 'default' and 'yarn' RoPE are supported")
    if rope.get("attention_factor") is not None:
        raise _unsupported(
            "rope_parameters.attention_factor",
            rope["attention_factor"],
            "r1c derives YaRN's attention factor from factor/mscale/mscale_all_dim",
        )
    if rope.get("truncate", True) is not True:
        raise _unsupported("rope_parameters.truncate", rope["truncate"], "only truncated YaRN correction ranges")
    original = rope.get("original_max_position_embeddings", get("original_max_position_embeddings"))
    original = int(original if original is not None else get("max_position_embeddings"))
    factor = rope.get("factor")
    if factor is None:  # transformers infers it from the context extension
        factor = get("max_position_embeddings") / original
    out.update(
        {
            "rope_scaling": "yarn",
            "rope_factor": float(factor),
            "rope_original_max_position": original,
            # transformers: `get("beta_fast") or 32`, so 0/None mean the default too.
            "rope_beta_fast": float(rope.get("beta_fast") or 32),
            "rope_beta_slow": float(rope.get("beta_slow") or 1),
            # A missing mscale behaves like 0 in transformers' `if mscale and mscale_all_dim`.
            "rope_mscale": float(rope.get("mscale") or 0.0),
            "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
    )
    return out


def _routing_constants(model_type: str, get) -> dict[str, object]:
    experts = get("n_routed_experts")
    if not experts:
        raise _unsupported("n_routed_experts", experts, "transformers' DeepSeek models always build MoE layers")
    moe_layer_freq = get("moe_layer_freq")
    if moe_layer_freq not in (None, 1):
        raise _unsupported("moe_layer_freq", moe_layer_freq, "every layer from first_k_dense_replace on is MoE")
    scoring_func = get("scoring_func")
    if model_type == "deepseek_v3":
        if scoring_func not in (None, "sigmoid"):
            raise _unsupported("scoring_func", scoring_func, "DeepSeek-V3 routing scores with sigmoid")
        if get("topk_method") not in (None, "noaux_tc"):
            raise _unsupported("topk_method", get("topk_method"), "DeepSeek-V3 routes with 'noaux_tc'")
        n_group, topk_group = get("n_group"), get("topk_group")
        if n_group is None or topk_group is None:
            raise _unsupported("n_group/topk_group", (n_group, topk_group), "DeepSeek-V3 needs both")
        if experts % n_group or experts // n_group < 2:
            raise _unsupported("n_group", n_group, f"{experts} experts must split into groups of >= 2 (top-2 sum)")
        return {
            "scoring": "sigmoid",
            "group_score": "top2sum",
            "use_score_bias": True,
            "n_group": int(n_group),
            "topk_group": int(topk_group),
            "norm_topk_prob": bool(get("norm_topk_prob")),
        }
    if scoring_func not in (None, "softmax"):
        raise _unsupported("scoring_func", scoring_func, "DeepSeek-V2 routing scores with softmax")
    if get("norm_topk_prob"):
        # transformers' V2 router ignores the flag while DeepSeek's own V2 code normalizes: no single meaning.
        raise _unsupported("norm_topk_prob", True, "transformers' DeepSeek-V2 never normalizes top-k weights")
    method = get("topk_method")
    if method == "greedy":
        n_group, topk_group = 1, 1
    elif method == "group_limited_greedy":
        n_group, topk_group = get("n_group"), get("topk_group")
        if n_group is None or topk_group is None or experts % n_group:
            raise _unsupported(
                "n_group/topk_group",
                (n_group, topk_group),
                f"group_limited_greedy needs groups that split {experts} experts evenly",
            )
    else:
        raise _unsupported("topk_method", method, "DeepSeek-V2 supports 'greedy' and 'group_limited_greedy'")
    return {
        "scoring": "softmax",
        "group_score": "max",
        "use_score_bias": False,
        "n_group": int(n_group),
        "topk_group": int(topk_group),
        "norm_topk_prob": False,
    }


def config_from_hf(hf_config: dict) -> dict[str, object]:
    """The stdlib config constants (in the order a `.r1` config block lists them) for a HF DeepSeek config."""
    model_type = hf_config.get("model_type")
    if model_type not in _DEFAULTS:
        raise _unsupported("model_type", model_type, "expected 'deepseek_v2' or 'deepseek_v3'")
    defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[model_type]}

    def get(key: str) -> Any:
        return hf_config[key] if key in hf_config else defaults.get(key)

    for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if get(field) not in (want, None):
            raise _unsupported(field, get(field), f"DeepSeek blocks use {field}={want!r}")
    heads = get("num_attention_heads")
    if get("num_key_value_heads") not in (None, heads):
        raise _unsupported(
            "num_key_value_heads", get("num_key_value_heads"), f"MLA expands keys/values to all {heads} heads"
        )
    if model_type == "deepseek_v2" and get("num_experts_per_tok") is None:
        raise _unsupported("num_experts_per_tok", None, "the number of routed experts per token is required")
    if model_type == "deepseek_v3" and get("rope_interleave") is None:
        raise _unsupported("rope_interleave", None, "must be true or false")

    out: dict[str, object] = {
        "vocab_size": int(get("vocab_size")),
        "hidden_size": int(get("hidden_size")),
        "num_layers": int(get("num_hidden_layers")),
        "num_heads": int(heads),
        "intermediate_size": int(get("intermediate_size")),
        "moe_intermediate_size": int(get("moe_intermediate_size")),
        "n_routed_experts": int(get("n_routed_experts") or 0),
        "n_shared_experts": int(get("n_shared_experts") or 0),
        "experts_per_tok": int(get("num_experts_per_tok")),
        "first_k_dense": int(get("first_k_dense_replace") or 0),
    }
    routing = _routing_constants(model_type, get)
    out.update(
        {
            "n_group": routing["n_group"],
            "topk_group": routing["topk_group"],
            "scoring": routing["scoring"],
            "group_score": routing["group_score"],
            "use_score_bias": routing["use_score_bias"],
            "norm_topk_prob": routing["norm_topk_prob"],
            "routed_scaling_factor": float(get("routed_scaling_factor")),
        }
    )
    out.update(
        {
            "q_lora_rank": int(get("q_lora_rank") or 0),
            "kv_lora_rank": int(get("kv_lora_rank")),
            "qk_nope_head_dim": int(get("qk_nope_head_dim")),
            "qk_rope_head_dim": int(get("qk_rope_head_dim")),
            "v_head_dim": int(get("v_head_dim")),
            # V2's complex-number RoPE rotates interleaved pairs, like V3 with rope_interleave=true.
            "rope_interleave": True if model_type == "deepseek_v2" else bool(get("rope_interleave")),
        }
    )
    out.update(_rope_constants(get))
    out.update(
        {
            "rms_eps": float(get("rms_norm_eps")),
            "init_std": float(get("initializer_range")),
            "tie_embeddings": bool(get("tie_word_embeddings")),
        }
    )
    return out
