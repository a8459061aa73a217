"""The syntax tree of a `.r1` file. Every node keeps its source span so lowering errors point at the text."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from r1c.frontends.dsl.errors import Pos

# ---- expressions ----


@dataclass
class Expr:
    pos: Pos


@dataclass
class Num(Expr):
    value: int | float


@dataclass
class Str(Expr):
    value: str


@dataclass
class Bool(Expr):
    value: bool


@dataclass
class Name(Expr):
    id: str


@dataclass
class ListExpr(Expr):
    items: list[Expr]


@dataclass
class Unary(Expr):
    op: str  # neg | not
    operand: Expr


@dataclass
class Binary(Expr):
    op: str  # add sub mul div floordiv mod pow and or, or a comparison: == != < <= > >=
    left: Expr
    right: Expr


@dataclass
class Kwarg:
    pos: Pos
    name: str
    value: Expr


@dataclass
class InstancePath:
    """`as model.layers[i]`: names, and index expressions evaluated at the call."""

    pos: Pos
    parts: list[str | Expr]


@dataclass
class Call(Expr):
    func: str
    func_pos: Pos
    args: list[Expr]
    kwargs: list[Kwarg]
    path: InstancePath | None


@dataclass
class GetAttr(Expr):
    obj: Expr
    name: str


@dataclass
class Index(Expr):
    obj: Expr
    index: Expr


# ---- statements ----


@dataclass
class TypeSpec:
    """`int` (kind), `[B, S, D]` (shape pattern) or `bf16[B, S]` (tensor type)."""

    pos: Pos
    kind: str | None = None
    dtype: Name | None = None
    dims: list[Expr] | None = None


@dataclass
class Stmt:
    pos: Pos


@dataclass
class Assign(Stmt):
    targets: list[tuple[str, Pos]]
    values: list[Expr]


@dataclass
class Init:
    pos: Pos
    kind: str
    args: list[Expr]


@dataclass
class ParamDecl(Stmt):
    name: str
    name_pos: Pos
    type: TypeSpec
    init: Init


@dataclass
class Return(Stmt):
    values: list[Expr]


@dataclass
class Error(Stmt):
    message: Expr


@dataclass
class If(Stmt):
    branches: list[tuple[Expr, list[Stmt]]]
    orelse: list[Stmt] | None


@dataclass
class Repeat(Stmt):
    var: str
    start: Expr
    stop: Expr
    body: list[Stmt]


# ---- top level ----


@dataclass
class ArgDecl:
    pos: Pos
    name: str
    type: TypeSpec | None
    default: Expr | None


@dataclass
class Callable:
    """A `block` or a `func`."""

    pos: Pos
    name: str
    name_pos: Pos
    args: list[ArgDecl]
    body: list[Stmt]
    is_func: bool

    @cached_property
    def has_params(self) -> bool:
        return _declares_params(self.body)


def _declares_params(body: list[Stmt]) -> bool:
    for s in body:
        if isinstance(s, ParamDecl):
            return True
        if isinstance(s, If) and (any(_declares_params(b) for _, b in s.branches) or _declares_params(s.orelse or [])):
            return True
        if isinstance(s, Repeat) and _declares_params(s.body):
            return True
    return False


@dataclass
class ConfigEntry:
    pos: Pos
    name: str
    expr: Expr


@dataclass
class Import:
    pos: Pos
    name: str


@dataclass
class File:
    model: tuple[str, Pos] | None = None
    config_pos: Pos | None = None
    config: list[ConfigEntry] = field(default_factory=list)
    train_pos: Pos | None = None
    train: list[ConfigEntry] = field(default_factory=list)  # `train { }`: module attrs `train.<key>`
    imports: list[Import] = field(default_factory=list)
    blocks: list[Callable] = field(default_factory=list)
    funcs: list[Callable] = field(default_factory=list)
    # top-level items that only a model file may hold, for the "imported files hold only blocks" check
    model_items: list[Pos] = field(default_factory=list)
