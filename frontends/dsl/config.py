"""Evaluate the `config { }` section in order, applying caller overrides."""

from __future__ import annotations

from typing import Any

from r1c.frontends.dsl import nodes as n
from r1c.frontends.dsl.consts import DTYPE_NAMES, describe, is_number
from r1c.frontends.dsl.errors import DSLError, Pos, SourceFile
from r1c.frontends.dsl.lower import Frame, Lowerer
from r1c.frontends.dsl.program import Program, did_you_mean
from r1c.ir.types import DType

_CONFIG_TYPES = (bool, int, float, str, DType)


def _kind(v: Any) -> str:
    return "dtype" if isinstance(v, DType) else type(v).__name__


def evaluate_config(prog: Program, overrides: dict[str, object], src: SourceFile) -> dict[str, Any]:
    """Each constant may use the ones above it; an override replaces a constant's value before later ones read it."""
    config: dict[str, Any] = {}
    lowerer = Lowerer(prog, config, None)
    frame = Frame({})
    names = [c.name for c in prog.main.config]
    for entry in prog.main.config:
        if entry.name in config:
            first = next(c.pos for c in prog.main.config if c.name == entry.name)
            raise DSLError(
                f"config constant '{entry.name}' is defined twice",
                entry.pos,
                hint=f"the first definition is at {first}",
            )
        value = lowerer.eval(entry.expr, frame)
        if not isinstance(value, _CONFIG_TYPES):
            raise DSLError(
                f"config constant '{entry.name}' must be an int, float, bool, string or dtype, got {describe(value)}",
                entry.expr.pos,
                hint="config holds scalars only",
            )
        if entry.name in overrides:
            value = _override(entry, value, overrides[entry.name])
        config[entry.name] = value
    unknown = [k for k in overrides if k not in config]
    if unknown:
        pos = prog.main.config_pos or Pos(src, 1, 1, 1, 2)
        close = did_you_mean(unknown[0], names)
        raise DSLError(
            f"cannot override '{unknown[0]}': the model has no such config constant",
            pos,
            hint=close or ("config constants: " + ", ".join(names) if names else "the model has no config"),
        )
    return config


def _override(entry: n.ConfigEntry, declared: Any, value: object) -> Any:
    if isinstance(declared, float) and is_number(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(declared, DType) and isinstance(value, str) and value in DTYPE_NAMES:
        return DTYPE_NAMES[value]
    if _kind(declared) != _kind(value) or not isinstance(value, _CONFIG_TYPES):
        raise DSLError(
            f"override {entry.name}={value!r} is a {type(value).__name__}, but the config constant is "
            f"{describe(declared)}",
            entry.pos,
            hint=f"pass a {_kind(declared)}",
        )
    return value


def evaluate_train(prog: Program, config: dict[str, Any]) -> dict[str, Any]:
    """The `train { }` entries as module attrs `train.<key>`; values may use config constants."""
    from r1c.train.config import ATTR_PREFIX, TrainConfig, TrainConfigError, check_value, suggest

    lowerer = Lowerer(prog, config, None)
    out: dict[str, Any] = {}
    for entry in prog.main.train:
        key = ATTR_PREFIX + entry.name
        if key in out:
            raise DSLError(f"train setting '{entry.name}' is given twice", entry.pos, hint="keep one")
        if entry.name not in TrainConfig.__dataclass_fields__:
            raise DSLError(f"unknown train setting '{entry.name}'", entry.pos, hint=suggest(entry.name))
        try:
            out[key] = check_value(entry.name, lowerer.eval(entry.expr, Frame({})))
        except TrainConfigError as e:
            raise DSLError(str(e), entry.expr.pos, hint="see docs/dsl.md, `train { }`") from None
    try:
        TrainConfig.from_attrs(out)
    except TrainConfigError as e:  # e.g. optimizer = "adam": a value outside its choices
        pos = prog.main.train_pos
        bad = next((c for c in prog.main.train if f"train.{c.name} " in str(e)), None)
        raise DSLError(str(e), bad.expr.pos if bad else pos, hint="see docs/dsl.md, `train { }`") from None
    return out
