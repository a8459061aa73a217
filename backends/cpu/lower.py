"""Lowering: an r1c function -> a Relax IRModule whose `main` takes the function's arguments, then its weights.

Symbolic IR dims (products of symbols, ir/dims.py) become int64 TIR variables, so one build serves every batch and
sequence length. Each op goes through its lowering in relax_ops.py; an op without one is a LoweringError naming
the op, its results and its loc.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax
from tvm import tirx as tir
from tvm.relax import op as R

from r1c.backends import TargetError
from r1c.backends.cpu import (
    kernels,
    relax_attention,  # noqa: F401  (registers the sparse-attention lowerings)
    relax_cache,  # noqa: F401  (registers the KV-cache and quantized-KV lowerings)
    relax_moe,  # noqa: F401  (registers the expert-fusion lowerings)
    relax_paged,  # noqa: F401  (registers the paged-cache lowerings)
)
from r1c.backends.cpu.relax_ops import LOWERINGS, tvm_dtype
from r1c.ir import dims
from r1c.ir.core import Function, Module, Value
from r1c.ir.dims import Dim
from r1c.ir.types import DType, TensorType


class LoweringError(TargetError):
    """An op the cpu target cannot lower (a TargetError: the CLI reports it in one line)."""


class Context:
    """What a lowering needs besides its operands: IR dims as TIR expressions (one int64 variable per symbol, or
    the value bound to it), which weights arrive already packed in panels (kernels.pack_panels), and which
    operands the op being lowered reads for the last time (what an in-place kernel may overwrite)."""

    def __init__(self, bound: dict[str, int], f: Function | None = None) -> None:
        self.vars: dict[str, tir.Var] = {}
        self.bound = bound
        self.packed: dict[Any, int] = {}  # weight var -> its panel width
        self.at = -1  # index of the op being lowered in the function body
        self.last_use: dict[Value, int] = {}
        self.params: set[Value] = set()
        if f is not None:
            for i, op in enumerate(f.body):
                self.last_use.update((v, i) for v in op.operands)
            self.last_use.update((v, len(f.body)) for v in f.results)
            self.params = {op.result for op in f.body if op.name == "param"}

    def dies_here(self, v: Value) -> bool:
        """v is not read after the op being lowered, nor returned, nor a weight (weights outlive the call):
        its buffer may be overwritten in place. (Function arguments may: the runner passes copies.)"""
        return self.last_use.get(v) == self.at and v not in self.params

    def __call__(self, d: Dim) -> Any:
        if isinstance(d, int):
            return d
        coeff, syms = dims._factor(d)
        out: Any = coeff
        for s, n in sorted(syms.items()):
            var = self.bound[s] if s in self.bound else self.vars.setdefault(s, tir.Var(s, "int64"))
            for _ in range(n):
                out = var if out == 1 else out * var
        return out

    def tensor(self, t: TensorType, codes: bool = False) -> relax.TensorType:
        """codes: t may hold fp8 codes, stored as TVM's float8_e4m3fn for kernels that decode them by bits
        (relax_cache.CODE_DTYPE); elsewhere fp8 is an error, TVM's own fp8 arithmetic being wrong (0.27)."""
        dt = relax_cache.code_dtype(t.dtype) if codes and t.dtype == DType.fp8e4m3 else tvm_dtype(t.dtype)
        return relax.TensorType([self(d) for d in t.shape], dt)

    def shape(self, v: Value) -> list[Any]:
        return [self(d) for d in v.type.shape]

    def panels(self, w: Any, p: int) -> Any:
        """w [..., N, K] in panels of width p, the layout of the GEMM kernels: as given when packed at load, else
        packed here."""
        if w in self.packed:
            assert self.packed[w] == p, "a weight packed at load for one kernel is read by another"
            return w
        *lead, n, k = (int(d) for d in w.ty.shape)
        np_ = -(-n // p)
        if np_ * p != n:
            w = R.concat([w, relax.const(np.zeros((*lead, np_ * p - n, k), "float32"))], axis=len(lead))
        return R.permute_dims(R.reshape(w, [*lead, np_, p, k]), [*range(len(lead) + 1), len(lead) + 2, len(lead) + 1])


PACKED_USES = {"linear": (1,), "moe_experts": (3, 4, 5)}  # operands the GEMM kernels read as panels
# ops whose lowerings read fp8 codes by bits: a function argument of fp8 codes may feed these only
CODE_READERS = ("dequantize", "attention_kvq", "mla_attention_kvq", "paged_write_q", "paged_mla_attention_kvq")


def holds_codes(f: Function, v: Value) -> bool:
    return all(op.name in CODE_READERS for op in f.body if v in op.operands)


def packable(f: Function) -> dict[Value, int]:
    """Params whose every use reads them as panels of one width: packed once at load, not at every call."""
    widths: dict[Value, set[int] | None] = {}
    for op in f.body:
        for i, v in enumerate(op.operands):
            if i in PACKED_USES.get(op.name, ()) and widths.get(v, set()) is not None:
                widths.setdefault(v, set()).add(kernels.panel_for(op.name, int(v.type.shape[-2])))
            else:
                widths[v] = None
    for v in f.results:
        widths[v] = None
    return {op.result: next(iter(w)) for op in f.body if op.name == "param" and op.result.type.dtype == DType.f32
            and (w := widths.get(op.result)) and len(w) == 1}  # fmt: skip


def lower(module: Module, entry: str, bound: dict[str, int] | None = None) -> tuple[Any, list[str], dict[str, int]]:
    """(IRModule with `main`, the weight names in the order `main` takes them after the arguments, the panel width
    of each that `main` takes packed). `bound` fixes symbolic dims to values (a static-shape build)."""
    f: Function = module.functions[entry]
    dim = Context(bound or {}, f)
    params = [op for op in f.body if op.name == "param"]
    weights = [op.attrs["name"] for op in params]
    to_pack = packable(f)
    try:
        args = [relax.Var(a.name, dim.tensor(a.type, holds_codes(f, a))) for a in f.args]
        ptypes = [dim.tensor(module.params[op.attrs["name"]].type) for op in params]
    except NotImplementedError as e:
        raise LoweringError(f"{e} (an argument or parameter of @{f.name})") from None
    wvars = []
    for i, (op, t) in enumerate(zip(params, ptypes)):
        if op.result in to_pack:
            t = relax.TensorType(kernels.pack_panels_shape([int(d) for d in t.shape], to_pack[op.result]), "float32")
        wvars.append(relax.Var(f"w{i}", t))
        if op.result in to_pack:
            dim.packed[wvars[-1]] = to_pack[op.result]
    bb = relax.BlockBuilder()
    env: dict[Any, Any] = dict(zip(f.args, args))
    env.update({op.result: w for op, w in zip(params, wvars)})
    with bb.function("main", args + wvars):
        with bb.dataflow():
            for i, op in enumerate(f.body):
                dim.at = i
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
    return bb.get(), weights, {op.attrs["name"]: to_pack[op.result] for op in params if op.result in to_pack}
