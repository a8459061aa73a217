"""The pass registry: a pass is a named function `(module, **options) -> Module`.

Options are the pass function's keyword-only parameters; their annotations (int, float, bool, str, DType)
give the types the pipeline parser converts option text to, and their defaults the defaults (no default:
the option is required). Keeping the signature as the single declaration means `r1c passes` cannot drift
from what a pass actually accepts.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

from r1c.ir.core import Module
from r1c.ir.types import DType, parse_dtype

OPTION_TYPES: tuple[type, ...] = (int, float, bool, str, DType)
REQUIRED = inspect.Parameter.empty

PassFn = Callable[..., Module]


class PipelineError(ValueError):
    """A bad pipeline: unknown pass, unknown or ill-typed option, or a syntax error."""


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: type
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def __str__(self) -> str:
        kind = "dtype" if self.type is DType else self.type.__name__
        if self.required:
            return f"{self.name}: {kind} (required)"
        default = self.default.value if isinstance(self.default, DType) else self.default
        return f"{self.name}: {kind} = {default!r}"

    def convert(self, pass_name: str, value: Any) -> Any:
        """Check a programmatic value, or convert option text from a pipeline string."""
        where = f"option '{self.name}' of pass '{pass_name}'"
        if isinstance(value, str) and self.type is not str:
            return self._from_text(where, value)
        ok = (
            isinstance(value, self.type)
            and not (self.type is int and isinstance(value, bool))
            or (self.type is float and isinstance(value, int) and not isinstance(value, bool))
        )
        if not ok:
            raise PipelineError(f"{where} must be {self._kind()}, got {value!r}")
        return float(value) if self.type is float else value

    def _kind(self) -> str:
        return "a dtype name" if self.type is DType else f"{self.type.__name__}"

    def _from_text(self, where: str, text: str) -> Any:
        try:
            if self.type is bool:
                if text not in ("true", "false"):
                    raise ValueError
                return text == "true"
            if self.type is DType:
                return parse_dtype(text)
            return self.type(text)
        except ValueError:
            extra = f" ({', '.join(d.value for d in DType)})" if self.type is DType else ""
            raise PipelineError(f"{where} must be {self._kind()}{extra}, got {text!r}") from None


# A lossy pass's numerics allowance, from its typed options: the max relative error it may add.
Tolerance = Callable[[dict[str, Any]], float]


@dataclass(frozen=True)
class PassInfo:
    name: str
    description: str
    fn: PassFn
    options: dict[str, OptionInfo]
    tolerance: Tolerance | None = None  # None: the pass is exact (the global numerics tolerance applies)

    def tolerance_for(self, options: dict[str, Any]) -> float:
        """The relative error this pass may add with these options (0 for an exact pass)."""
        return self.tolerance(self.bind_options(options)) if self.tolerance else 0.0

    def bind_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Typed, complete options for a call: unknown, ill-typed and missing options are PipelineErrors."""
        out = {key: self.convert_option(key, value) for key, value in options.items()}
        for opt in self.options.values():
            if opt.name not in out:
                if opt.required:
                    raise PipelineError(f"pass '{self.name}' needs option '{opt.name}' ({opt})")
                out[opt.name] = opt.default
        return out

    def convert_option(self, key: str, value: Any) -> Any:
        if key not in self.options:
            close = difflib.get_close_matches(key, list(self.options), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            takes = ", ".join(self.options) or "no options"
            raise PipelineError(f"pass '{self.name}' has no option '{key}'{hint} (it takes {takes})")
        return self.options[key].convert(self.name, value)

    def __call__(self, module: Module, **options: Any) -> Module:
        return self.fn(module, **self.bind_options(options))


_PASSES: dict[str, PassInfo] = {}


def _options_of(name: str, fn: PassFn) -> dict[str, OptionInfo]:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(f"pass '{name}': the first parameter must be the module")
    options = {}
    for p in params[1:]:
        if p.kind is not p.KEYWORD_ONLY:
            raise TypeError(f"pass '{name}': option '{p.name}' must be keyword-only (put it after `*`)")
        t = hints.get(p.name)
        if t not in OPTION_TYPES:
            raise TypeError(
                f"pass '{name}': option '{p.name}' has type {t!r}; options are int, float, bool, str or DType"
            )
        options[p.name] = OptionInfo(p.name, t, p.default)
    return options


def register_pass(name: str, description: str, tolerance: Tolerance | None = None) -> Callable[[PassFn], PassFn]:
    """`tolerance` (lossy passes only): options -> the max relative error the pass may add, which the
    pass manager's numerics check allows on top of its global tolerance."""

    def wrap(fn: PassFn) -> PassFn:
        if name in _PASSES:
            raise ValueError(f"pass '{name}' is registered twice")
        _PASSES[name] = PassInfo(name, description, fn, _options_of(name, fn), tolerance)
        return fn

    return wrap


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PipelineError(f"unknown pass '{name}'{hint} (see `r1c passes`)")
    return _PASSES[name]


def all_passes() -> dict[str, PassInfo]:
    _ensure_loaded()
    return dict(sorted(_PASSES.items()))


def _ensure_loaded() -> None:
    import r1c.passes  # noqa: F401  (importing the package registers the built-in passes)
