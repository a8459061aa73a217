"""The cpu lowerings of the sparse-attention ops (backends/cpu/relax_attention.py) against the reference interpreter:
window/sinks attention, block-sparse and DSA attention, the block maps, and the flash kernel over them (it visits
only the tiles a map lists: a hand-made map that leaves tiles out changes the result exactly as the reference's
does), at shapes whose lengths are not whole tiles, with Sq < Skv, from one symbolic build; r1-tiny tiled end to end.
Builds are shared (module-scoped fixtures, several ops per module): a TVM build costs seconds here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import r1c  # noqa: E402
from r1c.backends.cpu.lower import LoweringError  # noqa: E402
from r1c.backends.cpu.relax_ops import LOWERINGS  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.ops.attention_tiled import map_columns  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402

EXAMPLES = Path(__file__).parents[3] / "examples"
NO_PASSES = {"passes": ""}
LAYOUT = "[0,0,1,0,1,1,2,2,3,0,3,3]"


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def compile_text(text: str, out_dir: Path):
    m = parse_module(text, "test.ir")
    return m, r1c.compile(m, target="cpu", weights={}, out_dir=out_dir, options=NO_PASSES)


def check(m, art, inputs: list[np.ndarray], tol: float = 2e-6) -> None:
    got, want = art.run(inputs), run(m, inputs, {})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if w.dtype.kind == "f":
            assert np.isfinite(g).all() and rel(g, w) < tol
        else:
            np.testing.assert_array_equal(g, w)


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def qkv(rng: np.random.Generator, b: int, sq: int, skv: int, h: int = 4, hkv: int = 2) -> list[np.ndarray]:
    return [randn(rng, b, h, sq, 8), randn(rng, b, hkv, skv, 8), randn(rng, b, hkv, skv, 6)]


# Structured masks: GQA (4 query heads on 2 kv heads), queries S aligned to the end of the keys T.
STRUCTURED = f"""module @m {{
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,T,8], %v: f32[B,2,T,6])
      -> (f32[B,4,S,6], f32[B,4,S,6], f32[B,4,S,6], f32[B,4,S,6], f32[B,4,S,6], f32[B,4,S,6], f32[B,4,S,6],
          f32[B,4,S,6], int32[1,S_cdiv4,T_cdiv4,2], int32[1,S_cdiv4], int32[1,S_cdiv4,3,2], int32[1,S_cdiv4],
          int32[1,S_cdiv8,3,2], int32[1,S_cdiv8]) {{
    %w = attention(%q, %k, %v) {{scale=0.35, causal=true, window=5, sinks=0}} : f32[B,4,S,6]
    %ws = attention(%q, %k, %v) {{scale=0.35, causal=true, window=5, sinks=2}} : f32[B,4,S,6]
    %c = attention(%q, %k, %v) {{scale=0.35, causal=true, window=0, sinks=0}} : f32[B,4,S,6]
    %bs = block_sparse_attention(%q, %k, %v) {{scale=0.35, causal=true, window=0, sinks=0, layout_block=4,
                                               layout={LAYOUT}}} : f32[B,4,S,6]
    %m0, %n0 = attention_block_map(%q, %k) {{block_q=4, block_k=4, causal=true, window=0, sinks=0, layout_block=0,
                                            layout=[]}} : int32[1,S_cdiv4,T_cdiv4,2], int32[1,S_cdiv4]
    %t0 = tiled_attention(%q, %k, %v, %m0, %n0) {{scale=0.35, block_q=4, block_k=4, causal=true, window=0, sinks=0,
                                                 layout_block=0, layout=[]}} : f32[B,4,S,6]
    %m1, %n1 = attention_block_map(%q, %k) {{block_q=4, block_k=8, causal=true, window=5, sinks=2, layout_block=0,
                                            layout=[]}} : int32[1,S_cdiv4,3,2], int32[1,S_cdiv4]
    %t1 = tiled_attention(%q, %k, %v, %m1, %n1) {{scale=0.35, block_q=4, block_k=8, causal=true, window=5, sinks=2,
                                                 layout_block=0, layout=[]}} : f32[B,4,S,6]
    %m2, %n2 = attention_block_map(%q, %k) {{block_q=8, block_k=4, causal=false, window=0, sinks=0, layout_block=4,
                                            layout={LAYOUT}}} : int32[1,S_cdiv8,3,2], int32[1,S_cdiv8]
    %t2 = tiled_attention(%q, %k, %v, %m2, %n2) {{scale=0.35, block_q=8, block_k=4, causal=false, window=0, sinks=0,
                                                 layout_block=4, layout={LAYOUT}}} : f32[B,4,S,6]
    %m3, %n3 = attention_block_map(%q, %k) {{block_q=4, block_k=4, causal=false, window=0, sinks=0, layout_block=0,
                                            layout=[]}} : int32[1,S_cdiv4,T_cdiv4,2], int32[1,S_cdiv4]
    %t3 = tiled_attention(%q, %k, %v, %m3, %n3) {{scale=0.35, block_q=4, block_k=4, causal=false, window=0, sinks=0,
                                                 layout_block=0, layout=[]}} : f32[B,4,S,6]
    return %w, %ws, %c, %bs, %t0, %t1, %t2, %t3, %m0, %n0, %m1, %n1, %m2, %n2
  }}
}}"""

# DSA: per-batch indices (-1 = none), the dense op, the map and the tiled op; a second tiled op reads a map given as
# an argument (any subset of tiles, FULL or PARTIAL), which the kernel must follow as the reference does.
DSA = """module @m {
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,S,8], %v: f32[B,2,S,6], %idx: int32[B,S,6],
                %gm: int32[B,S_cdiv4,S_cdiv4,2], %gn: int32[B,S_cdiv4])
      -> (f32[B,4,S,6], int32[B,S_cdiv4,S_cdiv4,2], int32[B,S_cdiv4], f32[B,4,S,6], f32[B,4,S,6]) {
    %d = dsa_attention(%q, %k, %v, %idx) {scale=0.35} : f32[B,4,S,6]
    %m, %n = dsa_block_map(%idx, %k) {block_q=4, block_k=4} : int32[B,S_cdiv4,S_cdiv4,2], int32[B,S_cdiv4]
    %t = tiled_dsa_attention(%q, %k, %v, %idx, %m, %n) {scale=0.35, block_q=4, block_k=4} : f32[B,4,S,6]
    %g = tiled_dsa_attention(%q, %k, %v, %idx, %gm, %gn) {scale=0.35, block_q=4, block_k=4} : f32[B,4,S,6]
    return %d, %m, %n, %t, %g
  }
}"""

# The flash kernel follows the map it is given: tiles left out are not visited, FULL tiles are not masked.
GIVEN_MAP = """module @m {
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,T,8], %v: f32[B,2,T,6], %gm: int32[1,S_cdiv4,T_cdiv8,2],
                %gn: int32[1,S_cdiv4]) -> (f32[B,4,S,6]) {
    %t = tiled_attention(%q, %k, %v, %gm, %gn) {scale=0.35, block_q=4, block_k=8, causal=true, window=6, sinks=1,
                                               layout_block=0, layout=[]} : f32[B,4,S,6]
    return %t
  }
}"""


def random_map(rng: np.random.Generator, bm: int, nq: int, nk: int) -> tuple[np.ndarray, np.ndarray]:
    """A block map listing a random subset of the k tiles of each row, each FULL or PARTIAL, -1 padded."""
    out = np.zeros((bm, nq, nk, 2), np.int32)
    out[..., 0] = -1
    counts = np.zeros((bm, nq), np.int32)
    for b in range(bm):
        for t in range(nq):
            tiles = np.flatnonzero(rng.random(nk) < 0.6)
            counts[b, t] = len(tiles)
            out[b, t, : len(tiles), 0] = tiles
            out[b, t, : len(tiles), 1] = rng.integers(1, 3, len(tiles))
    return out, counts


def dsa_indices(rng: np.random.Generator, b: int, s: int, topk: int) -> np.ndarray:
    """Random per-row selections in [-1, S) (with -1 entries and duplicates), different for every batch row."""
    return rng.integers(-1, s, (b, s, topk)).astype(np.int32)


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    return compile_text(STRUCTURED, tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def dsa(tmp_path_factory):
    return compile_text(DSA, tmp_path_factory.mktemp("dsa"))


@pytest.mark.parametrize(
    "b,sq,skv",
    [(2, 13, 13), (1, 5, 19), (2, 7, 5), (1, 16, 16)],
    ids=["not-whole-tiles", "decode-like", "more-queries-than-keys", "whole-tiles"],
)
def test_structured_masks_match_the_reference(structured, b, sq, skv):
    """One symbolic build at four shapes: causal, window, window+sinks, block-sparse, non-causal; dense and tiled;
    with more queries than keys the first rows see nothing (zeros, as the reference)."""
    m, art = structured
    check(m, art, qkv(np.random.default_rng(sq * 100 + skv), b, sq, skv))


def test_window_changes_the_result(structured):
    """The window and sink masks are applied: they differ from plain causal attention (and from each other)."""
    m, art = structured
    w, ws, c = art.run(qkv(np.random.default_rng(1), 1, 12, 12))[:3]
    assert rel(w, c) > 1e-2 and rel(ws, w) > 1e-2


@pytest.mark.parametrize("b,s", [(2, 13), (3, 8)])
def test_dsa_matches_the_reference(dsa, b, s):
    m, art = dsa
    rng = np.random.default_rng(s)
    idx = dsa_indices(rng, b, s, 6)
    idx[0, -1] = -1  # a row that selects nothing gives zeros
    nq = -(-s // 4)
    check(m, art, [*qkv(rng, b, s, s), idx, *random_map(rng, b, nq, nq)])


def test_dsa_index_out_of_range_is_an_error(dsa):
    m, art = dsa
    rng = np.random.default_rng(0)
    idx = dsa_indices(rng, 1, 8, 6)
    idx[0, 3, 2] = 8
    with pytest.raises(Exception, match="DSA index is out of range"):
        art.run([*qkv(rng, 1, 8, 8), idx, *random_map(rng, 1, 2, 2)])


def test_tiled_kernel_visits_only_the_listed_tiles(tmp_path):
    """Random maps (tiles left out, partial tiles marked FULL): the kernel's result is the reference's for that map,
    and differs from the result with every tile listed (so a kernel that ignored the map would fail)."""
    m, art = compile_text(GIVEN_MAP, tmp_path / "a")
    for b, sq, skv, seed in ((2, 11, 21, 0), (1, 9, 9, 1)):
        rng = np.random.default_rng(seed)
        x = qkv(rng, b, sq, skv)
        gm, gn = random_map(rng, 1, -(-sq // 4), -(-skv // 8))
        check(m, art, [*x, gm, gn])
        complete = art.run([*x, *_complete_map(sq, skv)])[0]
        np.testing.assert_allclose(complete, run(m, [*x, *_complete_map(sq, skv)], {})[0], rtol=1e-5, atol=1e-6)
        assert rel(art.run([*x, gm, gn])[0], complete) > 1e-3


def _complete_map(sq: int, skv: int) -> list[np.ndarray]:
    """Every k tile listed as PARTIAL: the whole mask, what the dense op computes."""
    nq, nk = -(-sq // 4), -(-skv // 8)
    bmap = np.stack(np.broadcast_arrays(np.arange(nk)[None, None, :], 2), axis=-1).astype(np.int32)
    return [np.ascontiguousarray(np.broadcast_to(bmap, (1, nq, nk, 2))), np.full((1, nq), nk, np.int32)]


def test_float16_is_a_clear_error(tmp_path):
    text = STRUCTURED.replace("f32", "f16")
    with pytest.raises(LoweringError, match="cpu target: attention is lowered for float32 only"):
        compile_text(text, tmp_path / "a")


def test_every_sparse_attention_op_is_lowered():
    ops = {"attention", "attention_block_map", "tiled_attention", "block_sparse_attention", "dsa_attention",
           "dsa_block_map", "tiled_dsa_attention"}  # fmt: skip
    assert ops <= set(LOWERINGS)


_BUILDS: dict[tuple, tuple] = {}


# (window, sinks, (block_q, block_k)): few, so that the examples share a handful of builds.
MASKS = [(0, 0, (4, 4)), (3, 0, (4, 8)), (6, 2, (8, 4))]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mask=st.sampled_from(MASKS),
    b=st.integers(1, 2),
    sq=st.integers(1, 17),
    extra=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_tiled_matches_the_reference_property(tmp_path_factory, mask, b, sq, extra, seed):
    """Random lengths, masks and tiles: block map and tiled attention equal the reference's, and the tiled output
    equals the dense op's (builds are cached per mask and tiling, so an example usually costs no build)."""
    window, sinks, (bq, bk) = mask
    key = (window, sinks, bq, bk)
    if key not in _BUILDS:
        a = {"causal": True, "window": window, "sinks": sinks, "layout_block": 0, "layout": (), "block_q": bq,
             "block_k": bk}  # fmt: skip
        cols = map_columns("T", a)
        cols = cols if isinstance(cols, int) else f"T_cdiv{bk}"
        mask = f"causal=true, window={window}, sinks={sinks}, layout_block=0, layout=[]"
        text = f"""module @m {{
  func @forward(%q: f32[B,2,S,8], %k: f32[B,1,T,8], %v: f32[B,1,T,6])
      -> (f32[B,2,S,6], int32[1,S_cdiv{bq},{cols},2], int32[1,S_cdiv{bq}], f32[B,2,S,6]) {{
    %m, %n = attention_block_map(%q, %k) {{block_q={bq}, block_k={bk}, {mask}}} : int32[1,S_cdiv{bq},{cols},2],
                                                                                  int32[1,S_cdiv{bq}]
    %t = tiled_attention(%q, %k, %v, %m, %n) {{scale=0.4, block_q={bq}, block_k={bk}, {mask}}} : f32[B,2,S,6]
    %d = attention(%q, %k, %v) {{scale=0.4, causal=true, window={window}, sinks={sinks}}} : f32[B,2,S,6]
    return %t, %m, %n, %d
  }}
}}"""
        _BUILDS[key] = compile_text(text, tmp_path_factory.mktemp("prop"))
    m, art = _BUILDS[key]
    x = qkv(np.random.default_rng(seed), b, sq, sq + extra, h=2, hkv=1)
    check(m, art, x)
    t, *_, d = art.run(x)
    assert rel(t, d) < 2e-6


@pytest.mark.parametrize("window", [0, 6], ids=["causal", "window6-sinks2"])
def test_r1_tiny_tiled_end_to_end(window, tmp_path):
    """r1-tiny through sparse-attention-tiling (8 x 8 tiles: several per row, some skipped) on the cpu target, at
    two shapes from one build; with a window, every attention of the model gets window=6, sinks=2 first."""
    m = r1c.load(EXAMPLES / "r1-tiny.r1", overrides={"num_layers": 2})
    if window:
        for op in m.functions["forward"].body:
            if op.name == "attention":
                op.attrs.update(window=window, sinks=2)
    w = init_weights(m, 0)
    passes = "canonicalize,sparse-attention-tiling{block_q=8,block_k=8},cse,dce"
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a", options={"passes": passes})
    assert [op.name for op in art.module.functions["forward"].body].count("tiled_attention") == 2
    for shape in ((2, 19), (1, 8)):
        toks = np.random.default_rng(sum(shape)).integers(0, m.attrs["vocab_size"], shape).astype(np.int32)
        assert rel(art.run([toks])[0], run(m, [toks], w)[0]) < 1e-5
