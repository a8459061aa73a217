"""The pass manager's instrumentation: print-after, verify-each, timing, and the per-pass numerics check."""

from __future__ import annotations

import io

import numpy as np
import pytest

from r1c import build
from r1c.ir import Module, Param, VerifyError, parse_module, print_module
from r1c.passes import NumericsError, PassManager, PipelineError, compare_modules, registry, run_pipeline

TEXT = """module @m {
  param @w : f32[8,8] = normal(0.5)
  func @forward(%x: f32[B,8]) -> (f32[B,8]) {
    %w = param() {name="w"} : f32[8,8]
    %zero = constant() {dtype=f32, shape=[], value=0.0} : f32[]
    %0 = add(%x, %zero) : f32[B,8]
    %1 = linear(%0, %w) : f32[B,8]
    %2 = exp(%1) : f32[B,8]
    %3 = exp(%1) : f32[B,8]
    %4 = add(%2, %3) : f32[B,8]
    return %4
  }
}
"""


def _sub_for_add(module: Module) -> Module:
    """A wrong 'optimization': turns the first add into a sub."""
    for op in module.main.body:
        if op.name == "add":
            op.name = "sub"
            break
    return module


def _break_types(module: Module) -> Module:
    module.params["w"] = Param("w", module.params["w"].type.with_shape((8, 4)))
    return module


def _rename_param(module: Module) -> Module:
    module.params["w2"] = Param("w2", module.params.pop("w").type)
    for op in module.main.body:
        if op.name == "param":
            op.attrs["name"] = "w2"
    return module


@pytest.fixture
def bad_passes(monkeypatch):
    for name, fn in [("bad-sub", _sub_for_add), ("bad-types", _break_types), ("bad-rename", _rename_param)]:
        monkeypatch.setitem(
            registry._PASSES, name, registry.PassInfo(name, "a broken pass", fn, registry._options_of(name, fn))
        )


def test_run_leaves_the_input_alone_and_optimizes() -> None:
    m = parse_module(TEXT)
    out = PassManager("canonicalize,cse", verify_each=True, check_numerics=True).run(m)
    assert print_module(m) == TEXT
    assert [op.name for op in out.main.body] == ["param", "linear", "exp", "add"]


def test_print_ir_after_selected_and_all() -> None:
    buf = io.StringIO()
    out = PassManager("canonicalize,cse,dce", print_ir_after={"cse"}, out=buf).run(parse_module(TEXT))
    text = buf.getvalue()
    assert text.startswith("// ----- IR after cse -----\n")
    assert "IR after canonicalize" not in text and "IR after dce" not in text
    assert parse_module(text) == out  # the dump is parseable IR (the header is a comment)
    buf = io.StringIO()
    PassManager("canonicalize,cse,dce", print_ir_after="all", out=buf).run(parse_module(TEXT))
    headers = [line for line in buf.getvalue().splitlines() if line.startswith("// -----")]
    assert headers == [f"// ----- IR after {p} -----" for p in ("canonicalize", "cse", "dce")]


def test_print_changed_shows_a_diff_per_pass() -> None:
    buf = io.StringIO()
    PassManager("cse,cse", print_changed=True, out=buf).run(parse_module(TEXT))
    first, second = buf.getvalue().split("// ----- changes by cse -----\n")[1:]
    removed = [line for line in first.splitlines() if line.startswith("-    ")]
    added = [line for line in first.splitlines() if line.startswith("+    ")]
    assert removed == ["-    %3 = exp(%1) : f32[B,8]", "-    %4 = add(%2, %3) : f32[B,8]"]
    assert added == ["+    %4 = add(%2, %2) : f32[B,8]"]
    assert second == "// (no change)\n"


def test_print_ir_after_unknown_pass_is_an_error() -> None:
    with pytest.raises(PipelineError, match="unknown pass 'cs'"):
        PassManager("cse", print_ir_after={"cs"})


def test_time_passes_table() -> None:
    buf = io.StringIO()
    PassManager("canonicalize,cse", time_passes=True, out=buf).run(parse_module(TEXT))
    lines = buf.getvalue().splitlines()
    assert lines[0] == "// ----- pass timings -----"
    assert [line.split()[0] for line in lines[2:]] == ["canonicalize", "cse", "total"]
    assert float(lines[-1].split()[1]) >= 0.0


def test_numerics_check_names_the_first_bad_pass(bad_passes) -> None:
    pm = PassManager("canonicalize,cse,bad-sub,dce", check_numerics=True)
    with pytest.raises(NumericsError, match=r"pass 'bad-sub' changed the result: max relative error \S+ > tolerance"):
        pm.run(parse_module(TEXT))
    PassManager("canonicalize,cse,bad-sub").run(parse_module(TEXT))  # without the check nothing notices


def test_numerics_check_reports_each_pass() -> None:
    buf = io.StringIO()
    PassManager("canonicalize,cse", check_numerics=True, out=buf).run(parse_module(TEXT))
    lines = buf.getvalue().splitlines()
    assert [line.split()[3].rstrip(":") for line in lines] == ["canonicalize", "cse"]
    assert all(float(line.split()[7]) <= 1e-4 for line in lines)


def test_numerics_check_needs_stable_param_names(bad_passes) -> None:
    with pytest.raises(NumericsError, match=r"pass 'bad-rename'.*parameter @w2.*names to stay stable"):
        PassManager("bad-rename", check_numerics=True).run(parse_module(TEXT))


def test_verify_each_names_the_pass(bad_passes) -> None:
    with pytest.raises(VerifyError, match=r"IR is invalid after pass 'bad-types': @forward: 'param' defining %w"):
        PassManager("cse,bad-types,dce", verify_each=True).run(parse_module(TEXT))


def test_verify_each_checks_the_input() -> None:
    bad = parse_module(
        TEXT.replace("%1 = linear(%0, %w) : f32[B,8]", "%1 = linear(%0, %w) : f32[B,9]").replace(
            "%2 = exp(%1) : f32[B,8]", "%2 = exp(%1) : f32[B,9]"
        )
    )
    with pytest.raises(VerifyError, match="invalid before the pipeline"):
        PassManager("cse", verify_each=True).run(bad)


def test_a_failing_pass_is_named_in_a_note() -> None:
    with pytest.raises(PipelineError) as info:
        run_pipeline(parse_module(TEXT), 'shape-inference{bind="Q=3"}')
    assert "while running pass 'shape-inference'" in info.value.__notes__
    assert "symbol(s) Q" in str(info.value)


def test_list_pipelines_are_checked_up_front() -> None:
    out = run_pipeline(parse_module(TEXT), [("cse", {}), "canonicalize,dce"])
    assert len(out.main.body) == 4
    with pytest.raises(PipelineError, match="has no option 'x'"):
        PassManager([("cse", {"x": 1})])


def test_compare_modules() -> None:
    m = parse_module(TEXT)
    assert compare_modules(m, parse_module(TEXT), {"B": 3}) == 0.0
    assert compare_modules(m, _sub_for_add(parse_module(TEXT)), {"B": 3}) == 0.0  # x - 0 == x + 0
    changed = parse_module(TEXT.replace("%4 = add(%2, %3)", "%4 = sub(%2, %3)"))
    assert compare_modules(m, changed, {"B": 3}) == pytest.approx(1.0)  # 2e - 0 against 2e: error = max|2e|/max|2e|
    weights = {"w": np.full((8, 8), 0.01, np.float32)}
    assert compare_modules(m, parse_module(TEXT), {"B": 3}, seed=5, weights=weights) == 0.0


def _deep_module(layers: int) -> Module:
    """A DeepSeek-sized op count: `layers` blocks of ~160 ops with params, reshapes and redundancy."""
    mb = build.ModuleBuilder("deep")
    fb = mb.function("forward", x=build.tensor("f32", ["B", "S", 16]))
    x = fb.args[0]
    for i in range(layers):
        with fb.scope(f"model.layers.{i}"):
            for j in range(8):
                w = fb.param(f"model.layers.{i}.w{j}", build.tensor("f32", [16, 16]), init="normal(0.1)")
                zero = fb.constant(value=0.0, shape=[])
                one = fb.constant(value=1.0, shape=[])
                h = fb.mul(fb.add(fb.linear(x, w), zero), one)
                h = fb.reshape(fb.reshape(h, shape=["B*S", 16]), shape=["B", "S", 4, 4])
                h = fb.transpose(fb.transpose(h, perm=[0, 2, 1, 3]), perm=[0, 2, 1, 3])
                h = fb.reshape(h, shape=["B", "S", 16])
                a, b = fb.silu(h), fb.silu(h)
                c = fb.mul(fb.constant(value=2.0, shape=[]), fb.constant(value=0.25, shape=[]))
                x = fb.add(fb.mul(fb.add(a, b), c), fb.neg(fb.neg(x)))
                fb.exp(x)  # dead
                fb.softmax(x, axis=-1)
    fb.ret(x)
    return mb.build()


def _best_timings(module, pipeline: str, repeats: int = 3) -> tuple[dict[str, float], object]:
    """The fastest of a few runs per pass: a pause of the machine (GC, another process) is not the pass."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        buf = io.StringIO()
        out = PassManager(pipeline, time_passes=True, out=buf).run(module)
        for name, ms in _timings(buf.getvalue()).items():
            best[name] = min(ms, best.get(name, ms))
    return best, out


def test_passes_scale_linearly_on_a_deepseek_sized_module() -> None:
    small, large = _deep_module(6), _deep_module(61)
    assert len(large.main.body) > 10_000
    pipeline = "canonicalize,cse,constant-fold,dce,shape-inference"
    small_ms, _ = _best_timings(small, pipeline)
    large_ms, out = _best_timings(large, pipeline)
    assert len(out.main.body) < len(large.main.body) / 2
    for name, ms in large_ms.items():
        assert ms < 3000, f"{name} took {ms:.0f} ms on {len(large.main.body)} ops"
        # ~10x the ops may cost ~10x the time; quadratic would be ~100x. Floor small times against noise.
        assert ms < 40 * max(small_ms[name], 5.0), f"{name}: {small_ms[name]:.1f} ms -> {ms:.1f} ms"


def _timings(table: str) -> dict[str, float]:
    rows = [line.split() for line in table.splitlines()[2:-1]]
    return {row[0]: float(row[1]) for row in rows}
