"""Lowering: the entry function -> a kernel plan, an ordered list of launches over named buffers.

Rules, in order: an op with a registered template launcher runs through it (and `grouped_matmul -> slice, slice ->
swiglu` through "grouped_matmul+swiglu" when that exists); `linear`/`matmul` become the GEMM template whose generated
epilogue absorbs the elementwise ops that consume only its result; maximal groups of elementwise ops of one output
shape become one generated kernel; row ops (rmsnorm, softmax, reductions, rope, embedding, topk) get their row
kernels and `gather`/`take` their index kernels; reshape/transpose/slice/broadcast_to are torch views (a generated
copy where a view cannot express them), concat copies its inputs into one buffer and slice_scatter copies its base,
then its updates into the strided slice; `param` reads the weight. Any
other op is a compile error naming it and its loc. Shapes stay symbolic here; the runtime binds them from the inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from r1c.backends import TargetError
from r1c.backends.cuda.codegen import elementwise as ew
from r1c.backends.cuda.codegen import indexing, matmul, rows
from r1c.backends.cuda.launchers import has_launcher
from r1c.ir import dims
from r1c.ir.core import Function, Module, Op, Value

DEFAULT_PIPELINE = "canonicalize,cse,expert-fusion,sparse-attention-tiling,dce"
VIEWS = frozenset({"reshape", "transpose", "slice", "broadcast_to"})
GEMMS = frozenset({"linear", "matmul"})
FUSED_MOE = "grouped_matmul+swiglu"
# template launchers that write into (and return) their first n operands: the caches and the paged pools
IN_PLACE = {"cache_write": 1, "paged_write": 1, "paged_write_q": 2}
# operands that hold the f32 scales of a quantized KV pool: they stay f32 under `dtype=` (the kernels read f32)
SCALE_OPERANDS = {"paged_write_q": 1, "paged_mla_attention_kvq": 2}
_USES = "@@uses@@"  # stands for the header's list of IR ops until every kernel sharing a source is known


class LoweringError(TargetError):
    """An op the cuda target cannot lower (a TargetError: the CLI reports it as one line, not as a crash)."""


@dataclass
class Unit:
    kind: str  # param | const | view | concat | slice_scatter | ew | gemm | row | gather | template
    ops: list[Op]
    pos: int  # index of the last member: where the launch goes
    open: bool = True  # ew/gemm: may still absorb elementwise consumers
    launcher: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _loc(op: Op) -> str:
    return f"{op.name} -> {', '.join(str(r) for r in op.results)} @ {op.loc or '?'}"


def _same_shape(a: Value, b: Value) -> bool:
    return len(a.type.shape) == len(b.type.shape) and all(
        dims.normalize(x) == dims.normalize(y) for x, y in zip(a.type.shape, b.type.shape)
    )


def _fused_moe(f: Function, i: int, users: dict[Value, list[Op]]) -> list[Op] | None:
    """grouped_matmul -> slice[0:F], slice[F:2F] on the last axis -> swiglu(gate, up), if nothing else reads them."""
    gm = f.body[i]
    if gm.name != "grouped_matmul" or not has_launcher(FUSED_MOE):
        return None
    sl = users[gm.result]
    if len(sl) != 2 or any(s.name != "slice" or s.attrs["axis"] % 2 != 1 or s.attrs["step"] != 1 for s in sl):
        return None
    width = gm.result.type.shape[1]
    if not isinstance(width, int) or width % 2:
        return None
    gate, up = sorted(sl, key=lambda s: s.attrs["start"])
    half = width // 2
    if (gate.attrs["start"], gate.attrs["stop"], up.attrs["start"], up.attrs["stop"]) != (0, half, half, width):
        return None
    act = users[gate.result]
    if (
        len(act) != 1
        or act[0].name != "swiglu"
        or users[up.result] != act
        or act[0].operands != (gate.result, up.result)
    ):
        return None
    return [gm, gate, up, act[0]]


def _units(f: Function) -> list[Unit]:
    users = f.users()
    index = {id(op): i for i, op in enumerate(f.body)}
    producer: dict[Value, Unit] = {}
    units: list[Unit] = []
    absorbed: set[int] = set()
    for i, op in enumerate(f.body):
        if id(op) in absorbed:
            continue
        unit: Unit | None = None
        fused = _fused_moe(f, i, users)
        if fused is not None:
            unit = Unit("template", fused, f.body.index(fused[-1]), launcher=FUSED_MOE)
            absorbed.update(id(o) for o in fused)
        elif op.name == "param":
            unit = Unit("param", [op], i)
        elif op.name == "constant":
            unit = Unit("const", [op], i)
        elif has_launcher(op.name):
            unit = Unit("template", [op], i, launcher=op.name)
        elif op.name in GEMMS:
            unit = Unit("gemm", [op], i)
        elif op.name in ew.OPS:
            # Every open group of this shape that feeds the op merges with it (none of their values has been read
            # outside them yet, so one launch at this op's position serves all their readers).
            cands: list[Unit] = []
            for v in op.operands:
                cand = producer.get(v)
                if (
                    cand is not None
                    and cand not in cands
                    and cand.open
                    and cand.kind in ("ew", "gemm")
                    and _same_shape(cand.ops[0].result, op.result)
                    and not (cand.kind == "gemm" and op.name in ew.INDEXED)
                ):
                    cands.append(cand)
            gemms = [c for c in cands if c.kind == "gemm"]
            cands = gemms[:1] + [c for c in cands if c.kind == "ew"]  # at most one GEMM root per group
            if not cands:
                unit = Unit("ew", [op], i)
            else:
                unit = cands[0]
                for other in cands[1:]:
                    unit.ops += other.ops
                    units.remove(other)
                    for o in other.ops:
                        for r in o.results:
                            producer[r] = unit
                unit.ops.append(op)
                unit.ops.sort(key=lambda o: index[id(o)])  # merged members in program order
                unit.pos = i
        elif op.name in VIEWS:
            unit = Unit("view", [op], i)
        elif op.name in ("concat", "slice_scatter"):
            unit = Unit(op.name, [op], i)
        elif op.name in rows.KIND_OF_OP:
            unit = Unit("row", [op], i)
        elif op.name in ("gather", "take"):
            unit = Unit("gather", [op], i)
        else:
            raise LoweringError(
                f"cuda target: no lowering for op '{op.name}' (defining {', '.join(str(r) for r in op.results)}) "
                f"at loc {op.loc or '?'}: it has no CUDA kernel template and no generated kernel"
            )
        if unit not in units:
            units.append(unit)
        for u_op in [op] if fused is None else fused:
            for v in u_op.operands:  # a value read outside its group must exist in memory: the group is complete
                if v in producer and producer[v] is not unit:
                    producer[v].open = False
            for r in u_op.results:
                producer[r] = unit
    return sorted(units, key=lambda u: u.pos)


def _outputs(unit: Unit, users: dict[Value, list[Op]], results: set[Value]) -> list[Value]:
    members = {id(o) for o in unit.ops}
    return [
        r for o in unit.ops for r in o.results if r in results or any(id(u) not in members for u in users.get(r, []))
    ]


def _split_inputs(unit: Unit, consts: set[Value]) -> tuple[list[tuple[Value, bool]], list[Value]]:
    """External operands of a fused group: loaded tensors (with one_hot's unsqueeze flag) and splat constants."""
    inside = {r for o in unit.ops for r in o.results}
    loads: list[tuple[Value, bool]] = []
    splats: list[Value] = []
    for o in unit.ops:
        if o.name == "iota":
            continue  # reads only its operand's shape
        for v in o.operands:
            if v in inside or (o is unit.ops[0] and unit.kind == "gemm"):
                continue
            if v in consts:
                if v not in splats:
                    splats.append(v)
            elif (v, o.name == "one_hot") not in loads:
                loads.append((v, o.name == "one_hot"))
    return loads, splats


def _const_value(op: Op) -> float | int:
    v = op.attrs["value"]
    return float(v) if op.result.type.dtype.is_float else int(v)


def _overwritable(
    f: Function,
    op: Op,
    users: dict[Value, list[Op]],
    producers: dict[Value, Op],
    pos: dict[int, int],
    results: set[Value],
) -> bool:
    """Whether `op` may write into its first IN_PLACE[op.name] operands: each is a function argument (the caller
    donates it) or another in-place write's result (not a view, whose base others may read), is not a result, and
    every other reader has run by the write's launch."""
    for v in op.operands[: IN_PLACE[op.name]]:
        producer = producers.get(v)
        if v in results or not (v in f.args or (producer is not None and producer.name in IN_PLACE)):
            return False
        if any(pos[id(r)] >= pos[id(op)] for r in users[v] if r is not op):
            return False
    return True


def _mark_static(steps: list[dict[str, Any]], f: Function) -> None:
    """Steps that read only weights and constants (expert fusion's weight concats, their views, constant fills) are
    `static`: the runtime computes them once when it loads the weights, not on every forward."""
    static: set[str] = set()
    shapes = {v.name: v.type.shape for v in f.values()}
    for step in steps:
        step["static"] = (
            step["kind"] in ("param", "view", "concat", "ew")
            and all(n in static for n in step["inputs"])
            and all(isinstance(d, int) for n in step["outputs"] for d in shapes[n])
        )
        if step["static"]:
            static.update(step["outputs"])


def lower(module: Module, entry: str) -> dict[str, Any]:
    """The plan of `entry` as JSON-able data, with the generated sources under "kernels" (file name -> source)."""
    f = module.functions[entry]
    index = {id(op): i for i, op in enumerate(f.body)}
    users = f.users()
    results = set(f.results)
    units = _units(f)
    pos = {id(o): u.pos for u in units for o in u.ops}  # where each op's launch runs
    producers = f.producers()
    consts = {u.ops[0].result for u in units if u.kind == "const"}
    const_ops = {u.ops[0].result: u.ops[0] for u in units if u.kind == "const"}
    sources: dict[str, str] = {}  # body with placeholder -> file name
    uses: dict[str, list[str]] = {}
    steps: list[dict[str, Any]] = []

    def kernel(prefix: str, body: str, unit_ops: list[Op]) -> str:
        if body not in sources:
            sources[body] = f"{prefix}_{hashlib.sha256(body.encode()).hexdigest()[:10]}.py"
            uses[body] = []
        uses[body] += [_loc(o) for o in unit_ops]
        return sources[body]

    for u in units:
        step: dict[str, Any] = {
            "kind": u.kind,
            "ops": [index[id(o)] for o in u.ops],
            "inputs": [v.name for v in u.ops[0].operands],
            "outputs": [r.name for r in u.ops[-1].results],
        }
        if u.kind == "const":
            needed = f.body[step["ops"][0]].result in results or any(
                o.name not in ew.OPS for o in users[u.ops[0].result]
            )
            if not needed:
                continue  # every reader takes it as a scalar argument
            v = u.ops[0].result
            src = ew.source("constant fill", [_USES], [], [], [v], [v], len(v.type.shape))
            step.update(kind="ew", kernel=kernel("fill", src, u.ops), inputs=[], unsqueeze=[], outputs=[v.name])
            step.update(consts=[_const_value(u.ops[0])], shape=list(v.type.shape))
        elif u.kind in ("ew", "gemm"):
            outs = _outputs(u, users, results)
            loads, splats = _split_inputs(u, consts)
            if u.kind == "ew":
                rank = len(u.ops[0].result.type.shape)
                src = ew.source(
                    f"fused elementwise {', '.join(o.name for o in u.ops)}", [_USES], u.ops, loads, splats, outs, rank
                )
                step.update(kernel=kernel("ew", src, u.ops), shape=list(u.ops[0].result.type.shape), inputs=[])
            else:
                src = matmul.source([_USES], u.ops[0], u.ops[1:], [v for v, _ in loads], splats, outs)
                step.update(kernel=kernel("gemm", src, u.ops), gemm=u.ops[0].name)
            step["inputs"] += [v.name for v, _ in loads]
            step["unsqueeze"] = [flag for _, flag in loads]
            step["consts"] = [_const_value(const_ops[v]) for v in splats]
            step["outputs"] = [v.name for v in outs]
        elif u.kind == "row":
            kind_ = rows.KIND_OF_OP[u.ops[0].name]
            step["kernel"] = kernel(f"row_{kind_}", rows.source(kind_, [_USES]), u.ops)
        elif u.kind == "gather":
            op = u.ops[0]
            x, idx = (v.type.rank for v in op.operands)
            if op.name == "gather":
                src = indexing.gather_source(x, op.attrs["axis"] % x, [_USES])
            else:
                src = indexing.take_source(x, idx, op.attrs["axis"] % x, [_USES])
            step["kernel"] = kernel(op.name, src, u.ops)
        elif u.kind == "template":
            step.update(launcher=u.launcher, inputs=[v.name for v in u.ops[0].operands])
            if u.launcher in IN_PLACE:
                step["in_place"] = _overwritable(f, u.ops[0], users, producers, pos, results)
            step["outputs"] = [r.name for r in (u.ops[-1].results if u.launcher == FUSED_MOE else u.ops[0].results)]
        steps.append(step)
    _mark_static(steps, f)
    max_rank = max([len(v.type.shape) for v in f.values()] + [1])
    kernels = {
        name: body.replace(f"#   {_USES}", "\n".join(f"#   {x}" for x in uses[body])) for body, name in sources.items()
    }
    copy = {f"copy_r{r}.py": ew.copy_source(r) for r in range(1, max_rank + 1)}
    written = {n for s in steps if s.get("in_place") for n in s["inputs"][: IN_PLACE[s["launcher"]]]}
    donated = sorted(written & {a.name for a in f.args})
    scales = {s["inputs"][SCALE_OPERANDS[s["launcher"]]] for s in steps if s.get("launcher") in SCALE_OPERANDS}
    scales |= {s["outputs"][1] for s in steps if s.get("launcher") == "paged_write_q"}
    return {"entry": entry, "steps": steps, "donated": donated, "f32": sorted(scales), "kernels": {**kernels, **copy}}


__all__ = ["DEFAULT_PIPELINE", "LoweringError", "lower"]
