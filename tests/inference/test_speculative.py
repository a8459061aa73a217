"""Speculative decoding: greedy output is plain greedy decoding's (batched, with a draft that is mostly rejected and
with one that is always accepted), and the acceptance rule's output follows the target distribution (chi-square on
a synthetic vocabulary), sampled runs reproduce with their seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import r1c
from r1c.api import InputError
from r1c.inference import Engine, SamplingParams
from r1c.inference.speculative import accept

TINY = Path(__file__).parents[2] / "examples" / "r1-tiny.r1"


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(8)
    return [rng.integers(0, 512, n).tolist() for n in (4, 9, 9, 14)]


@pytest.fixture(scope="module")
def plain(tiny_ref, prompts):
    params = [SamplingParams(max_new_tokens=12 + 3 * i) for i in range(len(prompts))]
    return params, Engine(tiny_ref, page_size=4, num_pages=64).generate(prompts, params)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_equals_greedy(tiny_ref, draft_ref, prompts, plain, k):
    params, want = plain
    engine = Engine(tiny_ref, page_size=4, num_pages=64, max_batch=3, draft=draft_ref, speculate=k)
    assert engine.generate(prompts, params) == want
    assert engine.stats.proposed > 0 and engine.pages.free_pages == 64


def test_target_as_its_own_draft_accepts_everything(tiny_ref, prompts, plain):
    params, want = plain
    engine = Engine(tiny_ref, page_size=4, num_pages=64, draft=tiny_ref, speculate=3)
    assert engine.generate(prompts, params) == want
    assert engine.stats.acceptance_rate > 0.9  # the last round of a row proposes past its end
    assert engine.stats.tokens_per_row_step > 3


def test_speculative_with_preemption(tiny_ref, draft_ref, prompts, plain):
    params, want = plain
    engine = Engine(tiny_ref, page_size=4, num_pages=14, draft=draft_ref, speculate=2)
    assert engine.generate(prompts, params) == want
    assert engine.stats.preemptions > 0


def test_sampled_speculative_reproduces_with_seed(tiny_ref, draft_ref, prompts):
    params = [SamplingParams(max_new_tokens=10, temperature=0.8, top_k=40, seed=i) for i in range(len(prompts))]
    run = lambda batch: Engine(tiny_ref, page_size=4, max_batch=batch, draft=draft_ref, speculate=2).generate(  # noqa: E731
        prompts, params
    )
    a = run(4)
    assert run(1) == a and [len(o) for o in a] == [10] * 4


def test_acceptance_rule_follows_the_target_distribution():
    """With fixed per-position target distributions p_j and draft distributions q_j, the j-th kept token of a row is
    distributed as p_j (given that the row got that far), whatever q is."""
    rng = np.random.default_rng(0)
    v, k, n = 6, 2, 30000
    p = rng.dirichlet(np.ones(v), k + 1)
    q = rng.dirichlet(np.ones(v) * 0.5, k)
    q[0, 2] = 0.0  # a token the draft never proposes must still come out with p's probability
    q[0] /= q[0].sum()
    seen: list[list[int]] = [[] for _ in range(k + 1)]
    for _ in range(n):
        drafts = [int(rng.choice(v, p=q[j])) for j in range(k)]
        for j, tok in enumerate(accept(p, q, drafts, rng)):
            seen[j].append(tok)
    for j in range(k + 1):
        counts = np.bincount(seen[j], minlength=v)
        _, pval = stats.chisquare(counts, p[j] * counts.sum())
        assert pval > 1e-3, (j, counts / counts.sum(), p[j])
    assert 0 < len(seen[2]) < n  # some rows kept every draft (bonus token), some did not


def test_bad_draft_is_refused(tiny_ref, tmp_path):
    small = r1c.load(TINY, overrides={"num_layers": 1, "vocab_size": 300})
    other = r1c.compile(small, target="ref", out_dir=tmp_path / "small")
    with pytest.raises(InputError, match="vocabulary"):
        Engine(tiny_ref, draft=other, speculate=2)
    with pytest.raises(InputError, match="both a draft"):
        Engine(tiny_ref, speculate=2)
