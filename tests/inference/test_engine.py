"""The engine on r1-tiny (reference target): batched, one-at-a-time and staggered arrivals give the same tokens
(greedy, and sampled with the same seeds), stop conditions, the context limit, a pool too small for everyone
(requests queue, running ones are preempted and recomputed, none lost), refusals, abort."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.api import InputError
from r1c.inference import Engine, SamplingParams

LENGTHS = (3, 8, 8, 13, 5)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(0, 512, n).tolist() for n in LENGTHS]


def sampled(i: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=8 + i, temperature=0.9, top_k=50, top_p=0.95, seed=100 + i)


def one_at_a_time(art, prompts, params):
    return [Engine(art, page_size=4, num_pages=32).generate([p], [sp])[0] for p, sp in zip(prompts, params)]


def staggered(art, prompts, params, max_batch=3):
    """A new request every other step, while earlier ones decode (continuous batching)."""
    engine = Engine(art, page_size=4, num_pages=32, max_batch=max_batch)
    out: dict[int, list[int]] = {}
    ids, pending = [], list(zip(prompts, params))
    for step in range(1000):
        if pending and step % 2 == 0:
            ids.append(engine.add_request(*pending.pop(0)))
        if not (pending or engine.has_work()):
            break
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token)
    return [out[i] for i in ids]


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_batched_unbatched_staggered_agree(tiny_ref, prompts, kind):
    params = [SamplingParams(max_new_tokens=8 + i) if kind == "greedy" else sampled(i) for i in range(len(prompts))]
    batched = Engine(tiny_ref, page_size=4, num_pages=32).generate(prompts, params)
    assert [len(o) for o in batched] == [sp.max_new_tokens for sp in params]
    assert one_at_a_time(tiny_ref, prompts, params) == batched
    assert staggered(tiny_ref, prompts, params) == batched


def test_sampling_depends_on_the_seed(tiny_ref, prompts):
    engine = Engine(tiny_ref, page_size=4, num_pages=32)
    a, b, c = engine.generate([prompts[0]] * 3, [sampled(0), sampled(0), sampled(1)])
    assert a == b[: len(a)] and a != c[: len(a)]


def test_pool_too_small_for_everyone(tiny_ref, prompts):
    """12 pages of 4 tokens for five requests that reach 11..25 tokens: requests wait, running ones get preempted
    and recomputed, and every request still gets exactly the tokens it gets with room to spare."""
    params = [SamplingParams(max_new_tokens=8 + i) for i in range(len(prompts))]
    want = Engine(tiny_ref, page_size=4, num_pages=64).generate(prompts, params)
    engine = Engine(tiny_ref, page_size=4, num_pages=12, max_batch=5)
    assert engine.generate(prompts, params) == want
    assert engine.stats.preemptions > 0
    assert engine.pages.free_pages == 12 and not engine.has_work()


def test_pages_grow_with_the_request(tiny_ref):
    engine = Engine(tiny_ref, page_size=4, num_pages=32)
    rid = engine.add_request(list(range(5)), SamplingParams(max_new_tokens=20))
    held = []
    for _ in range(6):
        engine.step()
        held.append(len(engine.pages.pages(rid)))
    assert held == [2, 2, 2, 2, 3, 3]  # 5, 6, 7, 8, 9, 10 tokens cached


def test_stop_token_and_sequence(tiny_ref, prompts):
    free = Engine(tiny_ref, page_size=4).generate([prompts[1]], SamplingParams(max_new_tokens=12))[0]
    engine = Engine(tiny_ref, page_size=4)
    by_token = SamplingParams(max_new_tokens=12, stop_token_ids=(free[4],))
    first = free.index(free[4]) + 1
    assert engine.generate([prompts[1]], by_token)[0] == free[:first]
    by_seq = SamplingParams(max_new_tokens=12, stop_sequences=((free[6], free[7]), (999,)))
    rid = engine.add_request(prompts[1], by_seq)
    events = [ev for _ in range(12) for ev in engine.step()]
    assert [ev.token for ev in events] == free[:8]
    assert [ev.finish_reason for ev in events] == [None] * 7 + ["stop"] and events[-1].request_id == rid


def test_context_limit_ends_with_length(tiny_ref, prompts):
    engine = Engine(tiny_ref, page_size=4, max_seq_len=12)
    rid = engine.add_request(prompts[1], SamplingParams(max_new_tokens=50))  # 8 prompt tokens: room for 4
    events = [ev for _ in range(10) for ev in engine.step()]
    assert [ev.finish_reason for ev in events] == [None, None, None, "length"] and events[0].request_id == rid
    with pytest.raises(InputError, match="no room"):
        engine.add_request(list(range(12)))


def test_refusals(tiny_ref):
    engine = Engine(tiny_ref, page_size=4, num_pages=4)
    with pytest.raises(InputError, match="can never fit"):
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=15))  # 17 tokens cached: 5 pages
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=14))  # 16 tokens: fits exactly
    with pytest.raises(InputError, match="out of range"):
        engine.add_request([1, 512])
    with pytest.raises(InputError, match="at least one token"):
        engine.add_request([])


def test_abort_frees_pages(tiny_ref, prompts):
    engine = Engine(tiny_ref, page_size=4, num_pages=16)
    a = engine.add_request(prompts[3], SamplingParams(max_new_tokens=30))
    b = engine.add_request(prompts[0], SamplingParams(max_new_tokens=30))
    engine.step()
    engine.step()
    assert engine.abort(a) and not engine.abort(a) and not engine.abort(12345)
    assert engine.pages.pages(a) == [] and [r.id for r in engine.running] == [b]
    c = engine.add_request(prompts[1])
    assert engine.abort(c) and not engine.waiting
    out = [ev for _ in range(3) for ev in engine.step()]
    assert {ev.request_id for ev in out} == {b}


def test_a_step_prefills_by_length_and_decodes_everyone_running(tiny_ref, prompts):
    engine = Engine(tiny_ref, page_size=4, max_batch=4)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=5))
    calls = []
    engine.executor.step = record(engine.executor.step, calls)
    engine.step()  # admits 4 (max_batch): lengths 3, 8, 8, 13 -> three prefill calls, no decode yet
    assert calls == [(1, 3), (2, 8), (1, 13)] and len(engine.waiting) == 1
    engine.step()  # one decode call for the four running
    assert calls[3:] == [(4, 1)]
    for _ in range(4):
        engine.step()  # the first four finish at their fifth token; the fifth request is admitted then
    assert calls[-2:] == [(4, 1), (1, 5)] and len(engine.running) == 1


def record(step, calls):
    def wrapped(tokens, pools, table, start, out="all"):
        calls.append(tokens.shape)
        return step(tokens, pools, table, start, out=out)

    return wrapped


@pytest.mark.parametrize("chunk", [1, 3, 5])
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_chunked_prefill_gives_the_same_tokens(tiny_ref, prompts, chunk, kind):
    """Prompts fed a chunk at a time (across steps, beside other requests' decoding; with a small pool, also through
    preemptions) give the tokens of whole-prompt prefill."""
    params = [SamplingParams(max_new_tokens=8 + i) if kind == "greedy" else sampled(i) for i in range(len(prompts))]
    want = Engine(tiny_ref, page_size=4, num_pages=32).generate(prompts, params)
    engine = Engine(tiny_ref, page_size=4, num_pages=32, max_batch=3, prefill_chunk=chunk)
    assert engine.generate(prompts, params) == want
    small = Engine(tiny_ref, page_size=4, num_pages=7, max_batch=3, prefill_chunk=chunk)
    assert small.generate(prompts, params) == want
    assert small.stats.preemptions > 0


def test_a_long_prompt_is_spread_over_steps_while_others_decode(tiny_ref, prompts):
    engine = Engine(tiny_ref, page_size=4, max_batch=4, prefill_chunk=4)
    first = engine.add_request(prompts[0], SamplingParams(max_new_tokens=20))  # 3 tokens: one chunk
    calls = []
    engine.executor.step = record(engine.executor.step, calls)
    assert [ev.request_id for ev in engine.step()] == [first]
    long = engine.add_request(prompts[3], SamplingParams(max_new_tokens=2))  # 13 tokens: chunks of 4, 4, 4, 1
    seen = [[ev.request_id for ev in engine.step()] for _ in range(4)]
    assert calls == [(1, 3), (1, 4), (1, 1), (1, 4), (1, 1), (1, 4), (1, 1), (1, 1), (1, 1)]
    assert seen == [[first], [first], [first], [long, first]]  # the long prompt's first token after its last chunk
    with pytest.raises(InputError, match="prefill_chunk must be at least 1 token, got 0"):
        Engine(tiny_ref, prefill_chunk=0)
