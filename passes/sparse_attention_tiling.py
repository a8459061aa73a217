"""sparse-attention-tiling: masked attention -> tiled attention over a block map of the non-empty tiles.

Rewrites, in every function:
- `attention` with a causal mask (optionally window / sinks) -> `attention_block_map` + `tiled_attention`;
- `block_sparse_attention` (an explicit tile layout) -> the same, the layout carried as attributes;
- `dsa_attention` (DeepSeek-V3.2 top-k selection) -> `dsa_block_map` (data-dependent) + `tiled_dsa_attention`.
Left alone: non-causal attention without a layout (no tile can be skipped) and attention whose static shapes
leave no tile empty (a decode step of one q tile, a sequence shorter than one tile).

A structured map depends only on the sequence lengths and the mask, so one map serves every attention of a
function with the same q/k types and mask (all the layers of a model); a DSA map is built once per indices value.
The tiled op defines the same result value as the op it replaces, so no use needs rewriting.
"""

from __future__ import annotations

from r1c.ir import registry
from r1c.ir.core import Function, Module, Op, Value
from r1c.ir.ops.attention_tiled import visited_tiles
from r1c.passes.registry import PipelineError, register_pass
from r1c.passes.rewrite import NameGen

_MASK_KEYS = ("causal", "window", "sinks", "layout_block", "layout")


class _Tiler:
    """Emits the tiled form of one function's attention ops, building each block map once."""

    def __init__(self, f: Function, block_q: int, block_k: int) -> None:
        self.names = NameGen(f)
        self.tiles = {"block_q": block_q, "block_k": block_k}
        self.maps: dict[tuple, tuple[Value, Value]] = {}
        self.out: list[Op] = []

    def emit(self, name: str, operands: tuple[Value, ...], attrs: dict, loc: str | None, hint: str) -> list[Value]:
        opdef = registry.get(name)
        attrs = opdef.complete_attrs(attrs)
        types = opdef.infer([v.type for v in operands], attrs)
        suffixes = ["", ".counts"][: len(types)]
        results = tuple(Value(self.names.fresh(hint + s), t) for s, t in zip(suffixes, types))
        self.out.append(Op(name, operands, results, attrs, loc))
        return list(results)

    def block_map(self, key: tuple, name: str, operands: tuple[Value, ...], attrs: dict, loc: str | None):
        if key not in self.maps:
            self.maps[key] = tuple(self.emit(name, operands, {**self.tiles, **attrs}, loc, "block_map"))
        return self.maps[key]

    def structured(self, op: Op) -> Op:
        q, k, v = op.operands
        mask = {n: op.attrs.get(n, registry.get("tiled_attention").attrs[n].default) for n in _MASK_KEYS}
        key = ("structured", q.type, k.type, tuple(sorted(mask.items())))
        block_map, counts = self.block_map(key, "attention_block_map", (q, k), mask, op.loc)
        attrs = {"scale": op.attrs["scale"], **self.tiles, **mask}
        return self.replace(op, "tiled_attention", (q, k, v, block_map, counts), attrs)

    def dsa(self, op: Op) -> Op:
        q, k, v, indices = op.operands
        block_map, counts = self.block_map(("dsa", indices, k.type), "dsa_block_map", (indices, k), {}, op.loc)
        attrs = {"scale": op.attrs["scale"], **self.tiles}
        return self.replace(op, "tiled_dsa_attention", (q, k, v, indices, block_map, counts), attrs)

    def replace(self, op: Op, name: str, operands: tuple[Value, ...], attrs: dict) -> Op:
        opdef = registry.get(name)
        attrs = opdef.complete_attrs(attrs)
        if opdef.infer([x.type for x in operands], attrs) != [op.result.type]:
            raise PipelineError(f"sparse-attention-tiling: {name} would change the type of %{op.result.name}")
        return Op(name, operands, op.results, attrs, op.loc)


def _worth_tiling(op: Op, block_q: int, block_k: int) -> bool:
    """Whether the block map can skip a tile: symbolic lengths are assumed long; static ones are counted."""
    if not op.attrs["causal"]:
        return False
    sq, skv = op.operands[0].type.shape[2], op.operands[1].type.shape[2]
    if not (isinstance(sq, int) and isinstance(skv, int)):
        return True
    a = {**op.attrs, "block_q": block_q, "block_k": block_k}
    return visited_tiles(sq, skv, a) < -(-sq // block_q) * -(-skv // block_k)


def _rewrite_function(f: Function, block_q: int, block_k: int) -> None:
    tiler = _Tiler(f, block_q, block_k)
    for op in f.body:
        if op.name == "attention" and _worth_tiling(op, block_q, block_k):
            tiler.out.append(tiler.structured(op))
        elif op.name == "block_sparse_attention":
            tiler.out.append(tiler.structured(op))
        elif op.name == "dsa_attention":
            tiler.out.append(tiler.dsa(op))
        else:
            tiler.out.append(op)
    f.body = tiler.out


@register_pass(
    "sparse-attention-tiling",
    "Masked attention (causal/window/sinks, block-sparse layouts, DSA top-k) -> tiled attention over a block "
    "map listing only the non-empty (q tile, k tile) pairs, each marked full or partial.",
)
def sparse_attention_tiling(module: Module, *, block_q: int = 64, block_k: int = 64) -> Module:
    if block_q <= 0 or block_k <= 0:
        raise PipelineError(f"sparse-attention-tiling: block_q and block_k must be > 0, got {block_q}, {block_k}")
    for f in module.functions.values():
        _rewrite_function(f, block_q, block_k)
    return module
