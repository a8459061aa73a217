"""Acceptance: the engine's greedy tokens for r1-tiny (f32, reference target, batched, prompts of different lengths)
are HF transformers' `generate(do_sample=False)` tokens on the same weights (the cpu target's: test_executor.py)."""

from __future__ import annotations

from r1c.inference import Engine, SamplingParams


def test_greedy_equals_hf_generate(tiny_ref, hf_tokens):
    prompts, want = hf_tokens
    # page_size 4: every row crosses several page boundaries; max_batch 3: the fourth prompt waits for a slot
    engine = Engine(tiny_ref, page_size=4, num_pages=48, max_batch=3)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=len(want[0])))
    assert got == want
    assert all(len(set(o)) > 3 for o in got)  # not a degenerate repeat of one token
