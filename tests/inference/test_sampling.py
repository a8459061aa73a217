"""The sampler: top-k keeps exactly k candidates, top-p the smallest prefix reaching p, temperature -> 0 is greedy,
draws follow the restricted, renormalized softmax (chi-square), seeds reproduce; stop conditions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from r1c.api import InputError
from r1c.inference.sampling import SamplingParams, distribution, sample, stop_reason

logits_st = arrays(np.float32, st.integers(2, 40), elements=st.floats(-20, 20, width=32))


@settings(max_examples=60, deadline=None)
@given(logits_st, st.integers(1, 50), st.floats(0.1, 3))
def test_top_k_keeps_exactly_k_largest(logits, k, temp):
    p = distribution(logits, SamplingParams(temperature=temp, top_k=k))
    kept = np.flatnonzero(p > 0)
    assert len(kept) == min(k, logits.size)
    assert logits[kept].min() >= np.delete(logits, kept).max(initial=-np.inf)
    dropped = np.setdiff1d(np.arange(logits.size), kept)
    tied = dropped[logits[dropped] == logits[kept].min()]
    assert all(tied > kept[logits[kept] == logits[kept].min()].max())  # ties at the cut keep the lower ids
    assert p.sum() == pytest.approx(1)


@settings(max_examples=60, deadline=None)
@given(logits_st, st.floats(0.01, 1.0), st.floats(0.2, 3))
def test_top_p_keeps_smallest_prefix_reaching_p(logits, top_p, temp):
    full = distribution(logits, SamplingParams(temperature=temp))
    p = distribution(logits, SamplingParams(temperature=temp, top_p=top_p))
    kept = p > 0
    mass = full[kept].sum()
    assert mass >= top_p - 1e-9 or kept.all()
    # smallest: without its least probable member the kept set falls short of top_p
    assert mass - full[kept].min() < top_p + 1e-9
    # a prefix of the most probable: nothing dropped is more probable than anything kept
    assert full[~kept].max(initial=0) <= full[kept].min()
    np.testing.assert_allclose(p[kept], full[kept] / mass, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(2, 30), elements=st.floats(-5, 5, width=32), unique=True))
def test_low_temperature_approaches_greedy(logits):
    gap = np.diff(np.sort(logits.astype(np.float64)))[-1]
    p = distribution(logits, SamplingParams(temperature=gap / 50))  # e^-50 for the runner-up
    assert p[np.argmax(logits)] > 1 - 1e-12
    assert sample(logits, SamplingParams(), None) == int(np.argmax(logits))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.8),
])  # fmt: skip
def test_draws_follow_the_restricted_softmax(params):
    logits = np.random.default_rng(0).normal(0, 1.5, 10).astype(np.float32)
    z = logits.astype(np.float64) / params.temperature
    expected = reference(logits, params)
    rng = np.random.default_rng(1234)
    n = 20000
    counts = np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=z.size)
    assert counts[expected == 0].sum() == 0
    live = expected > 0
    _, pval = stats.chisquare(counts[live], expected[live] * n)
    assert pval > 1e-3


def reference(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The restricted, renormalized softmax the plain way: sort everything, cut at k, then at the mass p."""
    z = logits.astype(np.float64) / params.temperature
    want = np.exp(z - z.max())
    order = np.argsort(-z, kind="stable")
    keep = order[: params.top_k or z.size]
    want_k = np.zeros_like(want)
    want_k[keep] = want[keep] / want[keep].sum()
    cum = np.cumsum(want_k[order])
    nucleus = order[: int(np.argmax(cum >= params.top_p - 1e-12)) + 1]
    expected = np.zeros_like(want)
    expected[nucleus] = want_k[nucleus] / want_k[nucleus].sum()
    return expected


@pytest.mark.parametrize("top_k", [0, 700])
def test_large_vocabulary_nucleus(top_k):
    """A nucleus of hundreds of tokens out of 5000 (past the first 64 candidates the sampler ranks)."""
    logits = np.random.default_rng(2).normal(0, 1, 5000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=0.5)
    p = distribution(logits, params)
    assert (p > 0).sum() > 150
    np.testing.assert_allclose(p, reference(logits, params), rtol=1e-9, atol=1e-15)


def test_same_seed_same_tokens():
    logits = np.random.default_rng(5).normal(size=(30, 64)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=20, seed=9)
    draw = lambda seed: [sample(row, params, np.random.default_rng(seed)) for row in logits]  # noqa: E731
    assert draw(9) == draw(9)
    assert draw(9) != draw(10)


def test_stop_conditions():
    p = SamplingParams(max_new_tokens=5, stop_token_ids=(7,), stop_sequences=((3, 4),))
    assert stop_reason([1, 2], p) is None
    assert stop_reason([1, 7], p) == "stop"
    assert stop_reason([3, 4], p) == "stop"
    assert stop_reason([4, 3], p) is None
    assert stop_reason([1, 2, 3, 5, 6], p) == "length"


@pytest.mark.parametrize("kw, msg", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop_sequences": ((),)}, "stop sequence"),
])  # fmt: skip
def test_bad_params_are_clear_errors(kw, msg):
    with pytest.raises(InputError, match=msg):
        SamplingParams(**kw)
