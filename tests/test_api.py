"""The public Python API: r1c.load / optimize / compile / stats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.build import ModuleBuilder, tensor
from r1c.ir.core import DimList
from r1c.ir.interpreter import init_weights, run
from r1c.ir.types import DType

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "r1-tiny.r1"


def _bigram(vocab: int = 40, dim: int = 8):
    """Embedding -> (x + x*1) -> lm_head: canonicalize/cse have something to remove."""
    mb = ModuleBuilder("bigram", attrs={"vocab_size": vocab})
    f = mb.function("forward", tokens=tensor("int32", ["B", "S"]))
    with f.scope("model.embed_tokens"):
        x = f.embedding(f.param("embed", tensor("f32", [vocab, dim]), "normal(1.0)"), f.args[0])
    with f.scope("model.layers.0"):
        one = f.constant(value=1.0, shape=DimList([]), dtype=DType.f32)
        x = f.add(x, f.mul(x, one))
    with f.scope("lm_head"):
        f.ret(f.linear(x, f.param("head", tensor("f32", [vocab, dim]), "normal(0.5)")))
    return mb.build()


def test_load_ir(tmp_path):
    m = _bigram()
    path = tmp_path / "m.ir"
    path.write_text(str(m))
    assert r1c.load(path) == m


def test_load_rejects_unknown_suffix(tmp_path):
    (tmp_path / "m.onnx").write_text("")
    with pytest.raises(ValueError, match="unsupported model file type"):
        r1c.load(tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError):
        r1c.load(tmp_path / "missing.ir")


def test_compile_with_passes_matches_unoptimized(tmp_path):
    m = _bigram()
    art = r1c.compile(m, target="ref", passes="canonicalize,cse,dce", seed=7, out_dir=tmp_path / "a")
    assert len(art.module.main.body) < len(m.main.body)
    tokens = np.random.default_rng(0).integers(0, 40, (2, 5)).astype(np.int32)
    want = run(m, [tokens], init_weights(m, seed=7))[0]
    np.testing.assert_allclose(art.run([tokens])[0], want, rtol=1e-6)
    np.testing.assert_allclose(r1c.load_artifact(tmp_path / "a").run([tokens])[0], want, rtol=1e-6)


def test_compile_with_given_weights_to_temp_dir():
    m = _bigram()
    weights = init_weights(m, seed=11)
    art = r1c.compile(m, weights=weights)
    assert art.path.is_dir() and (art.path / "manifest.json").is_file()
    for name, w in weights.items():
        np.testing.assert_array_equal(art.weights[name], w)


def test_compile_unknown_target_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'tpu:v99'"):
        r1c.compile(_bigram(), target="tpu:v99", out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_optimize_with_instrumentation():
    m = _bigram()
    out = r1c.optimize(m, "canonicalize,dce", verify_each=True, check_numerics=True)
    assert "mul" not in {op.name for op in out.main.body}
    assert "mul" in {op.name for op in m.main.body}  # the input module is left alone


def test_stats():
    s = r1c.stats(_bigram(), seq=10)
    assert s.total_params == 2 * 40 * 8
    assert s.embedding_params == 40 * 8
    assert s.activated_params_excl_embedding == 40 * 8
    # per token: linear 2*8*40, add 8, mul 8 (cost rules of the registry)
    assert s.flops_per_token == 2 * 8 * 40 + 8 + 8


def test_import_is_cheap():
    code = (
        "import sys, r1c; print(sorted(m for m in ('torch', 'lark', 'transformers', 'r1c.passes') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_load_dsl_compile_and_run(tmp_path):
    m = r1c.load(TINY, overrides={"num_layers": 2})
    assert m.attrs["num_layers"] == 2
    art = r1c.compile(m, out_dir=tmp_path / "a")
    tokens = np.random.default_rng(0).integers(0, m.attrs["vocab_size"], (1, 4)).astype(np.int32)
    logits = art.run([tokens])[0]
    assert logits.shape == (1, 4, m.attrs["vocab_size"]) and np.isfinite(logits).all()
