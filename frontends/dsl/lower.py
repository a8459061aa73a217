"""Syntax tree -> IR through `r1c.build`: evaluates constants, inlines blocks, and emits ops at their source
locations."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from r1c.build import BuildError, FunctionBuilder, ModuleBuilder
from r1c.frontends.dsl import nodes as n
from r1c.frontends.dsl.consts import (
    BUILTINS,
    DTYPE_NAMES,
    NAMED_CONSTANTS,
    ConstError,
    Sym,
    binary,
    describe,
    dim_value,
    is_dim,
    is_number,
    unary,
)
from r1c.frontends.dsl.errors import DSLError, Pos
from r1c.frontends.dsl.program import Program, did_you_mean
from r1c.ir import registry
from r1c.ir.core import Value
from r1c.ir.dims import DimError
from r1c.ir.registry import REQUIRED, OpDef, OpError
from r1c.ir.types import DType, TensorType, tensor

# Readable names for reductions over one axis: sum(x, axis=-1) = reduce_sum(x, axes=[-1]).
ALIASES = {"sum": "reduce_sum", "mean": "reduce_mean", "amax": "reduce_max", "amin": "reduce_min"}
_TENSOR_BINARY = {
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "div": "div",
    "pow": "pow",
    "==": "eq",
    "!=": "ne",
    "<": "lt",
    "<=": "le",
    ">": "gt",
    ">=": "ge",
    "and": "logical_and",
    "or": "logical_or",
}
_INITS = {"zeros": 0, "ones": 0, "normal": 1, "uniform": 2, "constant": 1}
_KINDS = {"int", "float", "bool", "str", "dtype", "dim", "tensor"}


def reserved_names() -> set[str]:
    return set(registry.all_ops()) | set(ALIASES) | set(BUILTINS)


@dataclass
class Frame:
    """The variables of one func or block invocation; `if`/`repeat` bodies share their enclosing frame."""

    vars: dict[str, Any]
    block: n.Callable | None = None
    path: str = ""
    params: dict[str, Pos] = field(default_factory=dict)


def signature(name: str, opdef: OpDef) -> str:
    attrs = [f"{k}=<{s.kind}>" if s.default is REQUIRED else f"{k}={s.default!r}" for k, s in opdef.attrs.items()]
    return f"{name}({', '.join(list(opdef.operands) + attrs)}): {opdef.doc}"


def _fmt_number(v: int | float) -> str:
    return repr(float(v))


class Lowerer:
    def __init__(self, prog: Program, config: dict[str, Any], mb: ModuleBuilder | None) -> None:
        self.prog = prog
        self.config = config
        self.mb = mb
        self.fb: FunctionBuilder | None = None
        self.stack: list[str] = []  # blocks being inlined, for the recursion check
        self.ops = registry.all_ops()

    # ---------------- entry functions ----------------

    def lower_func(self, func: n.Callable) -> None:
        assert self.mb is not None
        frame = Frame({})
        args: dict[str, TensorType] = {}
        for a in func.args:
            if a.type is None or a.type.dims is None or a.type.dtype is None:
                raise DSLError(
                    f"func argument '{a.name}' needs a tensor type",
                    a.pos,
                    hint=f"write `{a.name}: bf16[B, S, 64]` (dtype and dims)",
                )
            if a.default is not None:
                raise DSLError("func arguments take no default", a.default.pos, hint="remove `= ...`")
            if a.name in args:
                raise DSLError(f"argument '{a.name}' is declared twice", a.pos, hint="rename one")
            for d in a.type.dims:
                self._declare_symbols(d, frame)
            args[a.name] = tensor(
                self.dtype_of(a.type.dtype, frame), [self.dim_of(d, frame, static=False) for d in a.type.dims]
            )
        try:
            self.fb = self.mb.function(func.name, **args)
        except BuildError as e:
            raise DSLError(str(e), func.name_pos, hint="rename the func") from None
        for a in self.fb.args:
            frame.vars[a.name] = a
        results = self.exec_body(func.body, frame)
        if not results:
            raise DSLError(f"func '{func.name}' returns nothing", func.name_pos, hint="end it with `return value, ...`")
        for v, b in results:
            if not isinstance(v, Value):
                raise DSLError(
                    f"func '{func.name}' must return tensors, got {describe(v)}",
                    b.pos,
                    hint="a func's results are IR values; return a tensor",
                )
        self.fb.ret(*(v for v, _ in results))
        self.fb = None

    def _declare_symbols(self, e: n.Expr, frame: Frame) -> None:
        """Capitalized names in a func's arg dims that are not config constants are symbolic dims (B, S)."""
        if isinstance(e, n.Name):
            if e.id not in self.config and e.id not in frame.vars and e.id[:1].isupper():
                frame.vars[e.id] = Sym(e.id)
        elif isinstance(e, n.Binary):
            self._declare_symbols(e.left, frame)
            self._declare_symbols(e.right, frame)

    # ---------------- statements ----------------

    def exec_body(self, body: list[n.Stmt], frame: Frame) -> list[tuple[Any, n.Expr]] | None:
        """Run statements; a `return` (even inside if/repeat) ends the body and gives its values."""
        for s in body:
            if isinstance(s, n.Assign):
                self.exec_assign(s, frame)
            elif isinstance(s, n.ParamDecl):
                self.exec_param(s, frame)
            elif isinstance(s, n.Return):
                return [(self.eval(x, frame), x) for x in s.values]
            elif isinstance(s, n.Error):
                message = self.eval(s.message, frame)
                if not isinstance(message, str):
                    raise DSLError(
                        f"error() takes a string, got {describe(message)}",
                        s.message.pos,
                        hint='error("what is wrong and what to do")',
                    )
                raise DSLError(message, s.pos, hint="raised by an error() statement of the model source")
            elif isinstance(s, n.If):
                out = self.exec_if(s, frame)
                if out is not None:
                    return out
            elif isinstance(s, n.Repeat):
                out = self.exec_repeat(s, frame)
                if out is not None:
                    return out
            else:
                raise AssertionError(f"unknown statement {s!r}")
        return None

    def exec_assign(self, s: n.Assign, frame: Frame) -> None:
        targets = s.targets
        if len(s.values) == 1:
            v = self.eval_multi(s.values[0], frame)
            values = list(v) if isinstance(v, tuple) else [v]
            if len(values) != len(targets):
                what = f"gives {len(values)} value(s)"
                raise DSLError(
                    f"cannot assign: the right side {what} but there are {len(targets)} name(s)",
                    s.values[0].pos,
                    hint=f"write {len(values)} name(s) on the left, separated by commas",
                )
        else:
            if len(s.values) != len(targets):
                raise DSLError(
                    f"{len(targets)} name(s) but {len(s.values)} value(s)", s.pos, hint="give one value per name"
                )
            values = [self.eval(x, frame) for x in s.values]
        for (name, pos), v in zip(targets, values):
            if name in frame.params:
                raise DSLError(
                    f"'{name}' is a param of this block and cannot be reassigned",
                    pos,
                    hint="pick another variable name",
                )
            frame.vars[name] = v

    def exec_if(self, s: n.If, frame: Frame):
        for cond, body in s.branches:
            c = self.eval(cond, frame)
            if isinstance(c, Value):
                raise DSLError(
                    "an `if` condition must be a compile-time constant, not a tensor",
                    cond.pos,
                    hint="`if` picks code at compile time; select between tensors with where(cond, a, b)",
                )
            if not isinstance(c, bool):
                raise DSLError(
                    f"an `if` condition must be a bool, got {describe(c)}",
                    cond.pos,
                    hint="compare explicitly, e.g. `n > 0`",
                )
            if c:
                return self.exec_body(body, frame)
        return self.exec_body(s.orelse, frame) if s.orelse is not None else None

    def exec_repeat(self, s: n.Repeat, frame: Frame):
        bounds = []
        for e in (s.start, s.stop):
            v = self.eval(e, frame)
            if not (isinstance(v, int) and not isinstance(v, bool)):
                raise DSLError(
                    f"`repeat` bounds must be ints, got {describe(v)}",
                    e.pos,
                    hint="use int(...) or an int config constant",
                )
            bounds.append(v)
        for i in range(bounds[0], bounds[1]):
            frame.vars[s.var] = i
            out = self.exec_body(s.body, frame)
            if out is not None:
                return out
        return None

    def exec_param(self, s: n.ParamDecl, frame: Frame) -> None:
        assert self.fb is not None
        t = s.type
        if t.dims is None or t.dtype is None:
            raise DSLError(
                f"param '{s.name}' needs a tensor type", t.pos, hint=f"write `param {s.name}: bf16[rows, cols] = ...`"
            )
        if s.name in frame.vars and s.name not in frame.params:
            raise DSLError(
                f"param '{s.name}' has the name of a variable of this {'block' if frame.block else 'func'}",
                s.name_pos,
                hint="rename the param or the variable",
            )
        if s.name in frame.params:
            raise DSLError(
                f"param '{s.name}' is declared twice in this {'block' if frame.block else 'func'}",
                s.name_pos,
                hint=f"the first declaration is at {frame.params[s.name]}",
            )
        dtype = self.dtype_of(t.dtype, frame)
        shape = [self.dim_of(d, frame, static=True) for d in t.dims]
        init = self.init_string(s.init, frame)
        full = f"{frame.path}.{s.name}" if frame.path else s.name
        try:
            v = self.fb.param(full, tensor(dtype, shape), init=init)
        except BuildError as e:
            raise DSLError(str(e), s.pos, hint="a param path names one weight; declare it with one type") from None
        frame.params[s.name] = s.name_pos
        frame.vars[s.name] = v

    def init_string(self, init: n.Init, frame: Frame) -> str:
        if init.kind not in _INITS:
            hint = (
                did_you_mean(init.kind, _INITS)
                or "initializers: zeros, ones, normal(std), uniform(lo, hi), constant(v)"
            )
            raise DSLError(f"unknown initializer '{init.kind}'", init.pos, hint=hint)
        want = _INITS[init.kind]
        if len(init.args) != want:
            raise DSLError(
                f"{init.kind} takes {want} argument(s), got {len(init.args)}",
                init.pos,
                hint="initializers: zeros, ones, normal(std), uniform(lo, hi), constant(v)",
            )
        vals = []
        for a in init.args:
            v = self.eval(a, frame)
            if not is_number(v) or not math.isfinite(v):
                raise DSLError(
                    f"{init.kind}() needs finite numbers, got {describe(v)}",
                    a.pos,
                    hint="use a number or a config constant",
                )
            vals.append(_fmt_number(v))
        return init.kind + (f"({', '.join(vals)})" if vals else "")

    def dtype_of(self, e: n.Name, frame: Frame) -> DType:
        if e.id in frame.vars or e.id in self.config:
            v = frame.vars[e.id] if e.id in frame.vars else self.config[e.id]
            if isinstance(v, DType):
                return v
            raise DSLError(f"'{e.id}' is {describe(v)}, not a dtype", e.pos, hint="dtypes: " + ", ".join(DTYPE_NAMES))
        if e.id in DTYPE_NAMES:
            return DTYPE_NAMES[e.id]
        raise DSLError(
            f"unknown dtype '{e.id}'",
            e.pos,
            hint=(did_you_mean(e.id, DTYPE_NAMES) + " " if did_you_mean(e.id, DTYPE_NAMES) else "")
            + "dtypes: "
            + ", ".join(DTYPE_NAMES),
        )

    def dim_of(self, e: n.Expr, frame: Frame, static: bool) -> int | str:
        v = self.eval(e, frame)
        if not is_dim(v) or (isinstance(v, int) and v < 0):
            raise DSLError(
                f"a dimension must be a non-negative int or a symbol, got {describe(v)}",
                e.pos,
                hint="dims are ints, config constants, symbols (B, S) or products (B*S)",
            )
        if static and isinstance(v, Sym):
            raise DSLError(
                f"param shapes must be static, but '{v.dim}' is symbolic",
                e.pos,
                hint="size weights with config constants or ints",
            )
        return v.dim if isinstance(v, Sym) else v

    # ---------------- expressions ----------------

    def eval_multi(self, e: n.Expr, frame: Frame) -> Any:
        """Like eval, but a call may give several values (a tuple): `a, b = topk(x, k=2)`."""
        return self.eval_call(e, frame) if isinstance(e, n.Call) else self.eval(e, frame)

    def eval(self, e: n.Expr, frame: Frame) -> Any:
        if isinstance(e, n.Num):
            return e.value
        if isinstance(e, (n.Str, n.Bool)):
            return e.value
        if isinstance(e, n.Name):
            return self.lookup(e, frame)
        if isinstance(e, n.Binary):
            return self.eval_binary(e, frame)
        if isinstance(e, n.Unary):
            return self.eval_unary(e, frame)
        if isinstance(e, n.Call):
            v = self.eval_call(e, frame)
            if isinstance(v, tuple):
                raise DSLError(
                    f"'{e.func}' gives {len(v)} values, expected one here",
                    e.pos,
                    hint="assign them to names first: `a, b = ...`",
                )
            return v
        if isinstance(e, n.ListExpr):
            return [self.eval(x, frame) for x in e.items]
        if isinstance(e, n.GetAttr):
            return self.eval_getattr(e, frame)
        if isinstance(e, n.Index):
            return self.eval_index(e, frame)
        raise AssertionError(f"unknown expression {e!r}")

    def lookup(self, e: n.Name, frame: Frame) -> Any:
        if e.id in frame.vars:
            return frame.vars[e.id]
        if e.id in self.config:
            return self.config[e.id]
        if e.id in DTYPE_NAMES:
            return DTYPE_NAMES[e.id]
        if e.id in NAMED_CONSTANTS:
            return NAMED_CONSTANTS[e.id]
        close = did_you_mean(e.id, list(frame.vars) + list(self.config) + list(DTYPE_NAMES))
        if self.fb is None:
            later = any(c.name == e.id for c in self.prog.main.config)
            raise DSLError(
                f"unknown name '{e.id}' in config",
                e.pos,
                hint="a config constant may use only constants defined above it"
                if later
                else close or "define it earlier in the config",
            )
        if frame.block is not None:
            raise DSLError(
                f"block '{frame.block.name}' reads '{e.id}', which is not a local name, an argument or a config "
                f"constant of this model",
                e.pos,
                hint=close or f"if it is a config constant, add `{e.id} = ...` to the model's config",
            )
        raise DSLError(f"unknown name '{e.id}'", e.pos, hint=close or "assign it before use")

    def eval_getattr(self, e: n.GetAttr, frame: Frame) -> Any:
        obj = self.eval(e.obj, frame)
        if isinstance(obj, Value):
            if e.name == "dtype":
                return obj.type.dtype
            if e.name == "shape":
                return [dim_value(d) for d in obj.type.shape]
            if e.name == "rank":
                return obj.type.rank
        raise DSLError(f"{describe(obj)} has no field '{e.name}'", e.pos, hint="tensors have .dtype, .shape and .rank")

    def eval_index(self, e: n.Index, frame: Frame) -> Any:
        obj = self.eval(e.obj, frame)
        idx = self.eval(e.index, frame)
        if isinstance(obj, Value):
            raise DSLError(
                "tensor indexing is not supported",
                e.pos,
                hint="use slice(x, axis=..., start=..., stop=...) or take(x, idx, axis=...)",
            )
        if not isinstance(obj, list):
            raise DSLError(f"cannot index {describe(obj)}", e.pos, hint="only lists (e.g. x.shape) take [i]")
        if not (isinstance(idx, int) and not isinstance(idx, bool)) or not -len(obj) <= idx < len(obj):
            raise DSLError(
                f"index {describe(idx)} is out of range for a list of {len(obj)}",
                e.index.pos,
                hint=f"use an int in {-len(obj)}..{len(obj) - 1}",
            )
        return obj[idx]

    def eval_unary(self, e: n.Unary, frame: Frame) -> Any:
        v = self.eval(e.operand, frame)
        if isinstance(v, Value):
            return self.emit("neg" if e.op == "neg" else "logical_not", [v], {}, e.pos)
        try:
            return unary(e.op, v)
        except ConstError as err:
            raise DSLError(err.message, e.pos, hint=err.hint or "operators on constants fold at compile time") from None

    def eval_binary(self, e: n.Binary, frame: Frame) -> Any:
        a = self.eval(e.left, frame)
        if isinstance(a, bool) and (e.op, a) in (("and", False), ("or", True)):
            return a  # short-circuit, as in Python: `has_x and x > 0` need not define x
        b = self.eval(e.right, frame)
        if isinstance(a, Value) or isinstance(b, Value):
            if e.op not in _TENSOR_BINARY:
                raise DSLError(
                    f"operator '{e.op}' is not defined on tensors",
                    e.pos,
                    hint="tensors take + - * / ** and comparisons",
                )
            operands = self.operands([a, b], [e.left, e.right], _TENSOR_BINARY[e.op])
            return self.emit(_TENSOR_BINARY[e.op], operands, {}, e.pos)
        try:
            return binary(e.op, a, b)
        except ConstError as err:
            raise DSLError(err.message, e.pos, hint=err.hint or "operators on constants fold at compile time") from None

    # ---------------- calls ----------------

    def eval_call(self, e: n.Call, frame: Frame) -> Any:
        if e.func in self.prog.blocks:
            return self.call_block(self.prog.blocks[e.func], e, frame)
        if e.func in self.prog.funcs:
            raise DSLError(
                f"'{e.func}' is a func; only blocks and ops can be called",
                e.func_pos,
                hint=f"make '{e.func}' a block to reuse it",
            )
        known = e.func in BUILTINS or e.func in ALIASES or e.func in self.ops
        if not known:
            close = did_you_mean(e.func, list(self.prog.blocks) + list(self.ops) + list(ALIASES) + list(BUILTINS))
            raise DSLError(
                f"unknown op or block '{e.func}'",
                e.func_pos,
                hint=close or "ops are listed by `r1c passes`; blocks come from this file or its imports",
            )
        args = [self.eval(a, frame) for a in e.args]
        kwargs = {k.name: (self.eval(k.value, frame), k) for k in e.kwargs}
        if e.func in BUILTINS and not any(isinstance(a, Value) for a in args):
            if kwargs:
                k = next(iter(kwargs.values()))[1]
                raise DSLError(f"{e.func}() takes no keyword arguments", k.pos, hint="pass numbers positionally")
            try:
                return BUILTINS[e.func](*args)
            except ConstError as err:
                raise DSLError(err.message, e.pos, hint=err.hint or f"{e.func}() works on numbers") from None
        if self.fb is None:
            raise DSLError(
                f"'{e.func}' is an op; config constants must be compile-time values",
                e.func_pos,
                hint="config expressions use numbers, constants and min, max, int, float, sqrt, log, exp, abs, "
                "yarn_mscale",
            )
        name = {"min": "minimum", "max": "maximum"}.get(e.func, e.func)
        if name not in self.ops and name not in ALIASES:
            raise DSLError(
                f"{e.func}() works on constants, not tensors",
                e.func_pos,
                hint="convert tensors with cast(x, dtype=...)",
            )
        if name in ALIASES:
            name = ALIASES[name]
            if "axis" not in kwargs and "axes" not in kwargs:
                raise DSLError(
                    f"{e.func} needs axis=...", e.pos, hint=f"e.g. {e.func}(x, axis=-1) or {e.func}(x, axis=[1, 2])"
                )
            if "axis" in kwargs:
                axis, kw = kwargs.pop("axis")
                kwargs["axes"] = (axis if isinstance(axis, list) else [axis], kw)
        opdef = self.ops[name]
        for key, (_, kw) in kwargs.items():
            if key not in opdef.attrs:
                accepted = ", ".join(opdef.attrs) or "none"
                close = did_you_mean(key, opdef.attrs)
                raise DSLError(
                    f"{e.func} has no attribute '{key}'",
                    kw.pos,
                    hint=f"{close + ' ' if close else ''}{e.func} takes: {accepted}",
                )
        operands = self.operands(args, e.args, name)
        attrs = {k: self.attr_value(v, kw, e.func) for k, (v, kw) in kwargs.items()}
        rel = self.render_path(e.path, frame) if e.path is not None else None
        with self.fb.scope(rel) if rel else nullcontext():
            return self.emit(name, operands, attrs, e.pos)

    def operands(self, args: list[Any], exprs: list[n.Expr], op: str) -> list[Value]:
        """Numbers next to tensors become scalar constants of the first non-bool tensor operand's dtype."""
        tensors = [a for a in args if isinstance(a, Value)]
        like = next((t for t in tensors if t.type.dtype != DType.bool), tensors[0] if tensors else None)
        out = []
        for a, x in zip(args, exprs):
            if isinstance(a, Value):
                out.append(a)
            elif is_number(a):
                if like is None:
                    raise DSLError(
                        f"cannot tell the dtype of the number {a} in {op}: no tensor operand gives one",
                        x.pos,
                        hint="write constant(value=..., dtype=f32) explicitly",
                    )
                out.append(self.emit("constant", [], {"value": float(a), "dtype": like.type.dtype, "shape": []}, x.pos))
            else:
                raise DSLError(
                    f"operand of {op} must be a tensor or a number, got {describe(a)}",
                    x.pos,
                    hint="attributes are passed by name: key=value",
                )
        return out

    def attr_value(self, v: Any, kw: n.Kwarg, op: str) -> Any:
        if isinstance(v, Value):
            raise DSLError(
                f"attribute '{kw.name}' of {op} must be a compile-time constant, got {describe(v)}",
                kw.value.pos,
                hint="tensors are passed positionally as operands",
            )
        if isinstance(v, Sym):
            return v.dim
        if isinstance(v, list):
            return [self.attr_value(x, kw, op) for x in v]
        return v

    def emit(self, op: str, operands: list[Value], attrs: dict[str, Any], pos: Pos) -> Any:
        assert self.fb is not None
        try:
            return self.fb.op(op, *operands, **attrs)
        except (BuildError, OpError, DimError) as err:
            raise DSLError(str(err), pos, hint=signature(op, self.ops[op])) from None

    def render_path(self, path: n.InstancePath, frame: Frame) -> str:
        parts = []
        for p in path.parts:
            if isinstance(p, str):
                parts.append(p)
                continue
            v = self.eval(p, frame)
            if not (isinstance(v, int) and not isinstance(v, bool)):
                raise DSLError(f"a path index must be an int, got {describe(v)}", p.pos, hint="e.g. model.layers[i]")
            parts.append(str(v))
        return ".".join(parts)

    def call_block(self, blk: n.Callable, e: n.Call, frame: Frame) -> Any:
        if blk.name in self.stack:
            chain = " -> ".join(self.stack[self.stack.index(blk.name) :] + [blk.name])
            raise DSLError(
                f"block '{blk.name}' calls itself ({chain})",
                e.func_pos,
                hint="blocks are inlined, so recursion cannot end; use `repeat` for repetition",
            )
        if e.path is None and blk.has_params:
            raise DSLError(
                f"block '{blk.name}' declares params, so its call needs `as PATH`",
                e.pos,
                hint=f"e.g. `y = {blk.name}(...) as model.layers[i].{blk.name}`; the path names its weights",
            )
        values = self.bind_args(blk, e, frame)
        rel = self.render_path(e.path, frame) if e.path is not None else ""
        inner = Frame({}, blk, f"{frame.path}.{rel}" if frame.path and rel else frame.path or rel)
        for decl, (v, x) in zip(blk.args, values):
            self.bind_arg(blk, decl, v, x, inner)
        self.stack.append(blk.name)
        assert self.fb is not None
        try:
            with self.fb.scope(rel) if rel else nullcontext():
                results = self.exec_body(blk.body, inner)
        except DSLError as err:
            err.notes.append(f"in block '{blk.name}' called at {e.func_pos}")
            raise
        finally:
            self.stack.pop()
        if not results:
            raise DSLError(
                f"block '{blk.name}' returns nothing",
                e.pos,
                hint=f"end block '{blk.name}' (declared at {blk.name_pos}) with `return value, ...`",
            )
        vals = tuple(v for v, _ in results)
        return vals[0] if len(vals) == 1 else vals

    def bind_args(self, blk: n.Callable, e: n.Call, frame: Frame) -> list[tuple[Any, n.Expr | None]]:
        """Match positional and keyword arguments to the block's declaration; evaluates them in the caller's frame."""
        sig = f"{blk.name}({', '.join(a.name for a in blk.args)})"
        if len(e.args) > len(blk.args):
            raise DSLError(
                f"block '{blk.name}' takes {len(blk.args)} argument(s), got {len(e.args) + len(e.kwargs)}",
                e.args[len(blk.args)].pos,
                hint=f"it is declared {sig} at {blk.name_pos}",
            )
        given: dict[str, tuple[Any, n.Expr | None]] = {}
        for decl, x in zip(blk.args, e.args):
            given[decl.name] = (self.eval(x, frame), x)
        names = [a.name for a in blk.args]
        for k in e.kwargs:
            if k.name not in names:
                close = did_you_mean(k.name, names)
                raise DSLError(
                    f"block '{blk.name}' has no argument '{k.name}'",
                    k.pos,
                    hint=f"{close + ' ' if close else ''}it is declared {sig}",
                )
            if k.name in given:
                raise DSLError(f"argument '{k.name}' is given twice", k.pos, hint=f"it is declared {sig}")
            given[k.name] = (self.eval(k.value, frame), k.value)
        out = []
        for decl in blk.args:
            if decl.name in given:
                out.append(given[decl.name])
            elif decl.default is not None:
                out.append((None, None))
            else:
                raise DSLError(f"block '{blk.name}' needs argument '{decl.name}'", e.pos, hint=f"it is declared {sig}")
        return out

    def bind_arg(self, blk: n.Callable, decl: n.ArgDecl, v: Any, x: n.Expr | None, inner: Frame) -> None:
        if x is None:
            assert decl.default is not None
            v, x = self.eval(decl.default, inner), decl.default
        spec = decl.type
        if spec is not None and spec.kind is not None:
            v = self.check_kind(blk, decl, spec, v, x)
        elif spec is not None:
            self.match_pattern(blk, decl, spec, v, x, inner)
        if isinstance(v, tuple):
            raise DSLError(f"argument '{decl.name}' gets {len(v)} values", x.pos, hint="assign them to names first")
        inner.vars[decl.name] = v

    def check_kind(self, blk: n.Callable, decl: n.ArgDecl, spec: n.TypeSpec, v: Any, x: n.Expr) -> Any:
        kind = spec.kind
        if kind not in _KINDS:
            raise DSLError(
                f"unknown argument kind '{kind}'",
                spec.pos,
                hint=(did_you_mean(kind, _KINDS) + " " if did_you_mean(kind, _KINDS) else "")
                + "kinds: "
                + ", ".join(sorted(_KINDS))
                + "; tensors take a shape pattern [B, S, D]",
            )
        ok = {
            "int": lambda: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda: is_number(v),
            "bool": lambda: isinstance(v, bool),
            "str": lambda: isinstance(v, str),
            "dtype": lambda: isinstance(v, DType),
            "dim": lambda: is_dim(v),
            "tensor": lambda: isinstance(v, Value),
        }[kind]()
        if not ok:
            raise DSLError(
                f"argument '{decl.name}' of block '{blk.name}' must be {kind}, got {describe(v)}",
                x.pos,
                hint=f"declared as `{decl.name}: {kind}` at {decl.pos}",
            )
        return float(v) if kind == "float" else v

    def match_pattern(
        self, blk: n.Callable, decl: n.ArgDecl, spec: n.TypeSpec, v: Any, x: n.Expr, inner: Frame
    ) -> None:
        """Bind the names of a shape pattern [B, S, D] to the argument's dims; check already-bound ones."""
        assert spec.dims is not None
        where = f"argument '{decl.name}' of block '{blk.name}'"
        if not isinstance(v, Value):
            raise DSLError(
                f"{where} must be a tensor, got {describe(v)}",
                x.pos,
                hint=f"declared with a shape pattern at {decl.pos}",
            )
        t = v.type
        if spec.dtype is not None:
            want = self.dtype_of(spec.dtype, inner)
            if want != t.dtype:
                raise DSLError(f"{where} must be {want}, got {t}", x.pos, hint=f"insert cast(x, dtype={want})")
        if len(spec.dims) != t.rank:
            raise DSLError(
                f"{where} must have rank {len(spec.dims)}, got {t}",
                x.pos,
                hint=f"the pattern at {decl.pos} has {len(spec.dims)} entries",
            )
        for entry, actual in zip(spec.dims, t.shape):
            if isinstance(entry, n.Name):
                if entry.id == "_":
                    continue
                if entry.id in inner.vars or entry.id in self.config:
                    expected = inner.vars.get(entry.id, self.config.get(entry.id))
                else:
                    inner.vars[entry.id] = dim_value(actual)
                    continue
            elif isinstance(entry, n.Num) and isinstance(entry.value, int):
                expected = entry.value
            else:
                raise DSLError(
                    "a shape pattern entry must be a name, an int or _", entry.pos, hint="e.g. `x: [B, S, hidden_size]`"
                )
            exp_dim = expected.dim if isinstance(expected, Sym) else expected
            if exp_dim != actual:
                label = entry.id if isinstance(entry, n.Name) else str(entry.value)
                raise DSLError(
                    f"{where} has dim {actual} where the pattern wants {label} = {exp_dim} (got {t})",
                    x.pos,
                    hint=f"pattern declared at {decl.pos}",
                )
