"""expert-fusion: rewrite `moe_experts` (and the shared-expert MLP added to it) into token permutation,
grouped GEMMs and a weighted combine (see docs/passes.md).

    x_sorted, offsets, row_of = moe_permute(x, ids)            sort the T*K (token, slot) pairs by expert
    h = grouped_matmul(x_sorted, concat(w_gate, w_up, axis=1))  gate and up in one GEMM per expert
    y = grouped_matmul(swiglu(h[:, :F], h[:, F:]), w_down)
    out = moe_unpermute(y, row_of, weights)                     back to token order, weighted sum of the slots

A shared MLP of width s*F becomes s always-on experts (SwiGLU is separable over the F axis) that every token
routes to with weight 1, so it rides in the same GEMMs. The parameters are untouched (the fused weights are
concats/reshapes in the IR), so weights still line up by name. With `expert_groups` = G the routed experts split
into G contiguous groups with one dispatch each (what expert parallelism over G devices runs), the shared
experts in a dispatch of their own; every row belongs to exactly one dispatch, so adding the partial results is
exact.
"""

from __future__ import annotations

import warnings
from typing import Any

from r1c.ir import registry
from r1c.ir.core import DimList, Function, Module, Op, Value
from r1c.passes.expert_fusion_match import MoeSite, find_sites
from r1c.passes.registry import PipelineError, register_pass
from r1c.passes.rewrite import NameGen, replace_all_uses


class ExpertFusionWarning(UserWarning):
    """A shared-expert MLP next to a MoE could not fold into its grouped GEMM (it stays dense)."""


class _Emitter:
    """Typed ops for insertion into an existing function: fresh readable names, the site's location."""

    def __init__(self, names: NameGen, loc: str | None) -> None:
        self.names = names
        self.loc = loc
        self.ops: list[Op] = []

    def __call__(self, opname: str, *operands: Value, name: str | tuple[str, ...], **attrs: Any) -> Any:
        opdef = registry.get(opname)
        full = opdef.complete_attrs(attrs)
        types = opdef.infer([v.type for v in operands], full)
        bases = (name,) if isinstance(name, str) else name
        results = tuple(Value(self.names.fresh(base), t) for base, t in zip(bases, types, strict=True))
        self.ops.append(Op(opname, operands, results, full, self.loc))
        return results[0] if len(results) == 1 else results


def _shared_experts(emit: _Emitter, site: MoeSite) -> tuple[Value, Value, Value, Value, int]:
    """The shared MLP as s experts: (ids [T, s], weights [T, s] of ones, w_gate_up [s, 2F, D], w_down [s, D, F])."""
    _, ids, weights, w_gate, _, _ = site.moe.operands
    n_experts, width, d = w_gate.type.shape
    t = ids.type.shape[0]
    sh = site.shared
    s = sh.width // width
    ramp = emit(
        "iota",
        emit("constant", name="shared_slots", value=0.0, dtype=ids.type.dtype, shape=(1, s)),
        name="shared_rank",
        axis=1,
        dtype=ids.type.dtype,
    )
    first = emit("constant", name="first_shared", value=float(n_experts), dtype=ids.type.dtype, shape=())
    shared_ids = emit(
        "broadcast_to", emit("add", ramp, first, name="shared_id"), name="shared_ids", shape=DimList((t, s))
    )
    one = emit("constant", name="one", value=1.0, dtype=weights.type.dtype, shape=())
    ones = emit("broadcast_to", one, name="shared_weights", shape=DimList((t, s)))
    gate = emit("reshape", sh.gate_w, name="shared_gate", shape=DimList((s, width, d)))
    up = emit("reshape", sh.up_w, name="shared_up", shape=DimList((s, width, d)))
    gate_up = emit("concat", gate, up, name="shared_gate_up", axis=1)
    down = emit("reshape", sh.down_w, name="shared_down", shape=DimList((d, s, width)))
    down = emit("transpose", down, name="shared_down", perm=(1, 0, 2))
    return shared_ids, ones, gate_up, down, s


def _dispatches(emit: _Emitter, site: MoeSite, gate_up: Value, down: Value, shared: tuple | None, groups: int):
    """(first expert, w_gate_up, w_down) per grouped-GEMM dispatch."""
    n_experts = gate_up.type.shape[0]
    if groups == 1:
        if shared is None:
            return [(0, gate_up, down)]
        both_gu = emit("concat", gate_up, shared[0], name="w_gate_up_all", axis=0)
        return [(0, both_gu, emit("concat", down, shared[1], name="w_down_all", axis=0))]
    if n_experts % groups:
        raise ValueError(
            f"expert-fusion: expert_groups={groups} does not divide the {n_experts} routed experts of "
            f"moe_experts at loc({site.moe.loc})"
        )
    size = n_experts // groups
    out = []
    for g in range(groups):
        lo, hi = g * size, (g + 1) * size
        gu = emit("slice", gate_up, name=f"w_gate_up.g{g}", axis=0, start=lo, stop=hi)
        out.append((lo, gu, emit("slice", down, name=f"w_down.g{g}", axis=0, start=lo, stop=hi)))
    if shared is not None:
        out.append((n_experts, shared[0], shared[1]))
    return out


def _fuse(emit: _Emitter, site: MoeSite, capacity_factor: float, groups: int) -> Value:
    x, ids, weights, w_gate, w_up, w_down = site.moe.operands
    width = w_gate.type.shape[1]
    shared, n_shared = None, 0
    if site.shared is not None:
        shared_ids, ones, shared_gu, shared_down, n_shared = _shared_experts(emit, site)
        ids = emit("concat", ids, shared_ids, name="ids_all", axis=1)
        weights = emit("concat", weights, ones, name="weights_all", axis=1)
        shared = (shared_gu, shared_down)
    x_sorted, offsets, row_of = emit(
        "moe_permute",
        x,
        ids,
        name=("x_sorted", "group_offsets", "row_of"),
        num_experts=w_gate.type.shape[0] + n_shared,
        num_shared=n_shared,
        capacity_factor=capacity_factor,
    )
    gate_up = emit("concat", w_gate, w_up, name="w_gate_up", axis=1)
    partials = []
    for first, gu, down in _dispatches(emit, site, gate_up, w_down, shared, groups):
        h = emit("grouped_matmul", x_sorted, gu, offsets, name="gate_up", first_expert=first)
        g = emit("slice", h, name="gate", axis=1, start=0, stop=width)
        u = emit("slice", h, name="up", axis=1, start=width, stop=2 * width)
        act = emit("swiglu", g, u, name="act")
        partials.append(emit("grouped_matmul", act, down, offsets, name="y_sorted", first_expert=first))
    y = partials[0]
    for part in partials[1:]:
        y = emit("add", y, part, name="y_sorted")
    out = emit("moe_unpermute", y, row_of, weights, name="moe_out")
    if out.type != site.replaced.type:
        out = emit("reshape", out, name="moe_out", shape=DimList(site.replaced.type.shape))
    return out


def _fuse_function(f: Function, capacity_factor: float, groups: int) -> None:
    sites = [s for s in find_sites(f) if _rewritable(s)]
    if not sites:
        return
    names = NameGen(f)
    at: dict[int, list[Op]] = {}
    removed: set[int] = set()
    mapping: dict[Value, Value] = {}
    for site in sites:
        if site.note is not None:
            warnings.warn(
                f"expert-fusion: the shared experts next to moe_experts at loc({site.moe.loc}) stay dense linears: "
                f"{site.note}",
                ExpertFusionWarning,
                stacklevel=2,
            )
        emit = _Emitter(names, site.moe.loc)
        mapping[site.replaced] = _fuse(emit, site, capacity_factor, groups)
        at[id(site.anchor)] = emit.ops
        removed.update(id(op) for op in site.removed)
    body: list[Op] = []
    for op in f.body:
        body.extend(at.get(id(op), ()))
        if id(op) not in removed:
            body.append(op)
    f.body = body
    replace_all_uses(f, mapping)


def _rewritable(site: MoeSite) -> bool:
    """Static expert shapes and one dtype for rows and routing weights (moe_unpermute combines them)."""
    x, ids, weights, w_gate, _, _ = site.moe.operands
    static = all(isinstance(d, int) for d in (*w_gate.type.shape, ids.type.shape[1]))
    if not static or weights.type.dtype != x.type.dtype:
        warnings.warn(
            f"expert-fusion: moe_experts at loc({site.moe.loc}) is left as is: it needs static expert shapes and "
            f"routing weights of the tokens' dtype (got {w_gate.type}, {ids.type}, {weights.type})",
            ExpertFusionWarning,
            stacklevel=3,
        )
        return False
    return True


@register_pass(
    "expert-fusion",
    "Rewrite moe_experts (+ the shared-expert MLP added to it) into moe_permute (sort by expert), grouped "
    "GEMMs (gate+up fused, SwiGLU, down; shared experts as always-on experts) and moe_unpermute. "
    "capacity_factor > 0 drops pairs beyond ceil(cf*T*K/E) per expert; expert_groups splits the dispatch.",
)
def expert_fusion(module: Module, *, capacity_factor: float = 0.0, expert_groups: int = 1) -> Module:
    if capacity_factor < 0:
        raise PipelineError(f"expert-fusion: capacity_factor must be >= 0 (0: dropless), got {capacity_factor}")
    if expert_groups < 1:
        raise PipelineError(f"expert-fusion: expert_groups must be >= 1, got {expert_groups}")
    for f in module.functions.values():
        _fuse_function(f, capacity_factor, expert_groups)
    return module
