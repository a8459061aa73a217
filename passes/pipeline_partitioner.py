"""Exact min-max partition of a sequence of units into S contiguous, non-empty stages.

The cost of a stage [i, j) is `a * (P[j] - P[i]) + send[j] + g * send[i]`: its op time (P is the prefix sum
of unit times, a = 1 + backward ratio for a training step) plus the time to send what crosses its end cut
forward and, when training, the gradients of what crosses its start cut back. Because the boundary terms
depend on where a cut falls, extending a stage can make it cheaper, so a greedy sweep or a binary search
with a greedy check is not exact; the DP over (stage count, end unit) is, in O(S n^2) (vectorized over the
start unit).

An optional memory cap makes a stage infeasible when its parameter bytes plus `in_flight(k)` micro-batches of
stored activations exceed it; `in_flight` depends on the stage index k (1F1B keeps S-k micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from r1c.passes.pipeline_cost import PartitionError


@dataclass(frozen=True)
class MemoryCap:
    limit: float  # bytes per stage
    param_prefix: np.ndarray  # prefix sums of per-unit parameter bytes
    act_prefix: np.ndarray  # prefix sums of per-unit stored activation bytes (one micro-batch)
    in_flight: Callable[[int], int]  # micro-batches whose activations stage k holds at once


def min_max_partition(
    times: np.ndarray,
    send: np.ndarray,
    stages: int,
    scale: float = 1.0,
    grad_back: bool = False,
    cap: MemoryCap | None = None,
) -> tuple[list[int], float]:
    """Cut points [0, c1, ..., n] of the stages minimizing the largest stage cost, and that cost."""
    n = len(times)
    if stages < 1:
        raise PartitionError(f"stages must be >= 1, got {stages}")
    if n < stages:
        raise PartitionError(f"cannot split {n} unit(s) into {stages} non-empty stages")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(times, dtype=np.float64))])
    send = np.asarray(send, dtype=np.float64)
    back = send if grad_back else np.zeros_like(send)

    def costs(k: int, i: np.ndarray, j: np.ndarray | int) -> np.ndarray:
        """Cost of stage k spanning [i, j) (arrays broadcast); inf where it breaks the memory cap."""
        c = scale * (prefix[j] - prefix[i]) + send[j] + back[i]
        if cap is not None:
            mem = cap.param_prefix[j] - cap.param_prefix[i] + cap.in_flight(k) * (cap.act_prefix[j] - cap.act_prefix[i])
            c = np.where(mem <= cap.limit, c, np.inf)
        return c

    best = np.full(n + 1, np.inf)
    best[1:] = costs(0, np.zeros(n, dtype=np.int64), np.arange(1, n + 1))
    choice = [np.zeros(n + 1, dtype=np.int64)]
    for k in range(1, stages):
        new = np.full(n + 1, np.inf)
        arg = np.zeros(n + 1, dtype=np.int64)
        # stage k ends at j; the k stages before it cover [0, i) with i >= k (each non-empty)
        for j in range(k + 1, n - (stages - k - 1) + 1):
            cand = np.maximum(best[k:j], costs(k, np.arange(k, j), j))
            at = int(np.argmin(cand))
            new[j], arg[j] = cand[at], k + at
        best = new
        choice.append(arg)
    if not np.isfinite(best[n]):
        raise PartitionError(
            f"no split into {stages} stages fits the memory cap of {cap.limit / 1e9:.3g} GB per stage"
            if cap is not None
            else f"no finite-cost split into {stages} stages"
        )
    cuts = [n]
    for k in range(stages - 1, 0, -1):
        cuts.append(int(choice[k][cuts[-1]]))
    cuts.append(0)
    return cuts[::-1], float(best[n])
