"""Text -> syntax tree (`nodes.File`). Syntax errors become DSLErrors with the position of the offending token."""

from __future__ import annotations

import ast as pyast
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from lark import Lark, Token, Transformer, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, v_args
from lark.exceptions import VisitError
from lark.lexer import PatternStr

from r1c.frontends.dsl import nodes as n
from r1c.frontends.dsl.errors import DSLError, Pos, SourceFile

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


class _BracketError(Exception):
    def __init__(self, message: str, tok: Token, hint: str) -> None:
        super().__init__(message)
        self.message, self.tok, self.hint = message, tok, hint


class _Newlines:
    """Makes newlines statement terminators: drops them inside () and [], after `{` and after another newline,
    and inserts one before `}` so `{ return x }` fits on one line. Also pairs brackets, so an unclosed one is
    reported where it opens rather than at the end of the file."""

    always_accept = ("_NL", "_NL_ELSE", "_RBRACE")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        stack: list[Token] = []
        prev: str | None = None
        last: Token | None = None
        for tok in stream:
            in_parens = bool(stack) and stack[-1].value != "{"
            if tok.type == "_NL_ELSE":
                if prev == "_RBRACE":
                    continue
                tok = Token.new_borrow_pos("_NL", tok.value, tok)
            if tok.type == "_NL":
                if not in_parens and prev not in (None, "_NL", "_LBRACE"):
                    prev = "_NL"
                    yield tok
                continue
            if tok.value in _OPEN and tok.type != "STRING":
                stack.append(tok)
            elif tok.value in _CLOSE and tok.type != "STRING":
                if not stack:
                    raise _BracketError(
                        f"unmatched '{tok.value}'",
                        tok,
                        f"remove it, or add the '{_CLOSE[tok.value]}' that it should close",
                    )
                if not any(o.value == _CLOSE[tok.value] for o in stack):
                    raise _BracketError(
                        f"unmatched '{tok.value}'",
                        tok,
                        f"remove it, or add the '{_CLOSE[tok.value]}' that it should close",
                    )
                if stack[-1].value != _CLOSE[tok.value]:
                    opener = stack[-1]
                    raise _BracketError(
                        f"'{opener.value}' is not closed",
                        opener,
                        f"add '{_OPEN[opener.value]}' before the '{tok.value}' at line {tok.line}",
                    )
                stack.pop()
                if tok.type == "_RBRACE" and prev not in ("_NL", "_LBRACE"):
                    yield Token.new_borrow_pos("_NL", "", tok)
            prev, last = tok.type, tok
            yield tok
        if stack:
            opener = stack[-1]
            raise _BracketError(f"'{opener.value}' is not closed", opener, f"add the matching '{_OPEN[opener.value]}'")
        if prev not in (None, "_NL") and last is not None:
            yield Token("_NL", "", last.end_pos, last.end_line, last.end_column, last.end_line, last.end_column)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_Newlines(),
    )


def _tok_pos(src: SourceFile, tok: Token) -> Pos:
    return Pos(
        src, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + max(1, len(tok.value))
    )


_DESCRIBE = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "_NL": "end of line",
    "_NL_ELSE": "end of line",
    "COMP_OP": "a comparison",
    "$END": "end of file",
    "TRUE": "'true'",
    "FALSE": "'false'",
}


def _describe_expected(parser: Lark, names: set[str]) -> str:
    terms = {t.name: t for t in parser.terminals}
    out = set()
    for name in names:
        if name in _DESCRIBE:
            out.add(_DESCRIBE[name])
        elif name in terms and isinstance(terms[name].pattern, PatternStr):
            out.add(f"'{terms[name].pattern.value}'")
        else:
            out.add(name.lower())
    return ", ".join(sorted(out))


def _syntax_error(parser: Lark, src: SourceFile, e: Exception) -> DSLError:
    if isinstance(e, UnexpectedCharacters):
        ch = src.line(e.line)[e.column - 1 : e.column] or "?"
        pos = Pos(src, e.line, e.column, e.line, e.column + 1)
        return DSLError(
            f"unexpected character '{ch}'",
            pos,
            hint=f"expected {_describe_expected(parser, set(e.allowed))}"
            if e.allowed
            else "this character is not part of the language",
        )
    if isinstance(e, UnexpectedToken):
        tok = e.token
        expected = _describe_expected(parser, set(e.expected))
        if tok.type == "$END":
            last = len(src.lines) or 1
            col = len(src.line(last)) + 1
            return DSLError("unexpected end of file", Pos(src, last, col, last, col + 1), hint=f"expected {expected}")
        pos = _tok_pos(src, tok)
        if tok.type == "_NL":
            what = "end of statement" if tok.value == "" else "end of line"
            pos = Pos(src, tok.line, tok.column, tok.line, tok.column + 1)
            return DSLError(f"unexpected {what}", pos, hint=f"the statement is incomplete; expected {expected}")
        return DSLError(f"unexpected '{tok.value}'", pos, hint=f"expected {expected}")
    assert isinstance(e, UnexpectedEOF)
    last = len(src.lines) or 1
    col = len(src.line(last)) + 1
    return DSLError(
        "unexpected end of file",
        Pos(src, last, col, last, col + 1),
        hint=f"expected {_describe_expected(parser, set(e.expected))}",
    )


def parse(text: str, filename: str) -> n.File:
    src = SourceFile(filename, text)
    parser = _parser()
    try:
        tree = parser.parse(text)
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as e:
        raise _syntax_error(parser, src, e) from None
    except _BracketError as e:
        raise DSLError(e.message, _tok_pos(src, e.tok), hint=e.hint) from None
    try:
        return _ToNodes(src).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, DSLError):
            raise e.orig_exc from None
        raise


def _present(items) -> list:
    return [x for x in items if x is not None]


@v_args(inline=True, meta=True)
class _ToNodes(Transformer):
    def __init__(self, src: SourceFile) -> None:
        super().__init__()
        self.src = src

    def _pos(self, meta) -> Pos:
        if getattr(meta, "empty", True):
            return Pos(self.src, 1, 1, 1, 2)
        return Pos(self.src, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tpos(self, tok: Token) -> Pos:
        return _tok_pos(self.src, tok)

    # ---- top level ----
    def start(self, meta, *items) -> n.File:
        f = n.File()
        for it in items:
            if isinstance(it, n.Import):
                f.imports.append(it)
            elif isinstance(it, n.Callable):
                (f.funcs if it.is_func else f.blocks).append(it)
                if it.is_func:
                    f.model_items.append(it.pos)
            elif it[0] == "model":
                if f.model is not None:
                    raise DSLError("`model` is given twice", it[2], hint=f"the first one is at line {f.model[1].line}")
                f.model = (it[1], it[2])
                f.model_items.append(it[2])
            elif it[0] == "train":
                if f.train_pos is not None:
                    raise DSLError(
                        "a second `train` section",
                        it[1],
                        hint=f"put all training settings in the section at line {f.train_pos.line}",
                    )
                f.train_pos, f.train = it[1], it[2]
                f.model_items.append(it[1])
            else:
                if f.config_pos is not None:
                    raise DSLError(
                        "a second `config` section",
                        it[1],
                        hint=f"put all constants in the section at line {f.config_pos.line}",
                    )
                f.config_pos, f.config = it[1], it[2]
                f.model_items.append(it[1])
        return f

    def model_decl(self, meta, name):
        return ("model", str(name), self._pos(meta))

    def import_decl(self, meta, name):
        return n.Import(self._pos(meta), str(name))

    def config_decl(self, meta, *entries):
        return ("config", self._pos(meta), list(entries))

    def train_decl(self, meta, *entries):
        return ("train", self._pos(meta), list(entries))

    def config_entry(self, meta, name, expr):
        return n.ConfigEntry(self._tpos(name), str(name), expr)

    def _callable(self, meta, name, rest, is_func):
        *args, body = rest
        return n.Callable(self._pos(meta), str(name), self._tpos(name), _present(args), body, is_func)

    def func_decl(self, meta, name, *rest):
        return self._callable(meta, name, rest, True)

    def block_decl(self, meta, name, *rest):
        return self._callable(meta, name, rest, False)

    def arg_decl(self, meta, name, type_spec, default):
        return n.ArgDecl(self._tpos(name), str(name), type_spec, default)

    def kind_spec(self, meta, name):
        return n.TypeSpec(self._pos(meta), kind=str(name))

    def tensor_spec(self, meta, dtype, *dims):
        d = n.Name(self._tpos(dtype), str(dtype)) if dtype is not None else None
        return n.TypeSpec(self._pos(meta), dtype=d, dims=_present(dims))

    def body(self, meta, *stmts):
        return list(stmts)

    # ---- statements ----
    def assign(self, meta, *parts):
        targets = [(str(p), self._tpos(p)) for p in parts if isinstance(p, Token)]
        values = [p for p in parts if not isinstance(p, Token)]
        return n.Assign(self._pos(meta), targets, values)

    def param_decl(self, meta, name, type_spec, init):
        return n.ParamDecl(self._pos(meta), str(name), self._tpos(name), type_spec, init)

    def init(self, meta, name, *args):
        return n.Init(self._pos(meta), str(name), _present(args))

    def return_stmt(self, meta, *values):
        return n.Return(self._pos(meta), _present(values))

    def error_stmt(self, meta, message):
        return n.Error(self._pos(meta), message)

    def if_stmt(self, meta, *parts):
        *pairs, orelse = parts
        branches = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
        return n.If(self._pos(meta), branches, orelse)

    def repeat_stmt(self, meta, var, start, stop, body):
        return n.Repeat(self._pos(meta), str(var), start, stop, body)

    def path(self, meta, *parts):
        return n.InstancePath(self._pos(meta), [str(p) if isinstance(p, Token) else p for p in parts])

    # ---- expressions ----
    def _binary(op):  # noqa: N805  (a rule factory, used in the class body)
        def rule(self, meta, left, right):
            return n.Binary(self._pos(meta), op, left, right)

        return rule

    or_ = _binary("or")
    and_ = _binary("and")
    add = _binary("add")
    sub = _binary("sub")
    mul = _binary("mul")
    div = _binary("div")
    floordiv = _binary("floordiv")
    mod = _binary("mod")
    pow = _binary("pow")

    def compare(self, meta, left, op, right):
        return n.Binary(self._pos(meta), str(op), left, right)

    def not_(self, meta, operand):
        return n.Unary(self._pos(meta), "not", operand)

    def neg(self, meta, operand):
        return n.Unary(self._pos(meta), "neg", operand)

    def getattr(self, meta, obj, name):
        return n.GetAttr(self._pos(meta), obj, str(name))

    def index(self, meta, obj, idx):
        return n.Index(self._pos(meta), obj, idx)

    def int_lit(self, meta, tok):
        return n.Num(self._tpos(tok), int(tok))

    def float_lit(self, meta, tok):
        return n.Num(self._tpos(tok), float(tok))

    def str_lit(self, meta, tok):
        return n.Str(self._tpos(tok), pyast.literal_eval(str(tok)))

    def true(self, meta, tok):
        return n.Bool(self._tpos(tok), True)

    def false(self, meta, tok):
        return n.Bool(self._tpos(tok), False)

    def name(self, meta, tok):
        return n.Name(self._tpos(tok), str(tok))

    def call(self, meta, name, *rest):
        *args, path = rest
        args = _present(args)
        for before, after in zip(args, args[1:]):
            if isinstance(before, n.Kwarg) and not isinstance(after, n.Kwarg):
                raise DSLError(
                    "a positional argument follows a keyword argument",
                    after.pos,
                    hint="put operands first, then key=value attributes",
                )
        pos_args = [a for a in args if not isinstance(a, n.Kwarg)]
        kwargs = [a for a in args if isinstance(a, n.Kwarg)]
        for i, k in enumerate(kwargs):
            if any(k.name == other.name for other in kwargs[:i]):
                raise DSLError(f"keyword argument '{k.name}' is given twice", k.pos, hint="keep one")
        return n.Call(self._pos(meta), str(name), self._tpos(name), pos_args, kwargs, path)

    def kwarg(self, meta, name, value):
        return n.Kwarg(self._tpos(name), str(name), value)

    def list_lit(self, meta, *items):
        return n.ListExpr(self._pos(meta), _present(items))
