"""Lowering: an r1c function -> a Relax IRModule whose `main` takes the function's arguments, then its weights.

Symbolic IR dims (products of symbols, ir/dims.py) become int64 TIR variables, so one build serves every batch and
sequence length. Each op goes through its lowering in relax_ops.py; an op without one is a LoweringError naming
the op, its results and its loc.
"""

from __future__ import annotations

from typing import Any

from tvm import relax
from tvm import tirx as tir

from r1c.backends import TargetError
from r1c.backends.cpu.relax_ops import LOWERINGS, tvm_dtype
from r1c.ir import dims
from r1c.ir.core import Function, Module
from r1c.ir.dims import Dim
from r1c.ir.types import TensorType


class LoweringError(TargetError):
    """An op the cpu target cannot lower (a TargetError: the CLI reports it in one line)."""


class Dims:
    """IR dims as TIR expressions, one int64 variable per symbol."""

    def __init__(self) -> None:
        self.vars: dict[str, tir.Var] = {}

    def __call__(self, d: Dim) -> Any:
        if isinstance(d, int):
            return d
        coeff, syms = dims._factor(d)
        out: Any = coeff
        for s, n in sorted(syms.items()):
            var = self.vars.setdefault(s, tir.Var(s, "int64"))
            for _ in range(n):
                out = var if out == 1 else out * var
        return out

    def tensor(self, t: TensorType) -> relax.TensorType:
        return relax.TensorType([self(d) for d in t.shape], tvm_dtype(t.dtype))


def lower(module: Module, entry: str) -> tuple[Any, list[str]]:
    """(IRModule with `main`, the weight names in the order `main` takes them after the arguments)."""
    f: Function = module.functions[entry]
    dim = Dims()
    params = [op for op in f.body if op.name == "param"]
    weights = [op.attrs["name"] for op in params]
    args = [relax.Var(a.name, dim.tensor(a.type)) for a in f.args]
    wvars = [relax.Var(f"w{i}", dim.tensor(module.params[n].type)) for i, n in enumerate(weights)]
    bb = relax.BlockBuilder()
    env: dict[Any, Any] = dict(zip(f.args, args))
    env.update({op.result: w for op, w in zip(params, wvars)})
    with bb.function("main", args + wvars):
        with bb.dataflow():
            for op in f.body:
                if op.name == "param":
                    continue
                if op.name not in LOWERINGS:
                    raise LoweringError(
                        f"cpu target: no lowering for op '{op.name}' (defining "
                        f"{', '.join(str(r) for r in op.results)}) at loc {op.loc or '?'}"
                    )
                try:
                    outs = LOWERINGS[op.name](bb, [env[v] for v in op.operands], op, dim)
                except NotImplementedError as e:
                    raise LoweringError(f"{e} (op '{op.name}' at loc {op.loc or '?'})") from None
                for r, o in zip(op.results, outs):
                    env[r] = bb.emit(o) if not isinstance(o, relax.Var) else o
            results = [env[r] for r in f.results]
            out = bb.emit_output(relax.Tuple(results) if len(results) != 1 else results[0])
        bb.emit_func_output(out)
    return bb.get(), weights
