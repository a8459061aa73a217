"""Pipeline text and pass options: parsing, typing, and the errors for bad pipelines."""

from __future__ import annotations

import pytest

from r1c.ir import DType, Module
from r1c.passes import PipelineError, all_passes, get_pass, parse_pipeline, registry


def _typed_pass(
    module: Module,
    *,
    block: int = 64,
    scale: float = 0.5,
    flag: bool = False,
    mode: str = "fast",
    dtype: DType = DType.int8,
) -> Module:
    return module


def _required_pass(module: Module, *, stages: int) -> Module:
    return module


@pytest.fixture
def test_passes(monkeypatch):
    for name, fn in [("typed-test", _typed_pass), ("required-test", _required_pass)]:
        monkeypatch.setitem(
            registry._PASSES, name, registry.PassInfo(name, "test pass", fn, registry._options_of(name, fn))
        )


def test_builtin_passes_are_listed_with_options() -> None:
    passes = all_passes()
    assert {"canonicalize", "cse", "dce", "constant-fold", "shape-inference"} <= set(passes)
    bind = passes["shape-inference"].options["bind"]
    assert (bind.type, bind.default, str(bind)) == (str, "", "bind: str = ''")
    assert all(info.description and "\n" not in info.description for info in passes.values())


def test_parse_simple_and_options() -> None:
    assert parse_pipeline("") == []
    assert parse_pipeline(" canonicalize , cse,dce ") == [("canonicalize", {}), ("cse", {}), ("dce", {})]
    assert parse_pipeline('shape-inference{bind="B=1,S=128"}') == [("shape-inference", {"bind": "B=1,S=128"})]
    assert parse_pipeline('shape-inference{ bind = "a\\"b" }') == [("shape-inference", {"bind": 'a"b'})]


def test_options_are_typed(test_passes) -> None:
    spec = parse_pipeline("typed-test{block=128,scale=-2.5e-3,flag=true,mode=slow,dtype=fp8e4m3}")
    info = get_pass("typed-test")
    opts = info.bind_options(spec[0][1])
    assert opts == {"block": 128, "scale": -2.5e-3, "flag": True, "mode": "slow", "dtype": DType.fp8e4m3}
    assert info.bind_options({}) == {"block": 64, "scale": 0.5, "flag": False, "mode": "fast", "dtype": DType.int8}
    assert info.bind_options({"scale": 2})["scale"] == 2.0
    assert str(info.options["dtype"]) == "dtype: dtype = 'int8'"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("typed-test{block=1.5}", ["pipeline:1:12", "option 'block'", "must be int", "'1.5'"]),
        ("typed-test{flag=yes}", ["pipeline:1:12", "option 'flag'", "must be bool", "'yes'"]),
        ("typed-test{dtype=int9}", ["pipeline:1:12", "must be a dtype name", "int8", "'int9'"]),
        ("typed-test{scale=fast}", ["option 'scale'", "must be float"]),
        ("typed-test{blok=1}", ["pipeline:1:12", "no option 'blok'", "did you mean 'block'"]),
        ("typed-test{block=1,block=2}", ["pipeline:1:20", "given twice"]),
        ("required-test", ["pipeline:1:1", "needs option 'stages'", "int (required)"]),
        ("cse,canonicalise", ["pipeline:1:5", "unknown pass 'canonicalise'", "did you mean 'canonicalize'"]),
        ("cse,,dce", ["pipeline:1:5", "expected a pass name, got ','"]),
        ("cse dce", ["pipeline:1:5", "expected ',' between passes"]),
        ("typed-test{block=1", ["pipeline:1:19", "expected ',' between options, got end of pipeline"]),
        ('shape-inference{bind="B=1}', ["pipeline:1:22", "unterminated string"]),
        ("typed-test{=1}", ["pipeline:1:12", "expected an option name"]),
        ("typed-test{block}", ["pipeline:1:17", "expected '=' after option 'block'"]),
    ],
)
def test_pipeline_errors(test_passes, text: str, fragments: list[str]) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    assert str(info.value).splitlines()[1].strip() == text.strip()  # the pipeline is echoed under the message


def test_programmatic_options_are_checked(test_passes) -> None:
    info = get_pass("typed-test")
    with pytest.raises(PipelineError, match="option 'block' of pass 'typed-test' must be int, got True"):
        info.bind_options({"block": True})
    with pytest.raises(PipelineError, match="must be a dtype name"):
        info.bind_options({"dtype": 3})


def test_bad_option_declarations_are_rejected() -> None:
    def positional(module: Module, n: int = 1) -> Module:
        return module

    def untyped(module: Module, *, n: list = ()) -> Module:  # type: ignore[assignment]
        return module

    with pytest.raises(TypeError, match="keyword-only"):
        registry._options_of("p", positional)
    with pytest.raises(TypeError, match="options are int, float, bool, str or DType"):
        registry._options_of("u", untyped)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_pass("cse", "again")(_typed_pass)
