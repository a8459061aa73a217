"""Per-request sampling: greedy, temperature, top-k and top-p (nucleus) over one row of logits, and stop conditions.

Every request owns a numpy Generator seeded from its `seed` and draws exactly one uniform number per sampled token,
so the tokens a seed gives depend on nothing else: not on the batch, nor on which other requests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r1c.api import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy (argmax; top_k, top_p and seed are then unused); top_k 0 and top_p 1 are off.
    A stop token or stop sequence ends the request with finish reason "stop" and is part of its output (like HF
    generate's eos; OpenAI's API strips the stop string: a server does that, the finish reason tells it when).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        # Lists from JSON or argparse become tuples: the dataclass stays hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        seqs = tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
        if any(not s for s in seqs):
            raise InputError("a stop sequence must hold at least one token")
        object.__setattr__(self, "stop_sequences", seqs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The float64 probabilities over the vocabulary a sampled token is drawn from: softmax(logits / T) restricted
    to the top_k largest logits, then to the smallest most-probable prefix whose mass reaches top_p, renormalized
    (HF's order: temperature, top-k, top-p). Ties are broken by the lower token id, so top_k keeps exactly k."""
    if params.greedy:
        raise ValueError("a greedy request has no sampling distribution; use sample()")
    z = np.asarray(logits, np.float64) / params.temperature
    w = np.exp(z - z.max())  # unnormalized softmax
    if not params.top_k and params.top_p >= 1:
        return w / w.sum()
    # Candidates best first: the top_k, or, for top-p alone, the best m for m = 64, 256, ... until their mass
    # reaches top_p, so a 129k vocabulary is partitioned (O(V)) rather than sorted per token.
    m = params.top_k or min(64, z.size)
    total = None if params.top_k else w.sum()
    while True:
        order = _ranked(z, m)
        mass = np.cumsum(w[order]) / (total if total is not None else w[order].sum())
        if params.top_k or mass[-1] >= params.top_p or m >= z.size:
            break
        m *= 4
    if params.top_p < 1:
        # The smallest prefix whose mass reaches top_p: the first index where the running sum does (clamped,
        # since the running sum can end a rounding error below 1).
        order = order[: min(int(np.searchsorted(mass, params.top_p)) + 1, order.size)]
    out = np.zeros(z.shape, np.float64)
    out[order] = w[order] / w[order].sum()
    return out


def _ranked(z: np.ndarray, k: int) -> np.ndarray:
    """Token ids by decreasing z, equal z by increasing id; only the first k when k > 0, found by a partition
    first (O(V), then the k sorted), since sorting a large vocabulary per token is what sampling would spend on."""
    ids = np.arange(z.size)
    if 0 < k < z.size:
        kth = np.partition(z, z.size - k)[z.size - k]  # the k-th largest value
        above = np.flatnonzero(z > kth)
        ids = np.concatenate([above, np.flatnonzero(z == kth)[: k - above.size]])  # ties at the cut: lower ids
    return ids[np.lexsort((ids, -z[ids]))]


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token from one row of logits [V]: the argmax when greedy, else one inverse-CDF draw from rng."""
    if params.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise ValueError("sampling needs a random generator (only greedy requests go without)")
    return draw(distribution(logits, params), rng)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One index from probabilities p by one uniform draw (inverse CDF; exactly one number consumed)."""
    cdf = np.cumsum(p)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), p.size - 1)


def stop_reason(output: list[int], params: SamplingParams) -> str | None:
    """ "stop" when the output ends in a stop token or stop sequence, "length" at max_new_tokens, else None."""
    if output and output[-1] in params.stop_token_ids:
        return "stop"
    for s in params.stop_sequences:
        if len(output) >= len(s) and tuple(output[-len(s) :]) == s:
            return "stop"
    return "length" if len(output) >= params.max_new_tokens else None
