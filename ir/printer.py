"""IR text printer. The format (parsed back by `r1c.ir.parser`):

module @tiny attributes {dim=64} {
  param @w : f32[64,64] = normal(0.02)
  func @forward(%x: f32[B,64]) -> (f32[B,64]) {
    %w = param {name="w"} : f32[64,64]
    %0 = linear(%x, %w) : f32[B,64] loc("layers.0.mlp")
    %1, %2 = topk(%0) {axis=-1, k=2} : f32[B,2], int32[B,2]
    return %0
  }
}
"""

from __future__ import annotations

import math

from r1c.ir.core import Attr, DimList, Function, Module, Op, Param
from r1c.ir.types import DType


def format_attr(v: Attr) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return format_string(v)
    if isinstance(v, DType):
        return v.value
    if isinstance(v, DimList):
        return "[" + ",".join(str(d) for d in v) + "]"
    if isinstance(v, tuple):
        return "[" + ",".join(format_attr(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute {v!r}")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def format_string(s: str) -> str:
    """A double-quoted literal the parser reads back with ast.literal_eval; control characters are escaped
    because the IR grammar's strings cannot span lines."""
    out = (_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in s)
    return '"' + "".join(out) + '"'


def format_attrs(attrs: dict[str, Attr]) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr(attrs[k])}" for k in sorted(attrs)) + "}"


def print_op(op: Op) -> str:
    lhs = ", ".join(str(r) for r in op.results)
    args = ", ".join(str(o) for o in op.operands)
    types = ", ".join(str(r.type) for r in op.results)
    loc = f" loc({format_string(op.loc)})" if op.loc else ""
    return f"{lhs} = {op.name}({args}){format_attrs(op.attrs)} : {types}{loc}"


def print_param(p: Param) -> str:
    return f"param @{_sym(p.name)} : {p.type} = {p.init}"


def print_function(f: Function, indent: str = "") -> str:
    args = ", ".join(f"{a}: {a.type}" for a in f.args)
    rets = ", ".join(str(r.type) for r in f.results)
    lines = [f"{indent}func @{f.name}({args}) -> ({rets}) {{"]
    lines += [f"{indent}  {print_op(op)}" for op in f.body]
    lines.append(f"{indent}  return {', '.join(str(r) for r in f.results)}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_module(m: Module) -> str:
    attrs = f" attributes{format_attrs(m.attrs)}" if m.attrs else ""
    lines = [f"module @{m.name}{attrs} {{"]
    lines += [f"  {print_param(p)}" for p in m.params.values()]
    lines += [print_function(f, "  ") for f in m.functions.values()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _sym(name: str) -> str:
    """Parameter names like model.layers.0.mlp.gate.weight print bare; anything else is quoted."""
    import re

    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name) else format_attr(name)
