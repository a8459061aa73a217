"""Safetensors reading (bf16/fp8/f16 widened exactly), FP8 block dequantization, HF -> r1c tensor names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from r1c.frontends.hf.safetensors_io import SafetensorsError, read_safetensors
from r1c.frontends.hf.weights import HFWeightError, check_weights, dequantize_fp8, to_r1c_names
from r1c.ir.core import Module, Param
from r1c.ir.types import tensor

torch = pytest.importorskip("torch")
save_file = pytest.importorskip("safetensors.torch").save_file


def test_reads_narrow_floats_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6) * 3
    tensors = {
        "f32": x,
        "bf16": x.bfloat16(),
        "f16": x.half(),
        "fp8": x.to(torch.float8_e4m3fn),
        "i64": torch.arange(7),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    got = read_safetensors(tmp_path / "t.safetensors")
    for name in ("f32", "bf16", "f16", "fp8"):
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], tensors[name].float().numpy())
    np.testing.assert_array_equal(got["i64"], np.arange(7))


def test_every_fp8_code_decodes_like_torch() -> None:
    from r1c.frontends.hf.safetensors_io import _FP8_E4M3

    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(_FP8_E4M3, want)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SafetensorsError, match="not a valid safetensors file: .*invalid JSON in header"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_fp8_block_dequantization() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, (3, 2)).astype(np.float32)  # blocks of 2 x 4: ceil(5/2) x ceil(7/4)
    out = dequantize_fp8({"a.weight": w, "a.weight_scale_inv": s}, (2, 4))
    assert set(out) == {"a.weight"}
    for i in range(5):
        for j in range(7):
            assert out["a.weight"][i, j] == pytest.approx(w[i, j] * s[i // 2, j // 4], rel=1e-6)


def test_expert_layouts_and_mtp_layers() -> None:
    rng = np.random.default_rng(1)
    fused = rng.standard_normal((3, 8, 5)).astype(np.float32)  # E=3, 2F=8, D=5
    down = rng.standard_normal((3, 5, 4)).astype(np.float32)
    out = to_r1c_names(
        {
            "model.layers.0.mlp.experts.gate_up_proj": fused,
            "model.layers.0.mlp.experts.down_proj": down,
            "model.layers.2.self_attn.kv_b_proj.weight": down[0],
            "lm_head.weight": down[1],
        },
        num_layers=2,
        num_mtp_layers=1,
        tie_embeddings=True,
    )
    assert sorted(out) == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_proj",
        "model.layers.0.mlp.experts.up_proj",
    ]
    np.testing.assert_array_equal(out["model.layers.0.mlp.experts.gate_proj"], fused[:, :4])
    np.testing.assert_array_equal(out["model.layers.0.mlp.experts.up_proj"], fused[:, 4:])
    per_expert = {
        f"model.layers.0.mlp.experts.{j}.{p}.weight": (
            fused[j, :4] if p == "gate_proj" else fused[j, 4:] if p == "up_proj" else down[j]
        )
        for j in range(3)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    stacked = to_r1c_names(per_expert, num_layers=2, num_mtp_layers=0, tie_embeddings=False)
    for name, x in out.items():
        np.testing.assert_array_equal(stacked[name], x)
    del per_expert["model.layers.0.mlp.experts.1.up_proj.weight"]
    with pytest.raises(HFWeightError, match=r"experts \[1\] have no up_proj"):
        to_r1c_names(per_expert, num_layers=2, num_mtp_layers=0, tie_embeddings=False)


def test_check_weights_names_problems() -> None:
    m = Module("m", params={"a": Param("a", tensor("f32", [2, 3])), "b": Param("b", tensor("f32", [4]))})
    ok = check_weights(m, {"a": np.ones((2, 3), np.float64), "b": np.arange(4.0)})
    assert ok["a"].dtype == np.float32
    with pytest.raises(HFWeightError, match=r"missing 1 parameter\(s\): b; 1 unexpected tensor\(s\): c"):
        check_weights(m, {"a": np.ones((2, 3)), "c": np.ones(1)})
    with pytest.raises(HFWeightError, match=r"tensor b has shape \(5,\), the model declares \(4,\)"):
        check_weights(m, {"a": np.ones((2, 3)), "b": np.ones(5)})
