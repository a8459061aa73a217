"""`r1c compile --from-hf` on a tiny random DeepSeek-V3 checkpoint written by transformers, run by `r1c run`."""

from __future__ import annotations

import numpy as np
import pytest

TINY_V3 = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=12,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)


@pytest.mark.slow
def test_compile_from_hf_matches_transformers(cli, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**TINY_V3, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(2).integers(0, TINY_V3["vocab_size"], (2, 6))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()

    res = cli("compile", "--from-hf", str(tmp_path / "hf"), "--target", "ref", "-o", str(tmp_path / "art"))
    assert res.code == 0, res.err
    rows = [" ".join(map(str, row)) for row in tokens]
    res = cli(
        "run", str(tmp_path / "art"), "--tokens", rows[0], "--tokens", rows[1], "--output", str(tmp_path / "logits.npy")
    )
    assert res.code == 0, res.err
    got = np.load(tmp_path / "logits.npy")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_from_hf_missing_config(cli, tmp_path):
    res = cli("compile", "--from-hf", str(tmp_path), "-o", str(tmp_path / "art"))
    assert res.code == 1 and "Traceback" not in res.err and "config.json" in res.err
