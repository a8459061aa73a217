"""Pattern matching for `expert-fusion`: each `moe_experts` op, and the shared-expert MLP added to its result.

The shared experts of the DeepSeek `moe` block are `linear(swiglu(linear(h, gate), linear(h, up)), down)`
on the same tokens as the routed experts (h, or h reshaped to [T, D]), added to the routed result (reshaped
back to h's shape). When that MLP's width is a multiple of the expert width it folds into the grouped GEMM as
always-on experts; a shared MLP that cannot fold gets a `note` saying why, and stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1c.ir.core import Function, Op, Value
from r1c.ir.types import DType


@dataclass
class SharedMLP:
    gate_w: Value  # [s*F, D]
    up_w: Value  # [s*F, D]
    down_w: Value  # [D, s*F]
    width: int  # s*F


@dataclass
class MoeSite:
    moe: Op
    anchor: Op  # the fused ops go where this op was: every operand they read is defined before it
    replaced: Value  # the value the fused result stands for
    removed: list[Op] = field(default_factory=list)
    shared: SharedMLP | None = None
    note: str | None = None  # why a shared MLP next to this MoE stays dense


class _Graph:
    def __init__(self, f: Function) -> None:
        self.producers = f.producers()
        self.users = f.users()
        self.returned = set(f.results)

    def only_user(self, v: Value) -> Op | None:
        users = self.users.get(v, [])
        return users[0] if len(users) == 1 and v not in self.returned else None

    def producer(self, v: Value, name: str) -> Op | None:
        op = self.producers.get(v)
        return op if op is not None and op.name == name else None


def find_sites(f: Function) -> list[MoeSite]:
    g = _Graph(f)
    return [_site(g, op) for op in f.body if op.name == "moe_experts"]


def _site(g: _Graph, moe: Op) -> MoeSite:
    plain = MoeSite(moe, moe, moe.results[0], [moe])
    routed, path = moe.results[0], [moe]
    user = g.only_user(routed)
    if user is not None and user.name == "reshape":
        routed, path = user.results[0], [moe, user]
        user = g.only_user(routed)
    if user is None or user.name != "add" or user.operands[0] == user.operands[1]:
        return plain
    other = user.operands[1] if user.operands[0] == routed else user.operands[0]
    mlp = _mlp_ops(g, other)
    if mlp is None:
        return plain  # an add of something that is not a SwiGLU MLP: nothing to fold
    plain.note = _fold_blocker(g, moe, user, routed, other, mlp)
    if plain.note is not None:
        return plain
    gate, up, act, down = mlp
    shared = SharedMLP(gate.operands[1], up.operands[1], down.operands[1], gate.operands[1].type.shape[0])
    return MoeSite(moe, user, user.results[0], [*path, user, gate, up, act, down], shared)


def _mlp_ops(g: _Graph, v: Value) -> tuple[Op, Op, Op, Op] | None:
    """(gate, up, swiglu, down) when v = linear(swiglu(linear(h, gate), linear(h, up)), down)."""
    down = g.producer(v, "linear")
    act = down and g.producer(down.operands[0], "swiglu")
    gate = act and g.producer(act.operands[0], "linear")
    up = act and g.producer(act.operands[1], "linear")
    if gate is None or up is None or gate.operands[0] != up.operands[0]:
        return None
    return gate, up, act, down


def _fold_blocker(g: _Graph, moe: Op, add: Op, routed: Value, shared_out: Value, mlp: tuple[Op, ...]) -> str | None:
    """Why the shared MLP cannot become always-on experts of this MoE's grouped GEMM, or None if it can."""
    gate, up, act, down = mlp
    x, ids, weights, w_gate, _, _ = moe.operands
    n_experts, width, d = w_gate.type.shape
    h = gate.operands[0]
    same_tokens = h == x or (
        (r := g.producer(x, "reshape")) is not None and r.operands[0] == h and h.type.shape[-1] == x.type.shape[1]
    )
    if not same_tokens:
        return "its input is not the routed experts' tokens"
    if not (add.results[0].type == routed.type == shared_out.type):
        return "the add that combines it with the routed experts broadcasts"
    if any(g.only_user(v) is None for v in (gate.results[0], up.results[0], act.results[0], shared_out)):
        return "its intermediate values have other users"
    s_width = gate.operands[1].type.shape[0]
    if up.operands[1].type.shape != gate.operands[1].type.shape or down.operands[1].type.shape != (d, s_width):
        return "its gate, up and down weights are not [W, D], [W, D], [D, W]"
    if not isinstance(width, int) or not isinstance(s_width, int) or s_width % width:
        return f"its width {s_width} is not a multiple of the expert width {width}"
    if ids.type.dtype == DType.int8 and n_experts + s_width // width > 127:
        return f"its expert ids {n_experts}.. do not fit the int8 ids"
    types = {v.type.dtype for v in (x, w_gate, gate.operands[1], up.operands[1], down.operands[1])}
    if len(types) != 1 or weights.type.dtype != x.type.dtype:
        return "its weights, the routed weights and the routing weights do not share one dtype"
    return None
