"""`func decode` (causal_lm_step over a KV cache) of the bundled models, in the reference interpreter: prefill plus
decode steps give forward's logits, rows at different fill levels stay independent, and greedy decoding through
the cache yields the same tokens as Hugging Face transformers' `generate` on the same weights (f32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.ir.interpreter import init_weights, run

ROOT = Path(__file__).parents[2]
TINY = ROOT / "examples" / "r1-tiny.r1"


@pytest.fixture(scope="module")
def tiny():
    m = r1c.load(TINY)
    return m, init_weights(m, 0)


def empty_caches(m, batch: int, slots: int) -> list[np.ndarray]:
    k, v = m.functions["decode"].args[1:3]
    shape = lambda t: [batch if d == "B" else slots if d == "C" else d for d in t.type.shape]  # noqa: E731
    rng = np.random.default_rng(7)  # unwritten slots hold garbage: a step must never read them
    return [rng.standard_normal(shape(k)).astype(np.float32), rng.standard_normal(shape(v)).astype(np.float32)]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_prefill_then_steps_match_forward(tiny):
    m, w = tiny
    toks = np.random.default_rng(1).integers(0, 512, (2, 9)).astype(np.int32)
    full = run(m, [toks], w)[0]
    kc, vc = empty_caches(m, 2, 12)
    logits, kc, vc = run(m, [toks[:, :5], kc, vc, np.zeros(2, np.int32)], w, "decode")
    assert rel(logits, full[:, :5]) < 1e-6
    for t in range(5, 9):
        logits, kc, vc = run(m, [toks[:, t : t + 1], kc, vc, np.full(2, t, np.int32)], w, "decode")
        assert rel(logits[:, 0], full[:, t]) < 1e-6
    wrong, _, _ = run(m, [toks[:, 8:9], kc, vc, np.full(2, 7, np.int32)], w, "decode")  # a start one slot early
    assert rel(wrong[:, 0], full[:, 8]) > 1e-2


def test_rows_at_different_fill_levels(tiny):
    m, w = tiny
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 512, 7).astype(np.int32), rng.integers(0, 512, 4).astype(np.int32)
    kc, vc = empty_caches(m, 2, 10)
    pre = np.stack([a[:6], np.r_[b[:3], 0, 0, 0].astype(np.int32)])
    _, kc, vc = run(m, [pre, kc, vc, np.zeros(2, np.int32)], w, "decode")  # row 1's padding lands past its fill
    step = np.array([[a[6]], [b[3]]], np.int32)
    logits, _, _ = run(m, [step, kc, vc, np.array([6, 3], np.int32)], w, "decode")
    assert rel(logits[0, 0], run(m, [a[None]], w)[0][0, -1]) < 1e-6
    assert rel(logits[1, 0], run(m, [b[None]], w)[0][0, -1]) < 1e-6


def greedy(m, w, prompt: np.ndarray, new: int) -> np.ndarray:
    bsz, s = prompt.shape
    kc, vc = empty_caches(m, bsz, s + new)
    logits, kc, vc = run(m, [prompt, kc, vc, np.zeros(bsz, np.int32)], w, "decode")
    out = [logits[:, -1].argmax(-1).astype(np.int32)]
    for t in range(s, s + new - 1):
        logits, kc, vc = run(m, [out[-1][:, None], kc, vc, np.full(bsz, t, np.int32)], w, "decode")
        out.append(logits[:, 0].argmax(-1).astype(np.int32))
    return np.stack(out, 1)


def test_greedy_tokens_equal_hf_generate(tiny):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from r1c.train.torch_ref import hf_model

    m, w = tiny
    # larger weights than the init's std 0.02, so the logits are far from ties and the argmax path is meaningful
    w = {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in w.items()}
    prompt = np.random.default_rng(3).integers(0, 512, (2, 6)).astype(np.int32)
    ours = greedy(m, w, prompt, 8)
    model = hf_model(m.attrs, w).eval()
    with torch.no_grad():
        hf = model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8, pad_token_id=0)  # fmt: skip
    np.testing.assert_array_equal(ours, hf[:, 6:].numpy())
    assert len(set(ours.ravel().tolist())) > 2  # not a degenerate repeat of one token
