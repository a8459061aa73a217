"""Parser for the IR text form printed by `r1c.ir.printer`."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import lark

from r1c.ir.core import DimList, Function, Module, Op, Param, Value
from r1c.ir.types import TensorType, parse_dtype


class IRParseError(ValueError):
    def __init__(self, message: str, pos: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.pos = pos  # (line, column) of the offending token, when known


def _pos(tok: object) -> tuple[int, int] | None:
    return (tok.line, tok.column) if isinstance(tok, lark.Token) and tok.line is not None else None


class _Sym(str):
    """A bare symbolic dimension inside an attribute list."""


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "ir.lark").read_text()
    return lark.Lark(grammar, parser="lalr", maybe_placeholders=True, propagate_positions=True)


def _name(tok: lark.Token) -> str:
    text = str(tok)[1:]
    return ast.literal_eval(text) if text.startswith('"') else text


class _Builder(lark.Transformer):
    def __init__(self, source_name: str) -> None:
        super().__init__()
        self.source_name = source_name

    def dim_int(self, items):
        return int(items[0])

    def dim_sym(self, items):
        return str(items[0])

    def type(self, items):
        return TensorType(parse_dtype(str(items[0])), tuple(d for d in items[1:] if d is not None))

    def number(self, items):
        text = str(items[0])
        return float(text) if any(c in text for c in ".eE") else int(text)

    def pos_inf(self, _):
        return float("inf")

    def neg_inf(self, _):
        return float("-inf")

    def nan(self, _):
        return float("nan")

    def true(self, _):
        return True

    def false(self, _):
        return False

    def none(self, _):
        return None

    def string(self, items):
        return ast.literal_eval(str(items[0]))

    def dtype(self, items):
        return parse_dtype(str(items[0]))

    def sym(self, items):
        return _Sym(items[0])

    def list(self, items):
        items = [i for i in items if i is not None] if items != [None] else []
        if any(isinstance(i, _Sym) for i in items):
            return DimList(str(i) if isinstance(i, _Sym) else i for i in items)
        return tuple(items)

    def attr_entry(self, items):
        key, value = str(items[0]), items[1]
        if isinstance(value, _Sym):
            raise IRParseError(f"attribute {key}: bare symbol {value!r}; quote strings or use a list for dims")
        return key, value

    def attr_dict(self, items):
        return dict(i for i in items if i is not None)

    def attributes(self, items):
        return items[0]

    def loc(self, items):
        return ast.literal_eval(str(items[0]))

    def param(self, items):
        return Param(_name(items[0]), items[1], str(items[2]))

    def arg(self, items):
        return ("arg", str(items[0])[1:], items[1])

    def op(self, items):
        return ("op", items)

    def ret(self, items):
        return ("ret", [v for v in items if v is not None])

    def func(self, items):
        name = _name(items[0])
        rest = [i for i in items[1:] if i is not None]
        env: dict[str, Value] = {}
        args, ret_types, body, rets = [], [], [], []

        def use(tok: lark.Token, where: str) -> Value:
            key = str(tok)[1:]
            if key not in env:
                raise IRParseError(f"@{name}: {where} uses %{key} before it is defined", _pos(tok))
            return env[key]

        for item in rest:
            if isinstance(item, TensorType):
                ret_types.append(item)
            elif item[0] == "arg":
                v = Value(item[1], item[2])
                env[v.name] = v
                args.append(v)
            elif item[0] == "op":
                body.append(self._op(item[1], use, env, name))
            elif item[0] == "ret":
                rets = [use(r, "return") for r in item[1]]
        if [r.type for r in rets] != ret_types:
            got = ", ".join(f"{r}: {r.type}" for r in rets)
            raise IRParseError(f"@{name}: returns ({got}) but the signature says ({', '.join(map(str, ret_types))})")
        return Function(name, args, body, rets)

    def _op(self, items, use, env, fname) -> Op:
        results = [t for t in items if isinstance(t, lark.Token) and t.type == "VALUE"]
        opname_idx = next(i for i, t in enumerate(items) if isinstance(t, lark.Token) and t.type == "OPNAME")
        result_names = results[:opname_idx]
        operand_toks = [t for t in items[opname_idx + 1 :] if isinstance(t, lark.Token) and t.type == "VALUE"]
        attrs = next((t for t in items if isinstance(t, dict)), {})
        types = [t for t in items if isinstance(t, TensorType)]
        loc = next((t for t in items[opname_idx + 1 :] if isinstance(t, str) and not isinstance(t, lark.Token)), None)
        opname = str(items[opname_idx])
        if len(types) != len(result_names):
            raise IRParseError(f"@{fname}: {opname} defines {len(result_names)} values but lists {len(types)} types")
        operands = tuple(use(t, opname) for t in operand_toks)
        res = []
        for tok, t in zip(result_names, types):
            n = str(tok)[1:]
            if n in env:
                raise IRParseError(f"@{fname}: %{n} is defined twice (second time by {opname})", _pos(tok))
            env[n] = Value(n, t)
            res.append(env[n])
        return Op(opname, operands, tuple(res), attrs, loc)

    def module(self, items):
        name = _name(items[0])
        # `attributes?` leaves no placeholder: items[1] is the attribute dict only when there is one.
        attrs = items[1] if len(items) > 1 and isinstance(items[1], dict) else {}
        m = Module(name, attrs=attrs)
        for item in items[1:]:
            if isinstance(item, Param):
                m.params[item.name] = item
            elif isinstance(item, Function):
                if item.name in m.functions:
                    raise IRParseError(f"function @{item.name} is defined twice")
                m.functions[item.name] = item
        return m

    def start(self, items):
        return items[0]


def parse_module(text: str, source_name: str = "<ir>") -> Module:
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        line = text.splitlines()[e.line - 1] if 0 < e.line <= len(text.splitlines()) else ""
        found = getattr(e, "token", None)
        what = f"unexpected {str(found)!r}" if found else f"unexpected {getattr(e, 'char', 'input')!r}"
        if getattr(e, "expected", None):
            what += f", expected one of {', '.join(sorted(e.expected)[:8])}"
        raise IRParseError(
            f"{source_name}:{e.line}:{e.column}: {what}\n  {line}\n  {' ' * (e.column - 1)}^", (e.line, e.column)
        ) from None
    try:
        return _Builder(source_name).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, (IRParseError, ValueError)):
            pos = getattr(e.orig_exc, "pos", None)
            where = f"{source_name}:{pos[0]}:{pos[1]}" if pos else source_name
            raise IRParseError(f"{where}: {e.orig_exc}", pos) from None
        raise
