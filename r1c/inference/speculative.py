"""Speculative decoding: a small draft model proposes k tokens per row, the target verifies them in one paged step of
S = k + 1 tokens, and each row keeps the accepted prefix plus one token of the target's own.

The draft has its own pool with the target's page count and size and uses the same pages (the engine's allocator):
a verify step reaches one position past the draft's last, so the pages the engine reserves for the target cover
the draft too. Positions written for rejected tokens need no cleanup: `start` says what is valid, and they are
overwritten when the row gets there.

Acceptance is standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d drawn from q is
kept with probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from norm(max(0, p - q));
when all k are kept a bonus token comes from p. The output then follows the target's distribution p exactly, with
p and q each the request's sampling distribution (temperature, top-k, top-p) of the target's and the draft's
logits. Greedy is the limit where p and q are one-hot: a draft token is kept iff it is the target's argmax, so the
tokens are plain greedy decoding's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from r1c.api import InputError
from r1c.inference.executor import Executor
from r1c.inference.sampling import SamplingParams, distribution, draw

if TYPE_CHECKING:
    from r1c.inference.engine import Engine, Request, TokenEvent


def probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The request's sampling distribution of one row of logits; one-hot at the argmax when greedy."""
    if params.greedy:
        p = np.zeros(logits.shape[-1], np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    return distribution(logits, params)


def accept(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator | None) -> list[int]:
    """The tokens a row keeps: the accepted prefix of `drafts` and one token from the target.

    p [k+1, V]: the target's distributions after the row's last token and after each draft token; q [k, V]: the
    draft's distributions the drafts were drawn from. rng None: greedy (one-hot p and q, no randomness needed)."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        u = rng.random() if rng is not None else 0.0
        if u * q[j, d] < p[j, d]:  # accepted with probability min(1, p/q)
            out.append(d)
            continue
        residual = np.maximum(p[j] - q[j], 0.0)
        total = residual.sum()
        # p == q to rounding leaves nothing to resample from: p itself is then the exact distribution
        residual = residual / total if total > 0 else p[j]
        return out + [_pick(residual, rng)]
    return out + [_pick(p[len(drafts)], rng)]


def _pick(p: np.ndarray, rng: np.random.Generator | None) -> int:
    return draw(p, rng) if rng is not None else int(np.argmax(p))


class Speculator:
    """The draft side of an engine's speculative decode steps (Engine(..., draft=..., speculate=k))."""

    def __init__(self, engine: Engine, draft: Executor, k: int) -> None:
        if draft.signature.vocab_size != engine.vocab_size:
            raise InputError(
                f"the draft's vocabulary ({draft.signature.vocab_size}) is not the target's ({engine.vocab_size})"
            )
        shared = (("page_size", engine.page_size), ("pages", engine.num_pages), ("table", engine.table_width))
        for role, value in shared:  # the draft's pool and block table are the target's shape
            if draft.fixed.get(role, value) != value:
                raise InputError(f"the draft's build fixes its {role} to {draft.fixed[role]}; the engine uses {value}")
        if "batch" in draft.fixed or "steps" in draft.fixed:
            raise InputError("the draft's build fixes its batch or tokens per step; compile it without binding B, S")
        self.engine, self.draft, self.k = engine, draft, k
        self.pools = draft.new_pools(engine.num_pages, engine.page_size)
        self.cached: dict[int, int] = {}  # request id -> tokens in the draft's pool that match the request's

    def forget(self, req: Request) -> None:
        self.cached.pop(req.id, None)

    def step(self, reqs: list[Request]) -> list[TokenEvent]:
        """One speculative decode step for running requests: k draft proposals, one verify call, the kept tokens."""
        eng = self.engine
        reqs = eng.make_room(reqs)  # pages up to len + k: the verify step's reach
        if not reqs:
            return []
        t0 = time.perf_counter()
        drafts, q = self._propose(reqs)
        logits = eng.run_step(reqs, [[r.tokens[-1], *d] for r, d in zip(reqs, drafts)])
        eng.stats.decode_seconds += time.perf_counter() - t0
        eng.stats.decode_calls += 1
        eng.stats.decode_rows += len(reqs)
        events = []
        for r, d, qr, lr in zip(reqs, drafts, q, logits):
            n = len(r.tokens)
            kept = accept(np.stack([probs(x, r.params) for x in lr]), qr, d, r.rng)
            eng.stats.proposed += self.k
            eng.stats.accepted += len(kept) - 1
            # the draft's cache stays valid through the accepted drafts it was fed (all but the last proposal)
            self.cached[r.id] = min(self.cached[r.id], n + len(kept) - 1)
            for tok in kept:
                events.append(eng.emit(r, tok))
                eng.stats.decode_tokens += 1
                if events[-1].finish_reason is not None:
                    break
            else:
                r.cached = len(r.tokens) - 1  # the target holds every kept token but the newest
        return events

    def _propose(self, reqs: list[Request]) -> tuple[list[list[int]], list[np.ndarray]]:
        """k tokens per row from the draft, and the distributions [k, V] they were drawn from. The first call
        catches each row up on the tokens its draft cache lacks (grouped by how many), then k - 1 single steps."""
        drafts: list[list[int]] = [[] for _ in reqs]
        q: list[list[np.ndarray]] = [[] for _ in reqs]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            self.cached.setdefault(r.id, 0)
            groups.setdefault(len(r.tokens) - self.cached[r.id], []).append(i)
        for rows in groups.values():
            self._draft_step(reqs, rows, [reqs[i].tokens[self.cached[reqs[i].id] :] for i in rows], drafts, q)
        everyone = list(range(len(reqs)))
        for _ in range(self.k - 1):
            self._draft_step(reqs, everyone, [[d[-1]] for d in drafts], drafts, q)
        return drafts, [np.stack(x) for x in q]

    def _draft_step(
        self,
        reqs: list[Request],
        rows: list[int],
        feeds: list[list[int]],
        drafts: list[list[int]],
        q: list[list[np.ndarray]],
    ) -> None:
        """One draft call for reqs[i], i in rows, fed `feeds`; appends each row's next proposal and its q."""
        eng = self.engine
        sel = [reqs[i] for i in rows]
        table = eng.pages.block_table([r.id for r in sel], eng.table_width)
        start = np.asarray([self.cached[r.id] for r in sel], np.int32)
        logits, self.pools = self.draft.step(np.asarray(feeds, np.int32), self.pools, table, start, out="last")
        eng.stats.draft_calls += 1
        for i, r, f, row in zip(rows, sel, feeds, logits):
            self.cached[r.id] += len(f)
            dist = probs(row[0], r.params)
            drafts[i].append(_pick(dist, r.rng))
            q[i].append(dist)
