"""Executors: the ref executor finds @paged_step in a ref artifact, a function of another signature is a clear
error naming what is expected, pools follow the function's argument types; the cpu executor
gives HF's greedy tokens and the reference's sampled ones."""

from __future__ import annotations

import numpy as np
import pytest

import r1c
from r1c.artifact import ArtifactError
from r1c.inference import Engine, SamplingParams, executor_for
from r1c.inference.executor import RefExecutor


def test_ref_artifact_runs_its_paged_step(tiny_ref):
    assert tiny_ref.entry == "forward"
    ex = executor_for(tiny_ref.path)
    assert ex.signature.fn.name == "paged_step" and ex.signature.vocab_size == 512
    (pool,) = ex.new_pools(6, 4)
    assert pool.shape == (3, 6, 4, 40) and pool.dtype == np.float32


@pytest.mark.parametrize("entry", ["forward", "decode", "loss"])
def test_other_functions_are_refused(tiny, entry):
    m, w = tiny
    with pytest.raises(ArtifactError, match=rf"@{entry} is not a paged step function .*expected a paged step"):
        RefExecutor(m, w, entry)


def test_quantized_pools_follow_the_signature(tiny):
    from r1c.passes import PassManager

    m, w = tiny
    q = PassManager("canonicalize,cse,dce,kv-quant{dtype=int8}").run(m)
    ex = executor_for(q, weights=w)
    codes, scales = ex.new_pools(5, 4)
    assert codes.shape[:3] == scales.shape[:3] == (3, 5, 4) and codes.dtype == np.int8 and scales.dtype == np.float32
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, n).tolist() for n in (4, 7)]
    out = Engine(ex, page_size=4, num_pages=12).generate(prompts, SamplingParams(max_new_tokens=6))
    assert [len(o) for o in out] == [6, 6]


def test_unknown_target_is_refused(tiny_ref, monkeypatch):
    monkeypatch.setitem(tiny_ref.manifest, "target", "tpu")
    with pytest.raises(ArtifactError, match="no inference executor for target 'tpu'"):
        executor_for(tiny_ref)


@pytest.fixture(scope="module")
def tiny_cpu(tiny, tmp_path_factory):
    m, w = tiny
    try:
        return r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path_factory.mktemp("cpu"),
                           options={"entry": "paged_step"})  # fmt: skip
    except Exception as e:  # the paged ops' TVM lowering is written separately; without it the cpu variant waits
        if "no lowering" in str(e):
            pytest.skip(f"the cpu backend cannot compile paged_step yet: {e}")
        raise


def test_cpu_engine_matches_hf_and_ref(tiny_cpu, tiny_ref, hf_tokens):
    prompts, want = hf_tokens
    engine = Engine(tiny_cpu, page_size=4, num_pages=48, max_batch=3)
    assert engine.executor.target == "cpu"
    assert engine.generate(prompts, SamplingParams(max_new_tokens=len(want[0]))) == want
    sampled = [SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=i) for i in range(len(prompts))]
    got = Engine(tiny_cpu, page_size=4).generate(prompts, sampled)
    assert got == Engine(tiny_ref, page_size=4).generate(prompts, sampled)


class Fixed:
    """The ref executor posing as a static-shape build that fixes some roles (as `--shapes` does for cpu)."""

    def __init__(self, inner, fixed):
        self.inner, self.fixed = inner, fixed
        self.signature, self.target = inner.signature, "fixed"
        self.new_pools, self.step = inner.new_pools, inner.step


def test_a_build_that_fixes_shapes_sets_the_engine(tiny_ref):
    ex = Fixed(executor_for(tiny_ref), {"page_size": 4, "pages": 10, "table": 3})
    engine = Engine(ex)
    assert (engine.page_size, engine.num_pages, engine.max_seq_len, engine.table_width) == (4, 10, 12, 3)
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20))[0]) == 9  # the context limit
    with pytest.raises(r1c.api.InputError, match="compiled for a page size of 4, asked for 8"):
        Engine(ex, page_size=8)
    with pytest.raises(r1c.api.InputError, match=r"max_seq_len must be in \[2, 12\]"):
        Engine(ex, max_seq_len=13)
    with pytest.raises(ArtifactError, match="fixes the batch to 1; compile without binding B"):
        Engine(Fixed(ex.inner, {"batch": 1}))


def test_a_compiled_forward_is_refused_with_a_hint(tiny_ref):
    from r1c.inference.executor import compiled_signature

    with pytest.raises(
        ArtifactError, match=r"@forward is not a paged step function.*compile it with --entry paged_step"
    ):
        compiled_signature(tiny_ref)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "fp8e4m3"])
def test_cpu_engine_with_quantized_pools(tiny, tmp_path, dtype):
    """kv-quant's codes + scales pools through the cpu executor (fp8 results come back copied, not in place): the
    same tokens as the interpreter running the same rewritten module."""
    from r1c.passes import PassManager

    m, w = tiny
    pipeline = f"canonicalize,cse,dce,kv-quant{{dtype={dtype}}}"
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path, options={"entry": "paged_step", "passes": pipeline})
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 512, n).tolist() for n in (3, 7, 7, 12)]
    params = SamplingParams(max_new_tokens=10)
    ref = executor_for(PassManager(pipeline).run(m), weights=w)
    want = Engine(ref, page_size=4, num_pages=32).generate(prompts, params)
    assert Engine(art, page_size=4, num_pages=32).generate(prompts, params) == want


def test_step_outputs_and_greedy_batches_ask_for_the_argmax(tiny_ref):
    """`out`: every position, the last one, or its argmax (what an all-greedy batch asks for, so a GPU executor
    moves B ids instead of B x V logits); a mixed batch asks for the last position's logits."""
    ex = executor_for(tiny_ref)
    tokens = np.random.default_rng(4).integers(0, 512, (2, 5)).astype(np.int32)
    table, start = np.array([[0, 1], [2, 3]], np.int32), np.zeros(2, np.int32)
    outs = {o: ex.step(tokens, ex.new_pools(4, 4), table, start, out=o)[0] for o in ("all", "last", "argmax")}
    assert outs["all"].shape == (2, 5, 512)
    np.testing.assert_array_equal(outs["last"], outs["all"][:, -1:])
    np.testing.assert_array_equal(outs["argmax"], outs["all"][:, -1].argmax(axis=-1))
    with pytest.raises(ValueError, match="step output must be one of all, last, argmax"):
        ex.step(tokens, ex.new_pools(4, 4), table, start, out="probs")
    engine, asked = Engine(tiny_ref, page_size=4), []
    inner = engine.executor.step
    engine.executor.step = lambda *a, out="all": asked.append(out) or inner(*a, out=out)
    greedy, sampled = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=2, temperature=0.8, seed=1)
    engine.generate([[1, 2, 3], [4, 5, 6]], [greedy, greedy])
    assert asked == ["argmax", "argmax"]
    engine.generate([[1, 2, 3], [4, 5, 6]], [greedy, sampled])
    assert asked[2:] == ["last", "last"]
