"""The `train { }` block: its values land in module attrs `train.<key>`; bad keys and values are located errors."""

from __future__ import annotations

import pytest

from r1c.frontends.dsl import DSLError, compile_source
from r1c.ir.parser import parse_module
from r1c.train.config import TrainConfig

HEAD = "config {\n  width = 4\n}\n"
FUNC = "func forward(x: f32[B, 4]) {\n  return x\n}\n"


def compile_with(train_body: str):
    return compile_source(HEAD + "train {\n" + train_body + "}\n" + FUNC, filename="m.r1")


def test_values_land_in_module_attrs_and_round_trip() -> None:
    m = compile_with('  optimizer = "sgd"\n  lr = 2e-2\n  batch = width * 2\n  steps = 7\n  momentum = 0.9\n')
    assert m.attrs["train.optimizer"] == "sgd"
    assert m.attrs["train.lr"] == 0.02
    assert m.attrs["train.batch"] == 8  # expressions over config constants
    assert "width" in m.attrs and "train.width" not in m.attrs
    assert parse_module(str(m)) == m
    cfg = TrainConfig.from_attrs(m.attrs)
    assert (cfg.optimizer, cfg.batch, cfg.steps, cfg.momentum, cfg.warmup) == ("sgd", 8, 7, 0.9, 0)


def test_int_is_accepted_for_float() -> None:
    assert compile_with("  clip = 2\n").attrs["train.clip"] == 2.0


def locate(train_body: str) -> DSLError:
    with pytest.raises(DSLError) as info:
        compile_with(train_body)
    return info.value


def test_unknown_key_suggests_the_close_one() -> None:
    e = locate("  lr = 1e-3\n  warmpu = 10\n")
    assert (e.line, e.col) == (6, 3)
    assert "unknown train setting 'warmpu'" in e.message
    assert "did you mean 'warmup'" in e.hint


def test_wrong_kind_points_at_the_value() -> None:
    e = locate('  steps = "many"\n')
    assert (e.line, e.col) == (5, 11)
    assert "train.steps must be int" in e.message


def test_value_outside_choices() -> None:
    e = locate('  lr = 1e-3\n  optimizer = "adam"\n')
    assert e.line == 6 and e.col == 15
    assert "must be one of ['adamw', 'sgd']" in e.message


def test_key_given_twice() -> None:
    e = locate("  lr = 1e-3\n  lr = 2e-3\n")
    assert e.line == 6 and "given twice" in e.message


def test_second_train_section() -> None:
    with pytest.raises(DSLError, match="a second `train` section"):
        compile_source(HEAD + "train {\n  lr = 1e-3\n}\ntrain {\n  lr = 1e-3\n}\n" + FUNC, filename="m.r1")


def test_undefined_name_in_a_value() -> None:
    e = locate("  batch = widht\n")
    assert e.line == 5 and "widht" in e.message
