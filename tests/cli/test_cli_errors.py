"""Bad inputs: one clean message on stderr, no traceback, exit 1 (2 for usage errors), 3 for bugs."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _clean(res, code=1, *fragments):
    assert res.code == code, (res.code, res.err)
    assert "Traceback" not in res.err
    for frag in fragments:
        assert frag in res.err, res.err


def test_unknown_subcommand(cli):
    _clean(cli("frobnicate"), 2, "invalid choice: 'frobnicate'")


def test_bad_flag(cli, tiny_ir):
    _clean(cli("stats", str(tiny_ir), "--no-such-flag"), 2, "unrecognized arguments: --no-such-flag")


def test_non_integer_flag_value(cli, tiny_ir):
    _clean(cli("stats", str(tiny_ir), "--seq", "lots"), 2, "invalid int value: 'lots'")


def test_missing_model_file(cli, tmp_path):
    _clean(cli("compile", str(tmp_path / "nope.r1"), "-o", str(tmp_path / "o")), 1, "no such model file", "nope.r1")


def test_unsupported_model_suffix(cli, tmp_path):
    bad = tmp_path / "model.txt"
    bad.write_text("hello")
    _clean(cli("stats", str(bad)), 1, "unsupported model file type '.txt'")


def test_ir_parse_error(cli, tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("module @m {\n  func @f( {\n}\n")
    _clean(cli("opt", str(bad), "--passes", "cse"), 1, "bad.ir:2:")


def test_missing_artifact_dir(cli, tmp_path):
    _clean(cli("run", str(tmp_path / "missing"), "--tokens", "1 2"), 1, "does not exist")


def test_not_an_artifact(cli, tmp_path):
    _clean(cli("run", str(tmp_path), "--tokens", "1 2"), 1, "manifest.json is missing")


def test_corrupted_manifest(cli, tiny_artifact):
    (tiny_artifact / "manifest.json").write_text("{ not json")
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2"), 1, "corrupted manifest")


def test_future_format_version(cli, tiny_artifact):
    path = tiny_artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2"), 1, "format version 99 is not supported")


def test_tampered_weights(cli, tiny_artifact):
    path = tiny_artifact / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2"), 1, "weights.safetensors does not match its sha256")


def test_missing_weights_file(cli, tiny_artifact):
    (tiny_artifact / "weights.safetensors").unlink()
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2"), 1, "weights.safetensors is missing")


def test_unknown_target(cli, tiny_ir, tmp_path):
    _clean(
        cli("compile", str(tiny_ir), "--target", "fpga", "-o", str(tmp_path / "o")),
        1,
        "unknown target 'fpga'",
        "available targets: cpu, cpu-arm, cuda, ref, tpu",
    )


@pytest.mark.parametrize("target, planned", [("npu", "a planned backend")])
def test_planned_target_not_implemented(cli, tiny_ir, tmp_path, monkeypatch, target, planned):
    from r1c import backends

    monkeypatch.setitem(backends.PLANNED, target, planned)  # every planned target has landed; the path stays
    out = tmp_path / "o"
    _clean(
        cli("compile", str(tiny_ir), "--target", target, "-o", str(out)),
        1,
        f"target '{target}' is not implemented yet",
        planned,
    )
    assert not out.exists()  # no silent fallback to another target


def test_bad_pipeline_string(cli, tiny_ir):
    _clean(cli("opt", str(tiny_ir), "--passes", "cse{"), 1, "pipeline:1:")


def test_unknown_pass(cli, tiny_ir):
    _clean(
        cli("opt", str(tiny_ir), "--passes", "canonicalise"),
        1,
        "unknown pass 'canonicalise'",
        "did you mean 'canonicalize'",
    )


def test_unknown_pass_option(cli, tiny_ir, tmp_path):
    _clean(
        cli("compile", str(tiny_ir), "-o", str(tmp_path / "o"), "--passes", "cse{fast=1}"), 1, "has no option 'fast'"
    )


def test_token_out_of_vocab_range(cli, tiny_artifact):
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2 50"), 1, "token id 50 is out of range [0, 50)")


def test_negative_token(cli, tiny_artifact):
    _clean(cli("run", str(tiny_artifact), "--tokens", "-1 2"), 1, "token id -1 is out of range")


def test_non_integer_tokens(cli, tiny_artifact):
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 two 3"), 1, "'two' is not an integer token id")


def test_ragged_token_rows(cli, tiny_artifact):
    _clean(cli("run", str(tiny_artifact), "--tokens", "1 2 3", "--tokens", "4 5"), 1, "different lengths")


def test_set_on_ir_file(cli, tiny_ir):
    _clean(cli("stats", str(tiny_ir), "--set", "num_layers=1"), 1, "apply to .r1 models")


def test_malformed_set(cli, tiny_ir):
    _clean(cli("stats", str(tiny_ir), "--set", "num_layers"), 1, "expected KEY=VALUE")


def test_viz_bad_extension(cli, tiny_ir, tmp_path):
    _clean(cli("viz", str(tiny_ir), "-o", str(tmp_path / "g.jpeg")), 1, "output must end in")


def test_unexpected_exception_says_report_bug(cli, tiny_ir, monkeypatch):
    import r1c.model_stats

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic")

    monkeypatch.setattr(r1c.model_stats, "compute", boom)
    res = cli("stats", str(tiny_ir))
    _clean(res, 3, "internal error: ZeroDivisionError: synthetic", "please report this bug")


def test_traceback_env_shows_traceback(cli, tiny_artifact, monkeypatch):
    monkeypatch.setenv("R1C_TRACEBACK", "1")
    res = cli("run", str(tiny_artifact), "--tokens", "1 2 999")
    assert res.code == 1 and "Traceback" in res.err and "out of range" in res.err


def test_weights_file_that_does_not_fit(cli, tiny_ir, tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((2, 2), np.float32)}, str(tmp_path / "w.safetensors"))
    _clean(
        cli("compile", str(tiny_ir), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "w.safetensors")),
        1,
        "weights do not match module @tiny_lm",
        "unknown tensor(s): w",
    )


def test_weights_and_from_hf_are_exclusive(cli, tiny_ir, tmp_path):
    _clean(
        cli("compile", str(tiny_ir), "-o", str(tmp_path / "o"), "--weights", "a", "--from-hf", "b"),
        2,
        "not allowed with argument",
    )
