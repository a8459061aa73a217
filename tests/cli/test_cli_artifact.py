"""The artifact format and the target registry, through their Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_tiny_model import V, tiny_lm

from r1c import backends
from r1c.artifact import FORMAT_VERSION, ArtifactError, load, write
from r1c.build import ModuleBuilder, tensor
from r1c.ir.interpreter import init_weights, run
from r1c.ir.types import DType, round_to


def test_roundtrip_runs_like_the_interpreter(tmp_path):
    m = tiny_lm()
    weights = init_weights(m, seed=5)
    art = backends.get_target("ref").compile(m, weights, tmp_path / "a", {})
    loaded = load(tmp_path / "a")
    assert loaded.module == m and loaded.manifest == art.manifest
    assert loaded.manifest["format_version"] == FORMAT_VERSION
    tokens = np.random.default_rng(1).integers(0, V, (3, 6)).astype(np.int32)
    np.testing.assert_allclose(loaded.run([tokens])[0], run(m, [tokens], weights)[0], rtol=1e-6)


def test_bf16_params_are_stored_as_rounded_float32(tmp_path):
    mb = ModuleBuilder("bf", attrs={"eps": 1e-6, "mode": "x"})
    f = mb.function("forward", x=tensor("bf16", ["B", 8]))
    f.ret(f.linear(f.args[0], f.param("w", tensor("bf16", [4, 8]), "normal(1.0)")))
    m = mb.build()
    w = {"w": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    art = write(tmp_path / "a", m, w, "ref")
    stored = load(tmp_path / "a").weights["w"]
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, round_to(w["w"], DType.bf16))
    assert art.manifest["weights_storage"]["widened_to_float32"] == ["w"]
    assert art.manifest["config"] == {"eps": 1e-6, "mode": "x"}


def test_weights_must_match_params(tmp_path):
    m = tiny_lm()
    weights = init_weights(m, seed=0)
    weights.pop("lm_head.weight")
    weights["stray"] = np.ones(3, np.float32)
    with pytest.raises(ArtifactError, match="missing 1 parameter.*lm_head.weight.*unknown tensor.*stray"):
        write(tmp_path / "a", m, weights, "ref")
    weights = init_weights(m, seed=0)
    weights["lm_head.weight"] = weights["lm_head.weight"][:, :3]
    with pytest.raises(ArtifactError, match="lm_head.weight has shape"):
        write(tmp_path / "a", m, weights, "ref")


def test_manifest_without_hashes_is_rejected(tmp_path):
    m = tiny_lm(1)
    write(tmp_path / "a", m, init_weights(m), "ref")
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    del manifest["files"]["module.ir"]
    (tmp_path / "a/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no hash for module.ir"):
        load(tmp_path / "a")


def test_edited_ir_is_detected(tmp_path):
    m = tiny_lm(1)
    write(tmp_path / "a", m, init_weights(m), "ref")
    ir = tmp_path / "a/module.ir"
    ir.write_text(ir.read_text().replace("normal(0.3)", "normal(0.4)"))
    with pytest.raises(ArtifactError, match="module.ir does not match its sha256"):
        load(tmp_path / "a")


def test_run_checks_inputs(tmp_path):
    m = tiny_lm(1)
    art = write(tmp_path / "a", m, init_weights(m), "ref")
    with pytest.raises(ArtifactError, match="takes 1 input"):
        art.run([])
    with pytest.raises(ArtifactError, match="expected int32"):
        art.run([np.ones((1, 2, 3), np.int32)])
    with pytest.raises(ArtifactError, match="expected integers"):
        art.run([np.full((1, 3), 0.5)])


def test_registry():
    assert "ref" in backends.all_targets()
    assert "cuda" in backends.all_targets()
    assert {"tpu", "tpu:v5e", "tpu:v5p", "tpu:v6e"} <= set(backends.all_targets())
    with pytest.raises(
        backends.TargetError, match="unknown target 'gpu'.*available targets: cpu, cpu-arm, cuda, ref, tpu"
    ):
        backends.get_target("gpu")
    with pytest.raises(ValueError, match="registered twice"):
        backends.register_target("ref", lambda *a: None, "again")
