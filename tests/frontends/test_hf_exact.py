"""r1c's DeepSeek models reproduce Hugging Face transformers' logits from the same checkpoint.

Each case builds a tiny random DeepseekV2/V3ForCausalLM (float32, eager attention), randomizes what
transformers initializes to constants (RMSNorm weights are ones, e_score_correction_bias is zeros: a missing
norm or bias would otherwise go unnoticed), saves it with save_pretrained, loads it with `load_hf` and compares
`r1c.ir.run` against HF on random token ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from r1c.frontends.hf import HFWeightError, load_hf  # noqa: E402
from r1c.ir import run, verify  # noqa: E402

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    q_lora_rank=12,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=1.0,
)


def hf_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    }[kind]
    model = model_cls(cfg_cls(**{**TINY, **overrides}, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (2, 7)).astype(np.int32)


CASES = {
    "v3-qlora-groups4of2-dense1": ("v3", {}),
    "v3-no-qlora-yarn": ("v3", dict(q_lora_rank=None, rope_parameters=YARN)),
    "v3-groups1-dense0-unnormalized": (
        "v3",
        dict(n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.7),
    ),
    "v3-groups8of3-dense2-yarn": (
        "v3",
        dict(
            n_routed_experts=16,
            n_group=8,
            topk_group=3,
            num_experts_per_tok=3,
            first_k_dense_replace=2,
            rope_parameters=YARN,
        ),
    ),
    "v3-rope-not-interleaved": ("v3", dict(rope_interleave=False)),
    "v3-tied-embeddings": ("v3", dict(tie_word_embeddings=True)),
    "v2-greedy-no-qlora": ("v2", dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=0)),
    "v2-group-limited-qlora-yarn": (
        "v2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            first_k_dense_replace=2,
            routed_scaling_factor=1.5,
            rope_parameters={**YARN, "mscale_all_dim": 0.707},
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case: str, tmp_path: Path) -> None:
    kind, overrides = CASES[case]
    model = hf_model(kind, **overrides)
    model.save_pretrained(tmp_path)
    module, weights = load_hf(tmp_path)
    verify(module)
    tokens = random_tokens(module.attrs["vocab_size"])
    ref = hf_logits(model, tokens)
    (out,) = run(module, [tokens], weights)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


def test_loss_matches_hf(tmp_path: Path) -> None:
    """`func loss` is the mean next-token cross-entropy HF computes from its logits (ignored positions skipped)."""
    model = hf_model("v3")
    model.save_pretrained(tmp_path)
    module, weights = load_hf(tmp_path)
    tokens = random_tokens(module.attrs["vocab_size"], seed=5)
    labels = np.concatenate([tokens[:, 1:], np.full((2, 1), -100, np.int32)], axis=1)
    labels[0, 2] = -100
    logits = torch.tensor(hf_logits(model, tokens))
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.tensor(labels).long().flatten(), ignore_index=-100
    )
    (out,) = run(module, [tokens, labels], weights, function="loss")
    assert abs(float(out) - float(ref)) / float(ref) < 1e-5


def test_score_correction_bias_changes_routing(tmp_path: Path) -> None:
    """The exactness cases would catch a dropped bias: without it the logits move far past the tolerance."""
    model = hf_model("v3")
    model.save_pretrained(tmp_path)
    module, weights = load_hf(tmp_path)
    tokens = random_tokens(module.attrs["vocab_size"])
    unbiased = {k: (np.zeros_like(v) if k.endswith("e_score_correction_bias") else v) for k, v in weights.items()}
    assert rel_err(run(module, [tokens], unbiased)[0], hf_logits(model, tokens)) > 1e-3


def test_sharded_bf16_checkpoint(tmp_path: Path) -> None:
    model = hf_model("v3").to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    module, weights = load_hf(tmp_path)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    layer = "model.layers.1.mlp.experts"
    gate, up = np.split(state[f"{layer}.gate_up_proj"], 2, axis=1)
    np.testing.assert_array_equal(weights[f"{layer}.gate_proj"], gate)
    np.testing.assert_array_equal(weights[f"{layer}.up_proj"], up)
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert all(w.dtype == np.float32 for w in weights.values())


def _per_expert_state(model) -> dict:
    """The state dict in DeepSeek's original layout: one gate/up/down Linear per expert."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for j, (g, u) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{prefix}.{j}.gate_proj.weight"], out[f"{prefix}.{j}.up_proj.weight"] = g.clone(), u.clone()
        elif name.endswith("experts.down_proj"):
            for j, d in enumerate(t):
                out[f"{name[: -len('.down_proj')]}.{j}.down_proj.weight"] = d.clone()
        else:
            out[name] = t.contiguous()
    return out


def test_per_expert_checkpoint_layout(tmp_path: Path) -> None:
    model = hf_model("v3", n_group=1, topk_group=1)
    model.config.save_pretrained(tmp_path)
    save_file(_per_expert_state(model), str(tmp_path / "model.safetensors"))
    module, weights = load_hf(tmp_path)
    tokens = random_tokens(module.attrs["vocab_size"], seed=3)
    assert rel_err(run(module, [tokens], weights)[0], hf_logits(model, tokens)) < 1e-4


def test_checkpoint_mismatch_is_named(tmp_path: Path) -> None:
    model = hf_model("v2", topk_method="greedy")
    model.config.save_pretrained(tmp_path)
    state = _per_expert_state(model)
    del state["model.layers.1.self_attn.kv_b_proj.weight"]
    state["model.layers.1.extra.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        HFWeightError,
        match=r"missing 1 parameter\(s\): model\.layers\.1\.self_attn\.kv_b_proj\.weight"
        r".*unexpected tensor\(s\): model\.layers\.1\.extra\.weight",
    ):
        load_hf(tmp_path)
    state = _per_expert_state(model)
    state["lm_head.weight"] = state["lm_head.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFWeightError, match=r"lm_head\.weight has shape \(97, 31\).*\(97, 32\)"):
        load_hf(tmp_path)
