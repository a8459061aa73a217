"""sparse-attention-tiling: the tiled ops against the dense ones, block-map counts against closed forms, and the
pass on random models and on r1-tiny."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import r1c
from r1c import build
from r1c.ir import interpreter, registry
from r1c.ir.ops.attention_tiled import FULL, PARTIAL, visited_tiles
from r1c.passes import compare_modules, run_pipeline
from r1c.passes.registry import PipelineError

TILES = {"layout_block": 0, "layout": ()}


def _qkv(rng, b, h, hkv, sq, skv, d=8, dv=6):
    return (
        rng.standard_normal((b, h, sq, d)),
        rng.standard_normal((b, hkv, skv, d)),
        rng.standard_normal((b, hkv, skv, dv)),
    )


def _structured_map(q, k, a):
    return registry.get("attention_block_map").reference([q, k], a)


@st.composite
def _config(draw):
    skv = draw(st.integers(1, 40))
    sq = draw(st.integers(1, skv))  # queries are the newest tokens (prefill with a prefix, or decode)
    window = draw(st.sampled_from([0, 1, 3, 7, 16]))
    sinks = draw(st.sampled_from([0, 1, 4])) if window else 0
    hkv = draw(st.sampled_from([1, 2]))
    return {
        "sq": sq,
        "skv": skv,
        "hkv": hkv,
        "h": hkv * draw(st.sampled_from([1, 3])),  # GQA / MQA
        "causal": draw(st.booleans()) or bool(window),
        "window": window,
        "sinks": sinks,
        "block_q": draw(st.sampled_from([1, 3, 4, 8, 16])),
        "block_k": draw(st.sampled_from([1, 2, 5, 8, 64])),
    }


@settings(max_examples=60, deadline=None)
@given(_config(), st.integers(0, 2**31))
def test_tiled_attention_equals_attention(c, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, 2, c["h"], c["hkv"], c["sq"], c["skv"])
    mask = {"causal": c["causal"], "window": c["window"], "sinks": c["sinks"]}
    (want,) = registry.get("attention").reference([q, k, v], {"scale": 0.4, **mask})
    a = {"block_q": c["block_q"], "block_k": c["block_k"], **mask, **TILES}
    block_map, counts = _structured_map(q, k, a)
    (got,) = registry.get("tiled_attention").reference([q, k, v, block_map, counts], {"scale": 0.4, **a})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The closed form that the cost rule and the pass use counts the same non-empty tiles as the map.
    assert visited_tiles(c["sq"], c["skv"], a) == counts.sum()


def test_a_tile_wrongly_marked_full_or_dropped_changes_the_result():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 2, 2, 16, 16)
    a = {"block_q": 4, "block_k": 4, "causal": True, "window": 0, "sinks": 0, **TILES}
    block_map, counts = _structured_map(q, k, a)
    tiled = registry.get("tiled_attention").reference
    (good,) = tiled([q, k, v, block_map, counts], {"scale": 0.5, **a})
    wrong = block_map.copy()
    wrong[0, 1, 1, 1] = FULL  # the diagonal tile of q tile 1
    assert block_map[0, 1, 1, 1] == PARTIAL
    assert not np.allclose(tiled([q, k, v, wrong, counts], {"scale": 0.5, **a})[0], good)
    fewer = counts.copy()
    fewer[0, 2] -= 1
    assert not np.allclose(tiled([q, k, v, block_map, fewer], {"scale": 0.5, **a})[0], good)


@pytest.mark.parametrize("n,b", [(8, 4), (64, 64), (17, 8)])
def test_causal_map_matches_closed_form(n, b):
    s = n * b
    q, k, _ = _qkv(np.random.default_rng(0), 1, 1, 1, s, s)
    block_map, counts = _structured_map(
        q, k, {"block_q": b, "block_k": b, "causal": True, "window": 0, "sinks": 0, **TILES}
    )
    kinds = block_map[..., 1]
    assert counts.sum() == n * (n + 1) // 2
    assert (kinds == FULL).sum() == n * (n - 1) // 2 and (kinds == PARTIAL).sum() == n  # the diagonal is partial
    assert (block_map[0, :, :, 0][kinds[0] > 0] <= np.repeat(np.arange(n), counts[0])).all()


@pytest.mark.parametrize("n,b,w", [(16, 4, 8), (64, 64, 1024), (10, 8, 32)])
def test_window_map_matches_closed_form(n, b, w):
    """Window w (a multiple of the tile b): q tile t sees k tiles t - w/b .. t, the first of them partially."""
    s = n * b
    q, k, _ = _qkv(np.random.default_rng(0), 1, 1, 1, s, s)
    a = {"block_q": b, "block_k": b, "causal": True, "window": w, "sinks": 0, **TILES}
    block_map, counts = _structured_map(q, k, a)
    r = w // b
    t = np.arange(n)
    np.testing.assert_array_equal(counts[0], np.minimum(t, r) + 1)
    assert (block_map[0, :, :, 1] == PARTIAL).sum() == n + max(n - r, 0)  # diagonal + window edge
    assert visited_tiles(s, s, a) == sum(min(i, r) + 1 for i in range(n))


def test_skip_fractions_at_4096():
    """The numbers the docs quote: 64x64 tiles at S=4096."""
    n = 4096 // 64
    causal = {"block_q": 64, "block_k": 64, "causal": True, "window": 0, "sinks": 0, **TILES}
    assert 1 - visited_tiles(4096, 4096, causal) / n**2 == pytest.approx(1 - (n + 1) / (2 * n))  # 49.2%
    window = {**causal, "window": 1024}
    assert visited_tiles(4096, 4096, window) == sum(min(i, 16) + 1 for i in range(n))  # 76.8% skipped


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(0, 10),
    st.integers(1, 12),
    st.sampled_from([1, 4, 8]),
    st.sampled_from([1, 3, 8]),
    st.integers(0, 2**31),
)
def test_tiled_dsa_equals_dsa(sq, prefix, topk, bq, bk, seed):
    rng = np.random.default_rng(seed)
    skv = sq + prefix
    q, k, v = _qkv(rng, 2, 4, 1, sq, skv)
    idx = rng.integers(-1, skv, (2, sq, topk)).astype(np.int32)
    (want,) = registry.get("dsa_attention").reference([q, k, v, idx], {"scale": 0.3})
    block_map, counts = registry.get("dsa_block_map").reference([idx, k], {"block_q": bq, "block_k": bk})
    tiled = registry.get("tiled_dsa_attention").reference
    (got,) = tiled([q, k, v, idx, block_map, counts], {"scale": 0.3, "block_q": bq, "block_k": bk})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_dsa_selecting_every_key_is_causal_attention():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 4, 2, 9, 12)
    idx = np.broadcast_to(rng.permutation(12).astype(np.int32), (2, 9, 12)).copy()
    (dsa,) = registry.get("dsa_attention").reference([q, k, v, idx], {"scale": 0.3})
    (dense,) = registry.get("attention").reference([q, k, v], {"scale": 0.3, "causal": True, "window": 0, "sinks": 0})
    np.testing.assert_allclose(dsa, dense, atol=1e-12)


def test_dsa_index_out_of_range_is_an_error():
    q, k, v = _qkv(np.random.default_rng(3), 1, 2, 1, 4, 4)
    idx = np.full((1, 4, 2), 4, dtype=np.int32)
    with pytest.raises(ValueError, match="DSA index 4 is out of range for 4 keys"):
        registry.get("dsa_attention").reference([q, k, v, idx], {"scale": 0.3})


def test_block_sparse_full_layout_is_causal_attention_and_tiles_skip():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 2, 1, 12, 12)
    full = tuple(x for i in range(3) for j in range(3) for x in (i, j))
    a = {"scale": 0.3, "causal": True, "window": 0, "sinks": 0, "layout_block": 4, "layout": full}
    (bs,) = registry.get("block_sparse_attention").reference([q, k, v], a)
    (dense,) = registry.get("attention").reference([q, k, v], {"scale": 0.3, "causal": True, "window": 0, "sinks": 0})
    np.testing.assert_allclose(bs, dense, atol=1e-12)
    diag = {**a, "layout": (0, 0, 1, 1, 2, 2), "block_q": 4, "block_k": 4}
    block_map, counts = _structured_map(q, k, {n: x for n, x in diag.items() if n != "scale"})
    np.testing.assert_array_equal(counts, [[1, 1, 1]])
    (want,) = registry.get("block_sparse_attention").reference(
        [q, k, v], {n: x for n, x in diag.items() if "block_" not in n}
    )
    (got,) = registry.get("tiled_attention").reference([q, k, v, block_map, counts], diag)
    np.testing.assert_allclose(got, want, atol=1e-12)


def _attention_module(h, hkv, causal, window, sinks):
    mb = build.ModuleBuilder("m")
    f = mb.function(
        "forward",
        q=build.tensor("f32", ["B", h, "S", 8]),
        k=build.tensor("f32", ["B", hkv, "S", 8]),
        v=build.tensor("f32", ["B", hkv, "S", 8]),
    )
    q, k, v = f.args
    o1 = f.attention(q, k, v, scale=0.3, causal=causal, window=window, sinks=sinks)
    o2 = f.attention(f.tanh(q), k, v, scale=0.2, causal=causal, window=window, sinks=sinks)
    f.ret(f.add(o1, o2))
    return mb.build()


@settings(max_examples=25, deadline=None)
@given(_config(), st.integers(1, 3))
def test_pass_preserves_reference_on_random_models(c, b):
    m = _attention_module(c["h"], c["hkv"], c["causal"], c["window"], c["sinks"])
    pipeline = f"sparse-attention-tiling{{block_q={c['block_q']},block_k={c['block_k']}}}"
    out = run_pipeline(m, pipeline, verify_each=True)
    names = [op.name for op in out.main.body]
    assert names.count("tiled_attention") == (2 if c["causal"] else 0)
    assert names.count("attention_block_map") == (1 if c["causal"] else 0)  # one map serves both
    assert compare_modules(m, out, {"B": b, "S": c["skv"]}, seed=c["sq"]) < 1e-5


def test_r1_tiny_pipeline_keeps_numerics_across_tiles():
    m = r1c.load("examples/r1-tiny.r1", overrides={"num_layers": 2})
    out = run_pipeline(m, "sparse-attention-tiling{block_q=4,block_k=4}", verify_each=True)
    assert [op.name for op in out.main.body].count("tiled_attention") == 2
    assert compare_modules(m, out, {"B": 2, "S": 11}) < 1e-5  # 3 q tiles, the last one padded
    bound = run_pipeline(out, 'shape-inference{bind="S=11"}')
    (block_map,) = [op for op in bound.main.body if op.name == "attention_block_map"]
    assert block_map.results[0].type.shape == (1, 3, 3, 2)  # S_cdiv4 became ceil(11/4)


def test_gradient_through_tiled_attention_is_the_dense_one():
    m = r1c.load("examples/r1-tiny.r1", overrides={"num_layers": 1})
    tiled = run_pipeline(m, "sparse-attention-tiling{block_q=4,block_k=4}")
    before, after = (run_pipeline(x, "grad") for x in (m, tiled))
    weights = interpreter.init_weights(m, seed=0)
    f = before.functions["loss_grad"]
    inputs = interpreter.random_inputs(before, f, {"B": 1, "S": 9}, seed=0)
    want = interpreter.run(before, inputs, weights, function="loss_grad")
    got = interpreter.run(after, inputs, weights, function="loss_grad")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4)


def test_bad_options_and_maps_are_errors():
    m = _attention_module(2, 1, True, 0, 0)
    with pytest.raises(PipelineError, match="block_q and block_k must be > 0"):
        run_pipeline(m, "sparse-attention-tiling{block_q=0}")
    mb = build.ModuleBuilder("bad")
    f = mb.function("forward", q=build.tensor("f32", [1, 2, 16, 8]), k=build.tensor("f32", [1, 2, 16, 8]))
    q, k = f.args
    block_map, counts = f.attention_block_map(q, k, block_q=8, block_k=8)
    with pytest.raises(build.BuildError, match="q tiles of block_map mismatch: 2 vs 4"):
        f.tiled_attention(q, k, k, block_map, counts, scale=0.1, block_q=4, block_k=8)
