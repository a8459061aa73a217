"""Expert parallelism: `moe_experts` and its gradient with the routed experts spread over a group of ranks.

Rank r of a group of `ways` holds row block r of every expert weight (experts r*n .. r*n + n-1, n = E / ways; the
module declares the block, `expert_shard.py`) and its own tokens (its rows of the batch). `ExpertDispatch` gives
the interpreter replacements for the two ops' references (`run_function(..., overrides=...)`):

- forward: every routed (token, slot) pair goes to the owner of its expert with one all-to-all: the token's row,
  the expert's index within the owner's block and the routing weight. The owner runs the op's own reference on
  the rows it received (one slot per row) and returns each row's weighted expert output by the reverse all-to-all;
  the sender sums them per token, experts in ascending order as the single-process reference does.
- backward (`moe_experts_grad`): the same dispatch also carries the token's cotangent; the owner runs the
  gradient's reference on its rows and returns each row's input cotangent and routing-weight gradient. It keeps
  the expert weight gradients: they already sum over every token routed to its experts from every rank, so,
  unlike the replicated weights' gradients, they are not all-reduced.

Rows travel in float64 (what the references compute in) and the references do all the arithmetic, on the same
values: the results equal the single-process op's but for the order of floating-point sums over tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r1c.distributed.comm import Channel
from r1c.distributed.expert_shard import MOE
from r1c.distributed.program import PipelineConfig
from r1c.ir import registry
from r1c.ir.registry import Reference

MOE_GRAD = "moe_experts_grad"


class ExpertDispatch:
    def __init__(self, channel: Channel, group: Any, ways: int, where: str) -> None:
        """`group`: the torch.distributed group of the `ways` ranks that share the experts; its rank r holds expert
        block r. `where` names the ranks' stage in error messages."""
        self.channel, self.group, self.ways, self.where = channel, group, ways, where
        self._forward, self._backward = registry.get(MOE).reference, registry.get(MOE_GRAD).reference

    def overrides(self) -> dict[str, Reference]:
        return {MOE: self.forward, MOE_GRAD: self.backward}

    def forward(self, ins: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
        x, ids, w, wg, wu, wd = ins
        route = _Route(ids, wg.shape[0], self.ways)
        rows, got = self._exchange(route.rows(x, w), route.counts, "dispatch")
        own = _owner_args(rows, x.shape[1])
        (y,) = self._forward([*own, wg, wu, wd], attrs)  # one slot per row: its weighted expert output
        back, _ = self._exchange(y, got, "combine", route.counts)
        return [route.combine(route.per_pair(back), x.shape)]

    def backward(self, ins: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
        x, ids, w, wg, wu, wd, g = ins
        d = x.shape[1]
        route = _Route(ids, wg.shape[0], self.ways)
        rows, got = self._exchange(np.hstack([route.rows(x, w), route.take(g)]), route.counts, "backward dispatch")
        dh, dw_rows, dwg, dwu, dwd = self._backward(
            [*_owner_args(rows[:, : d + 2], d), wg, wu, wd, rows[:, d + 2 :]], attrs
        )
        back, _ = self._exchange(np.hstack([dh, dw_rows]), got, "backward combine", route.counts)
        pair = route.per_pair(back)
        dx = route.combine(pair[..., :d], x.shape)
        return [dx, pair[..., d], dwg, dwu, dwd]

    def _exchange(
        self, rows: np.ndarray, counts: np.ndarray, what: str, recv_counts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.channel.all_to_all(
            rows, counts, f"the expert {what} all-to-all of {self.where}", self.group, recv_counts
        )


def expert_overrides(pc: PipelineConfig, channel: Channel, group: Any, stage: int) -> dict[str, Reference] | None:
    """The interpreter's `overrides` for a rank of stage `stage` (`group`: that stage in every replica, as
    `launch.place` gives it); None without expert parallelism: the ops' own references."""
    if pc.expert_parallel == 1:
        return None
    return ExpertDispatch(channel, group, pc.expert_parallel, f"stage {stage}").overrides()


class _Route:
    """Where each (token, slot) pair of `ids` [T, K] goes: the rank owning its expert, blocks of `block` experts."""

    def __init__(self, ids: np.ndarray, block: int, ways: int) -> None:
        self.ids = ids.astype(np.int64)
        self.block = block
        owner = self.ids.reshape(-1) // block
        if owner.size and (owner.min() < 0 or owner.max() >= ways):
            raise ValueError(f"{MOE}: expert id out of range [0, {block * ways})")
        # Pairs grouped by owner (all-to-all sends contiguous blocks), in (token, slot) order within an owner.
        self.order = np.argsort(owner, kind="stable")
        self.counts = np.bincount(owner, minlength=ways)
        self.token, self.slot = np.divmod(self.order, self.ids.shape[1])

    def take(self, per_token: np.ndarray) -> np.ndarray:
        return per_token[self.token].astype(np.float64)

    def rows(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Per pair, in send order: the token's row, its expert's index within the owner's block, its weight."""
        local = self.ids[self.token, self.slot] % self.block
        return np.column_stack([self.take(x), local, w[self.token, self.slot].astype(np.float64)])

    def per_pair(self, back: np.ndarray) -> np.ndarray:
        """The rows that came back (send order) as [T, K, ...]."""
        out = np.empty_like(back)
        out[self.order] = back
        return out.reshape(*self.ids.shape, *back.shape[1:])

    def combine(self, pair: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        # The reference's order: experts ascending, each adding its tokens' rows.
        out = np.zeros(shape, np.float64)
        for e in np.unique(self.ids):
            tok, slot = np.nonzero(self.ids == e)
            np.add.at(out, tok, pair[tok, slot])
        return out


def _owner_args(rows: np.ndarray, d: int) -> list[np.ndarray]:
    """The received rows as `moe_experts` operands with one slot per row: x [P, D], ids [P, 1], weights [P, 1]."""
    return [rows[:, :d], rows[:, d : d + 1].astype(np.int64), rows[:, d + 1 : d + 2]]
