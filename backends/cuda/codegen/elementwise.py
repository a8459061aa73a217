"""Fused elementwise kernels: a group of elementwise IR ops of one output shape becomes ONE generated Triton kernel.

Each op has an expression template whose meaning matches its numpy reference. Values are computed in float32 (floats),
int32 (integers) or int1 (bools) and rounded to their storage dtype only when stored. Operands are strided views
broadcast to the output shape (a stride of 0 on broadcast axes), so the same kernel also copies, broadcasts and
transposes: `copy_source(rank)` is the identity group that materializes a view.

A program covers a [ROWS, BLOCK] tile of the output seen as [rows, last dim]: the leading coordinates are unravelled
once per row (not per element) and the last one is a contiguous range, so operands with a unit last stride load
with wide vector accesses (Triton specializes stride 1), which a flat index with a div/mod per dim per element
cannot.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from r1c.ir.core import Op, Value
from r1c.ir.types import DType

BLOCK = 1024  # the widest tile along the last dim


def kind(dtype: DType) -> str:
    """f: float (computed in float32), b: bool (int1), i: integer (int32)."""
    return "f" if dtype.is_float else "b" if dtype == DType.bool else "i"


def _int_div(a: str, b: str) -> str:
    # numpy floor-divides integers; Triton's `//` truncates toward zero: step down when the signs differ.
    return f"tl.where((({a} % {b}) != 0) & (({a} < 0) != ({b} < 0)), {a} // {b} - 1, {a} // {b})"


def _cast(a: list[str], attrs: dict[str, Any]) -> str:
    k = kind(attrs["dtype"])
    return f"({a[0]}).to(tl.float32)" if k == "f" else f"({a[0]}).to(tl.int32)" if k == "i" else f"({a[0]} != 0)"


Expr = Callable[[list[str], dict[str, Any], list[str]], str]  # (operand names, attrs, operand kinds) -> expression

EXPRS: dict[str, Expr] = {
    "neg": lambda a, at, k: f"-{a[0]}",
    "exp": lambda a, at, k: f"tl.exp({a[0]})",
    "log": lambda a, at, k: f"tl.log({a[0]})",
    "sqrt": lambda a, at, k: f"tl.sqrt_rn({a[0]})",
    "rsqrt": lambda a, at, k: f"1.0 / tl.sqrt_rn({a[0]})",
    "reciprocal": lambda a, at, k: f"1.0 / {a[0]}",
    "abs": lambda a, at, k: f"tl.abs({a[0]})",
    "square": lambda a, at, k: f"{a[0]} * {a[0]}",
    "sigmoid": lambda a, at, k: f"1.0 / (1.0 + tl.exp(-{a[0]}))",
    "silu": lambda a, at, k: f"{a[0]} / (1.0 + tl.exp(-{a[0]}))",
    "relu": lambda a, at, k: f"tl.maximum({a[0]}, 0)",
    "sin": lambda a, at, k: f"tl.sin({a[0]})",
    "cos": lambda a, at, k: f"tl.cos({a[0]})",
    "add": lambda a, at, k: f"{a[0]} + {a[1]}",
    "sub": lambda a, at, k: f"{a[0]} - {a[1]}",
    "mul": lambda a, at, k: f"{a[0]} * {a[1]}",
    "div": lambda a, at, k: f"{a[0]} / {a[1]}" if k[0] == "f" else _int_div(a[0], a[1]),
    "maximum": lambda a, at, k: f"tl.maximum({a[0]}, {a[1]})",
    "minimum": lambda a, at, k: f"tl.minimum({a[0]}, {a[1]})",
    "eq": lambda a, at, k: f"{a[0]} == {a[1]}",
    "ne": lambda a, at, k: f"{a[0]} != {a[1]}",
    "lt": lambda a, at, k: f"{a[0]} < {a[1]}",
    "le": lambda a, at, k: f"{a[0]} <= {a[1]}",
    "gt": lambda a, at, k: f"{a[0]} > {a[1]}",
    "ge": lambda a, at, k: f"{a[0]} >= {a[1]}",
    "logical_and": lambda a, at, k: f"{a[0]} & {a[1]}",
    "logical_or": lambda a, at, k: f"{a[0]} | {a[1]}",
    "logical_not": lambda a, at, k: f"{a[0]} == 0",
    "where": lambda a, at, k: f"tl.where({a[0]}, {a[1]}, {a[2]})",
    "swiglu": lambda a, at, k: f"{a[0]} / (1.0 + tl.exp(-{a[0]})) * {a[1]}",
    "cast": lambda a, at, k: _cast(a, at),
}
# Ops that read the element's coordinates (i0, i1, ...): only the standalone kernel has them, not a GEMM epilogue.
INDEXED = ("iota", "one_hot")
OPS = frozenset(EXPRS) | frozenset(INDEXED)


def load_expr(ptr: str, off: str, k: str, mask: str) -> str:
    x = f"tl.load({ptr} + {off}, mask={mask}, other=0)"
    return f"{x}.to(tl.float32)" if k == "f" else f"{x}.to(tl.int32)" if k == "i" else f"({x} != 0)"


def const_expr(name: str, k: str, shape: str) -> str:
    """A splat constant as a block: a bare scalar argument may arrive as a Python number (Triton specializes 1)."""
    block = f"({name} + tl.zeros({shape}, {'tl.float32' if k == 'f' else 'tl.int32'}))"
    return f"({block} != 0)" if k == "b" else block


def emit_ops(ops: list[Op], names: dict[Any, str], rank: int, indent: str = "    ") -> list[str]:
    """One line per op (`names` maps each operand to a variable; results get v0, v1, ... added to it)."""
    lines = []
    for i, op in enumerate(ops):
        res = op.result
        var = f"v{i}"
        # one_hot reads its indices with a trailing unit axis (the class axis it compares against)
        args = (
            []
            if op.name == "iota"
            else [names[("unsqueezed", v)] if op.name == "one_hot" else names[v] for v in op.operands]
        )
        if op.name == "iota":
            expr = f"i{op.attrs['axis'] % rank} + 0 * offs"  # `+ 0 * offs` gives the block shape
        elif op.name == "one_hot":
            hit = f"{args[0]} == i{rank - 1}"
            expr = f"tl.where({hit}, 1.0, 0.0)" if op.attrs["dtype"].is_float else f"({hit}).to(tl.int32)"
        else:
            expr = EXPRS[op.name](args, op.attrs, [kind(v.type.dtype) for v in op.operands])
        lines.append(f"{indent}{var} = {expr}")
        names[res] = var
    return lines


def unravel(rank: int, indent: str = "    ") -> list[str]:
    """Coordinates i0..i{rank-1} of the flat output index `offs` (row-major over D0..D{rank-1})."""
    lines = [f"{indent}r = offs"]
    for d in reversed(range(1, rank)):
        lines += [f"{indent}i{d} = r % D{d}", f"{indent}r = r // D{d}"]
    lines.append(f"{indent}i0 = r")
    return lines


def tile_index(rank: int, indent: str = "    ") -> list[str]:
    """`offs` (flat output index), `mask` and coordinates i0..i{rank-1} of a program's [ROWS, BLOCK] tile: rows
    [ROWS, 1] over the leading dims (R of them), the last coordinate [1, BLOCK] along D{rank-1}."""
    last = rank - 1
    lines = [
        f"{indent}rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]",
        f"{indent}i{last} = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]",
        f"{indent}if BIG:  # element offsets past 2^31: 64-bit coordinates (int32 products would wrap)",
        f"{indent}    rows = rows.to(tl.int64)",
        f"{indent}    i{last} = i{last}.to(tl.int64)",
        f"{indent}mask = (rows < R) & (i{last} < D{last})",
        f"{indent}offs = rows * D{last} + i{last}",
        f"{indent}r = rows",
    ]
    for d in reversed(range(0, last)):
        lines += [f"{indent}i{d} = r % D{d}", f"{indent}r = r // D{d}"] if d else [f"{indent}i0 = r"]
    return lines


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def tile_grid(shape: tuple[int, ...], tensors: list[Any]) -> tuple[tuple[int, int], dict[str, int], int]:
    """(grid, constexprs, rows R) of a tile-form launch over `shape` (rank >= 1) reading and writing the strided
    `tensors`: BLOCK covers the last dim (up to 1024), ROWS as many rows as make ~2048 elements a program, BIG when
    an element offset of the launch needs 64 bits."""
    last = shape[-1]
    rows = math.prod(shape[:-1])
    block = min(BLOCK, pow2(last))
    nrows = min(max(1, 2048 // block), pow2(rows))
    big = max([math.prod(shape)] + [span(t) for t in tensors]) >= 1 << 31
    return (-(-rows // nrows), -(-last // block)), {"ROWS": nrows, "BLOCK": block, "BIG": big}, rows


def span(t: Any) -> int:
    """The largest element offset a strided tensor's view reaches from its first element."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def offset(strides: str, rank: int) -> str:
    return " + ".join(f"i{d} * {strides}{d}" for d in range(rank))


def named(source: str, name: str) -> str:
    """Give a source's `kernel` a readable name (what profilers show: r1c_gemm_linear_add, not `kernel`); the
    launchers still call it `kernel`."""
    name = "r1c_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60]
    return source.replace("\ndef kernel(", f"\ndef {name}(", 1) + f"\n\nkernel = {name}\n"


def header(title: str, uses: list[str]) -> str:
    body = "\n".join(f"#   {u}" for u in uses)
    return f'"""Generated by r1c (cuda target): {title}."""\n# Implements these IR ops (op @ loc):\n{body}\n'


def source(
    title: str,
    uses: list[str],
    ops: list[Op],
    inputs: list[tuple[Value, bool]],
    consts: list[Value],
    outputs: list[Value],
    rank: int,
) -> str:
    """The kernel of a group: `inputs` (value, unsqueezed for one_hot) are loaded, `consts` (splat constants) arrive
    as scalars, `outputs` are stored."""
    rank = max(rank, 1)  # a scalar result is computed as one element
    names: dict[Any, str] = {}
    params = [f"X{j}" for j in range(len(inputs))] + [f"O{j}" for j in range(len(outputs))]
    params += [f"C{j}" for j in range(len(consts))] + ["R"] + [f"D{d}" for d in range(rank)]
    params += [f"S{j}_{d}" for j in range(len(inputs)) for d in range(rank)]
    params += [f"T{j}_{d}" for j in range(len(outputs)) for d in range(rank)]
    body = tile_index(rank)
    for j, (v, unsqueezed) in enumerate(inputs):
        body.append(f"    x{j} = {load_expr(f'X{j}', offset(f'S{j}_', rank), kind(v.type.dtype), 'mask')}")
        names[("unsqueezed", v) if unsqueezed else v] = f"x{j}"
    for j, v in enumerate(consts):
        names[v] = const_expr(f"C{j}", kind(v.type.dtype), "(ROWS, BLOCK)")
    body += emit_ops(ops, names, rank)
    for j, v in enumerate(outputs):
        body.append(f"    tl.store(O{j} + {offset(f'T{j}_', rank)}, ({names[v]}).to(O{j}.dtype.element_ty), mask=mask)")
    sig = ", ".join(params)
    src = (
        header(title, uses)
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({sig}, ROWS: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):\n"
        + "\n".join(body)
        + "\n"
    )
    return named(src, "ew_" + "_".join(o.name for o in ops) if ops else "fill")


def copy_source(rank: int) -> str:
    """Materialize a strided view of rank `rank` into a (possibly strided) output: the identity, without a float32
    round trip, so integers and bools copy exactly."""
    params = ["X0", "O0", "R"] + [f"D{d}" for d in range(rank)]
    params += [f"S0_{d}" for d in range(rank)] + [f"T0_{d}" for d in range(rank)]
    body = tile_index(rank)
    body.append(f"    x = tl.load(X0 + {offset('S0_', rank)}, mask=mask)")
    body.append(f"    tl.store(O0 + {offset('T0_', rank)}, x, mask=mask)")
    src = (
        header(f"strided copy of rank {rank}", ["views that torch cannot express without a copy (reshape, concat)"])
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({', '.join(params)}, ROWS: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):\n"
        + "\n".join(body)
        + "\n"
    )
    return named(src, f"copy_r{rank}")


def launch(
    module: Any, inputs: list[Any], consts: list[float | int], outputs: list[Any], shape: tuple[int, ...]
) -> None:
    """Run a group kernel; `inputs` are already broadcast (as views) to `shape`, `outputs` have `shape`."""
    if not shape:
        shape = (1,)
        inputs, outputs = [t.reshape(1) for t in inputs], [t.reshape(1) for t in outputs]
    if math.prod(shape) == 0:
        return
    strides = [s for t in inputs for s in t.stride()] + [s for t in outputs for s in t.stride()]
    grid, blocks, rows = tile_grid(shape, inputs + outputs)
    module.kernel[grid](*inputs, *outputs, *consts, rows, *shape, *strides, **blocks)
