"""The CLI on .r1 models: the README quick start, --set, DSL errors, and the DeepSeek-V3 stats."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import r1c
from r1c.artifact import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "r1-tiny.r1"
V3 = REPO / "examples" / "deepseek-v3.r1"


def test_readme_quick_start(cli, tmp_path):
    out = tmp_path / "r1-tiny"
    res = cli("compile", str(TINY), "--target", "ref", "-o", str(out))
    assert res.code == 0, res.err
    res = cli("run", str(out), "--tokens", "1 2 3 4 5")
    assert res.code == 0, res.err
    art = load(out)
    logits = art.run([np.array([[1, 2, 3, 4, 5]], np.int32)])[0]
    best = int(np.argmax(logits[0, -1]))
    first_row = next(line for line in res.out.splitlines() if line.count("│") == 5)
    assert first_row.replace("│", " ").split()[-2:] == [str(best), f"{logits[0, -1, best]:.4f}"]


def test_set_overrides_config(cli, tmp_path):
    out = tmp_path / "a"
    res = cli("compile", str(TINY), "--set", "num_layers=1", "--passes", "canonicalize,cse", "-o", str(out))
    assert res.code == 0, res.err
    art = load(out)
    assert art.manifest["config"]["num_layers"] == 1
    assert not any(name.startswith("model.layers.1.") for name in art.module.params)


def test_set_unknown_constant(cli):
    res = cli("stats", str(TINY), "--set", "num_layerz=2")
    assert res.code == 1 and "Traceback" not in res.err
    assert "num_layerz" in res.err and "did you mean 'num_layers'" in res.err


def test_dsl_syntax_error_is_located(cli, tmp_path):
    bad = tmp_path / "bad.r1"
    bad.write_text("model bad\nconfig {\n  hidden_size = 64 *\n}\n")
    res = cli("compile", str(bad), "-o", str(tmp_path / "o"))
    assert res.code == 1 and "Traceback" not in res.err
    first, line, caret = res.err.splitlines()[:3]
    assert re.fullmatch(re.escape(str(bad)) + r":3:\d+: error: .+", first)
    assert line.strip() == "hidden_size = 64 *" and caret.strip().startswith("^")
    assert not (tmp_path / "o").exists()


def test_viz_dsl_model_clustered(cli, tmp_path):
    out = tmp_path / "g.dot"
    res = cli("viz", str(TINY), "--set", "num_layers=2", "--cluster-by-loc", "-o", str(out))
    assert res.code == 0, res.err
    text = out.read_text()
    assert 'label="model.layers.1.mlp"' in text and "moe_experts" in text and "subgraph cluster_" in text


def test_deepseek_v3_stats(cli):
    res = cli("stats", str(V3))
    assert res.code == 0, res.err
    summary = {}
    for line in res.out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3:
            summary[cells[0]] = cells[1:]
    assert summary["total parameters"] == ["671.0B", "671,026,419,200"]
    assert summary["activated parameters / token (incl. embedding)"] == ["37.6B", "37,552,297,472"]
    assert summary["activated parameters / token (excl. embedding)"] == ["36.6B", "36,625,618,432"]
    # forward FLOPs/token are about 2x the activated non-embedding parameters, plus attention over 4096 tokens
    flops = float(summary["FLOPs / token (forward)"][1].replace(",", ""))
    assert 2 * 36_625_618_432 < flops < 2 * 36_625_618_432 * 1.25


def test_stats_tables_add_up():
    s = r1c.stats(r1c.load(V3), seq=512)
    assert sum(r.params for r in s.by_layer) == s.total_params
    assert abs(sum(r.activated_params for r in s.by_layer) - s.activated_params) <= len(s.by_layer)
    assert sum(r.flops for r in s.by_layer) == sum(r.flops for r in s.by_op) == s.flops
    assert [r.layer for r in s.by_layer if r.layer.startswith("model.layers.")] == [
        f"model.layers.{i}" for i in range(61)
    ]
    # dense layers (first 3) hold no routed experts: all their parameters are active
    dense = next(r for r in s.by_layer if r.layer == "model.layers.0")
    assert dense.params == dense.activated_params
