"""Every subcommand end to end through r1c.cli.main(argv)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_tiny_model import V, expected_counts, tiny_lm

import r1c
from r1c.artifact import load
from r1c.ir.interpreter import init_weights, run


def test_version(cli):
    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"r1c {r1c.__version__}"


def test_compile_writes_a_loadable_artifact(cli, tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["target"] == "ref" and manifest["entry"] == "forward"
    assert manifest["inputs"] == [{"name": "tokens", "type": "int32[B,S]"}]
    assert manifest["outputs"][0]["type"] == f"f32[B,S,{V}]"
    assert manifest["parameters"]["elements"] == expected_counts()[0]
    art = load(tiny_artifact)
    # --seed 3 means the weights are exactly the initializers drawn with seed 3
    want = init_weights(tiny_lm(), seed=3)
    assert set(art.weights) == set(want)
    for name in want:
        np.testing.assert_array_equal(art.weights[name], want[name])


def test_run_prints_top_k_of_last_position(cli, tiny_artifact):
    res = cli("run", str(tiny_artifact), "--tokens", "1 2 3 4", "--tokens", "5, 6, 7, 8", "--top", "3")
    assert res.code == 0, res.err
    art = load(tiny_artifact)
    logits = run(art.module, [np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)], art.weights)[0]
    rows = [line.replace("│", " ").split() for line in res.out.splitlines() if line.count("│") == 5]
    printed = [(int(r[-2]), float(r[-1])) for r in rows]
    assert len(printed) == 6
    for b in range(2):
        top = np.argsort(-logits[b, -1])[:3]
        assert [t for t, _ in printed[3 * b : 3 * b + 3]] == [int(t) for t in top]
        np.testing.assert_allclose([v for _, v in printed[3 * b : 3 * b + 3]], logits[b, -1, top], atol=1e-4)


def test_run_saves_logits(cli, tiny_artifact, tmp_path):
    path = tmp_path / "logits.npy"
    res = cli("run", str(tiny_artifact), "--tokens", "7 8 9", "--output", str(path))
    assert res.code == 0, res.err
    art = load(tiny_artifact)
    want = run(art.module, [np.array([[7, 8, 9]], np.int32)], art.weights)[0]
    np.testing.assert_allclose(np.load(path), want, rtol=1e-6)


def test_run_takes_a_model_file(cli, tiny_ir, tiny_artifact, tmp_path):
    """`r1c run MODEL.ir --seed 3` runs what `r1c compile --target ref --seed 3` would write; weight options apply to
    model files only."""
    res = cli("run", str(tiny_artifact), "--tokens", "7 8 9", "--output", str(tmp_path / "art.npy"))
    assert res.code == 0, res.err
    res = cli("run", str(tiny_ir), "--seed", "3", "--tokens", "7 8 9", "--output", str(tmp_path / "model.npy"))
    assert res.code == 0, res.err
    np.testing.assert_array_equal(np.load(tmp_path / "model.npy"), np.load(tmp_path / "art.npy"))
    res = cli("run", str(tiny_ir), "--tokens", "7 8 9", "--output", str(tmp_path / "seed0.npy"))
    assert res.code == 0 and not np.array_equal(np.load(tmp_path / "seed0.npy"), np.load(tmp_path / "art.npy"))
    res = cli("run", str(tiny_artifact), "--seed", "3", "--tokens", "7 8 9")
    assert res.code == 1 and "--set, --seed and --weights apply to a model file" in res.err


def test_opt_prints_final_ir_and_instrumentation(cli, tiny_ir, tmp_path):
    res = cli(
        "opt",
        str(tiny_ir),
        "--passes",
        "cse,dce",
        "--print-ir-after",
        "cse",
        "--verify-each",
        "--time-passes",
        "--check-numerics",
    )
    assert res.code == 0, res.err
    assert res.out.startswith("module @tiny_lm") and "IR after" not in res.out
    assert "// ----- IR after cse -----" in res.err and "IR after dce" not in res.err
    assert "pass timings" in res.err
    optimized = r1c.ir.verify(r1c.ir.parse_module(res.out))
    original = tiny_lm()
    weights = init_weights(original, seed=1)
    tokens = np.random.default_rng(0).integers(0, V, (2, 5)).astype(np.int32)
    np.testing.assert_allclose(run(optimized, [tokens], weights)[0], run(original, [tokens], weights)[0], rtol=1e-6)
    out = tmp_path / "o.ir"
    res = cli("opt", str(tiny_ir), "--passes", "canonicalize", "--print-ir-after-all", "-o", str(out))
    assert res.code == 0 and res.out == "" and "IR after canonicalize" in res.err
    assert out.read_text().startswith("module @tiny_lm")


def test_passes_lists_every_registered_pass(cli):
    from r1c.passes import all_passes

    res = cli("passes")
    assert res.code == 0
    for name, info in all_passes().items():
        assert name in res.out
        for opt in info.options:
            assert opt in res.out


def test_stats_prints_counts(cli, tiny_ir):
    res = cli("stats", str(tiny_ir), "--seq", "16")
    assert res.code == 0, res.err
    total, activated, embed = expected_counts()
    for n in (total, activated, activated - embed):
        assert f"{n:,}" in res.out
    assert "moe_experts" in res.out and "model.layers.1" in res.out


@pytest.mark.parametrize(
    "suffix",
    [  # rendering needs graphviz's `dot` program (a system package: .ci/run installs it), a .dot file does not
        pytest.param("svg", marks=pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` missing")),
        "dot",
    ],
)
def test_viz_writes_graph(cli, tiny_ir, tmp_path, suffix):
    out = tmp_path / f"g.{suffix}"
    res = cli("viz", str(tiny_ir), "-o", str(out), "--cluster-by-loc")
    assert res.code == 0, res.err
    text = out.read_text()
    assert "moe_experts" in text and "model.layers.0.self_attn" in text
    assert text.lstrip().startswith("<?xml" if suffix == "svg" else "digraph")


def test_viz_truncates_with_a_message(cli, tiny_ir, tmp_path):
    out = tmp_path / "g.dot"
    res = cli("viz", str(tiny_ir), "-o", str(out), "--max-ops", "5")
    assert res.code == 0
    assert "truncated" in res.err and "first 5 of" in res.err
    assert "more ops not drawn" in out.read_text()


def test_compile_with_weights_file(cli, tiny_ir, tmp_path):
    from safetensors.numpy import save_file

    weights = init_weights(tiny_lm(), seed=42)
    save_file(weights, str(tmp_path / "w.safetensors"))
    out = tmp_path / "art"
    res = cli("compile", str(tiny_ir), "-o", str(out), "--weights", str(tmp_path / "w.safetensors"))
    assert res.code == 0 and "loaded" in res.out
    art = load(out)
    for name, w in weights.items():
        np.testing.assert_array_equal(art.weights[name], w)
