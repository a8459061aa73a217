"""The cpu target's KV-cache and quantized-KV lowerings (backends/cpu/relax_cache.py) against the reference
interpreter: cache_write and cached_attention at per-row fill levels, quantize / dequantize / attention_kvq /
mla_attention_kvq in every format (int8 8 and 4 bits, fp8e4m3) and granularity, one build per module serving two
shapes; r1-tiny's `decode` entry (prefill, then decode steps, greedy tokens) and its kv-quant forward end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import r1c  # noqa: E402
from r1c.backends.cpu.lower import LoweringError  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402
from r1c.passes.manager import run_pipeline  # noqa: E402

TINY = Path(__file__).parents[3] / "examples" / "r1-tiny.r1"
KVQ_PIPELINE = "canonicalize,kv-quant{dtype=int8},cse,dce"


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def build(text: str, out_dir: Path):
    m = parse_module(text, "test.ir")
    return m, r1c.compile(m, target="cpu", weights={}, out_dir=out_dir, options={"passes": ""})


def check(m, art, inputs: list[np.ndarray], exact: set[int] = frozenset(), tol: float = 1e-5) -> None:
    """Results `exact` (codes, scales, dequantized values) bit for bit; the others within tol, relative."""
    got, want = art.run(inputs), run(m, inputs, {})
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g).astype(w.dtype)  # fp8 codes come back as float8_e4m3fn; the reference keeps float32
        assert g.shape == w.shape, i
        if i in exact:
            np.testing.assert_array_equal(g, w, err_msg=f"result {i}")
        else:
            assert rel(g, w) < tol, (i, rel(g, w))


RNG = np.random.default_rng(0)
F = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731


# ---- cache_write + cached_attention ----

CACHE = """module @m {
  func @forward(%q: f32[B,4,S,12], %kn: f32[B,2,S,12], %vn: f32[B,2,S,8], %kc: f32[2,B,2,C,12],
                %vc: f32[2,B,2,C,8], %start: int32[B])
      -> (f32[B,4,S,8], f32[2,B,2,C,12], f32[2,B,2,C,8], f32[B,4,S,8]) {
    %k1 = cache_write(%kc, %kn, %start) {layer=1} : f32[2,B,2,C,12]
    %v1 = cache_write(%vc, %vn, %start) {layer=1} : f32[2,B,2,C,8]
    %o = cached_attention(%q, %k1, %v1, %start) {layer=1, scale=0.35} : f32[B,4,S,8]
    %o0 = cached_attention(%q, %k1, %v1, %start) {layer=0, scale=0.35} : f32[B,4,S,8]
    return %o, %k1, %v1, %o0
  }
}"""


def cache_inputs(b: int, s: int, c: int, start: list[int]) -> list[np.ndarray]:
    # unwritten slots hold random values (never zeros): reading one past a row's fill would show
    return [F(b, 4, s, 12), F(b, 2, s, 12), F(b, 2, s, 8), F(2, b, 2, c, 12), F(2, b, 2, c, 8),
            np.array(start, np.int32)]  # fmt: skip


@pytest.fixture(scope="module")
def cache_build(tmp_path_factory):
    return build(CACHE, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("b,s,c,start", [(3, 2, 9, [0, 4, 7]), (2, 1, 5, [4, 1]), (1, 16, 40, [19])])
def test_cache_write_and_cached_attention(cache_build, b, s, c, start):
    m, art = cache_build
    check(m, art, cache_inputs(b, s, c, start), exact={1, 2})


KEEP_OLD = """module @m {
  func @forward(%q: f32[B,4,S,12], %kn: f32[B,2,S,12], %vn: f32[B,2,S,8], %kc: f32[2,B,2,C,12],
                %vc: f32[2,B,2,C,8], %start: int32[B]) -> (f32[B,4,S,8], f32[2,B,2,C,12], f32[B,4,S,8]) {
    %k1 = cache_write(%kc, %kn, %start) {layer=1} : f32[2,B,2,C,12]
    %v1 = cache_write(%vc, %vn, %start) {layer=1} : f32[2,B,2,C,8]
    %o = cached_attention(%q, %k1, %v1, %start) {layer=1, scale=0.35} : f32[B,4,S,8]
    %old = cached_attention(%q, %kc, %v1, %start) {layer=1, scale=0.35} : f32[B,4,S,8]
    return %o, %kc, %old
  }
}"""


def test_cache_write_is_in_place_only_when_the_old_cache_is_dead(cache_build, tmp_path):
    """A write whose old cache nobody reads afterwards updates it in place (call_tir_inplace: the step's rows only);
    one whose old cache is read later (here: returned, and attended over) copies, and both match the reference."""
    from r1c.backends.cpu.target import build_relax

    for text, in_place in ((CACHE, 2), (KEEP_OLD, 1)):
        mod, _, _ = build_relax(parse_module(text), {"passes": ""}, "cpu")
        assert mod["main"].script().count("call_tir_inplace") == in_place
    m, art = build(KEEP_OLD, tmp_path)
    check(m, art, cache_inputs(2, 3, 8, [1, 5]), exact={1})


def test_cache_step_outside_the_slots_is_an_error(cache_build):
    m, art = cache_build
    with pytest.raises(Exception, match="outside the cache's slots"):
        art.run(cache_inputs(2, 2, 6, [0, 5]))


# ---- quantize, dequantize, attention_kvq, mla_attention_kvq: one module per format ----

FORMATS = {"int8": ("int8", 8), "int4": ("int8", 4), "fp8": ("fp8e4m3", 8)}


def quant_module(dtype: str, bits: int) -> str:
    c = "int8" if dtype == "int8" else "fp8e4m3"
    q = f"dtype={dtype}, bits={bits}"
    mask = "block_k=64, block_q=64, layout=[], layout_block=0"
    return f"""module @m {{
  func @forward(%x: f32[B,S,3,16], %q: f32[B,4,S,8], %k: f32[B,2,T,8], %v: f32[B,2,T,8], %mq: f32[B,2,S,14],
                %lat: f32[B,T,16], %rot: f32[B,T,1,6], %w: f32[32,16])
      -> ({c}[B,S,3,16], f32[B,S,1,1], f32[B,S,3,16], {c}[B,S,3,16], f32[B,1,3,16], f32[B,S,3,16],
          f32[B,4,S,8], f32[B,4,S,8], f32[B,4,S,8], f32[B,4,S,8], f32[B,2,S,8], f32[B,2,S,8]) {{
    %tq, %ts = quantize(%x) {{{q}, granularity="per_token", token_axis=1}} : {c}[B,S,3,16], f32[B,S,1,1]
    %td = dequantize(%tq, %ts) {{dtype=f32, bits={bits}}} : f32[B,S,3,16]
    %cq, %cs = quantize(%x) {{{q}, granularity="per_channel", token_axis=1}} : {c}[B,S,3,16], f32[B,1,3,16]
    %cd = dequantize(%cq, %cs) {{dtype=f32, bits={bits}}} : f32[B,S,3,16]
    %kq, %ks = quantize(%k) {{{q}, granularity="per_channel", token_axis=2}} : {c}[B,2,T,8], f32[B,2,1,8]
    %vq, %vs = quantize(%v) {{{q}, granularity="per_token", token_axis=2}} : {c}[B,2,T,8], f32[B,2,T,1]
    %ktq, %kts = quantize(%k) {{{q}, granularity="per_token", token_axis=2}} : {c}[B,2,T,8], f32[B,2,T,1]
    %vcq, %vcs = quantize(%v) {{{q}, granularity="per_channel", token_axis=2}} : {c}[B,2,T,8], f32[B,2,1,8]
    %a0 = attention_kvq(%q, %kq, %ks, %vq, %vs) {{scale=0.4, causal=true, window=0, sinks=0,
        bits={bits}, {mask}}} : f32[B,4,S,8]
    %a1 = attention_kvq(%q, %ktq, %kts, %vcq, %vcs) {{scale=0.4, causal=false, window=0, sinks=0,
        bits={bits}, {mask}}} : f32[B,4,S,8]
    %a2 = attention_kvq(%q, %kq, %ks, %vq, %vs) {{scale=0.4, causal=true, window=3, sinks=1,
        bits={bits}, {mask}}} : f32[B,4,S,8]
    %a3 = attention_kvq(%q, %ktq, %kts, %vq, %vs) {{scale=0.4, causal=true, window=2, sinks=0,
        bits={bits}, {mask}}} : f32[B,4,S,8]
    %lq, %ls = quantize(%lat) {{{q}, granularity="per_token", token_axis=1}} : {c}[B,T,16], f32[B,T,1]
    %rq, %rs = quantize(%rot) {{{q}, granularity="per_channel", token_axis=1}} : {c}[B,T,1,6], f32[B,1,1,6]
    %lcq, %lcs = quantize(%lat) {{{q}, granularity="per_channel", token_axis=1}} : {c}[B,T,16], f32[B,1,16]
    %rtq, %rts = quantize(%rot) {{{q}, granularity="per_token", token_axis=1}} : {c}[B,T,1,6], f32[B,T,1,1]
    %m0 = mla_attention_kvq(%mq, %lq, %ls, %rq, %rs, %w) {{scale=0.3, causal=true, window=0, sinks=0, bits={bits},
        qk_nope_head_dim=8, v_head_dim=8, {mask}}} : f32[B,2,S,8]
    %m1 = mla_attention_kvq(%mq, %lcq, %lcs, %rtq, %rts, %w) {{scale=0.3, causal=false, window=0, sinks=0,
        bits={bits}, qk_nope_head_dim=8, v_head_dim=8, {mask}}} : f32[B,2,S,8]
    return %tq, %ts, %td, %cq, %cs, %cd, %a0, %a1, %a2, %a3, %m0, %m1
  }}
}}"""


# Token 0 of row 0: amax = qmax, so the scale is 1 and these are x / scale exactly: rint's ties go to even, fp8's
# ties (1.0625 between 1 and 1.125; 1.5 * 2^-9 between subnormals) too.
TIES = {
    "int8": [126.5, -3.5, 0.5, -0.5, 1.5, 127.0, 6.5, -7.5, 2.5, 0.25, -126.5, 100.49, 3.0, 7.0, 1, 2],
    "int4": [2.5, -3.5, 0.5, -0.5, 1.5, 7.0, 6.5, -6.5, 4.5, 0.25, -5.5, 5.49, 3.0, -7.0, 1, 2],
    "fp8": [1.0625, -3.25 - 2**-3, 2**-9 * 1.5, -(2**-9) * 2.5, 2**-7, 448.0, 200.0, -440.0, 2**-6, 0.25, 17.0, 19.0,
            3.0, 7.0, 1, 2],
}  # fmt: skip


def quant_inputs(fmt: str, b: int, s: int, t: int) -> list[np.ndarray]:
    x = F(b, s, 3, 16)
    x[0, 0] = np.clip(x[0, 0], -1, 1)
    x[0, 0, 1] = TIES[fmt]
    return [x, F(b, 4, s, 8), F(b, 2, t, 8), F(b, 2, t, 8), F(b, 2, s, 14), F(b, t, 16), F(b, t, 1, 6), F(32, 16)]


@pytest.fixture(scope="module", params=sorted(FORMATS))
def quant_build(request, tmp_path_factory):
    return (request.param, *build(quant_module(*FORMATS[request.param]), tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("b,s,t", [(2, 5, 7), (1, 9, 4)])  # more queries than keys too: rows that see nothing
def test_quantized_kv_ops(quant_build, b, s, t):
    fmt, m, art = quant_build
    check(m, art, quant_inputs(fmt, b, s, t), exact={0, 1, 2, 3, 4, 5})


def test_quantize_zero_and_nan_groups(quant_build):
    """A token of zeros keeps scale 0 and codes 0; a token with a NaN gets a NaN scale and codes 0."""
    fmt, m, art = quant_build
    inputs = quant_inputs(fmt, 2, 3, 4)
    inputs[0][0, 1] = 0.0
    inputs[0][1, 2, 0, 5] = np.nan
    got = art.run(inputs)
    want = run(m, inputs, {})
    for i in (0, 1):  # per-token codes and scales; NaN compares equal to NaN in assert_array_equal
        np.testing.assert_array_equal(np.asarray(got[i]).astype(want[i].dtype), want[i])
    assert got[1][0, 1].item() == 0 and np.isnan(got[1][1, 2]).all()


# ---- unsupported forms ----


def test_unsupported_forms_are_clear_errors(tmp_path):
    layout = quant_module("int8", 8).replace("layout=[], layout_block=0", "layout=[1,1,1,1], layout_block=4", 1)
    with pytest.raises(LoweringError, match="cpu target: attention_kvq with a block-sparse layout"):
        build(layout, tmp_path / "a")
    m = run_pipeline(r1c.load(TINY), "canonicalize,sparse-attention-tiling,kv-quant{dtype=int8}")
    with pytest.raises(LoweringError, match="cpu target: mla_attention_kvq with a block map"):
        r1c.compile(m, target="cpu", weights=init_weights(m, 0), out_dir=tmp_path / "b", options={"passes": ""})


# ---- r1-tiny end to end ----


@pytest.fixture(scope="module")
def tiny():
    m = r1c.load(TINY)
    w = init_weights(m, 0)
    # larger weights than the init's std 0.02, so the logits are far from ties and the argmax path is meaningful
    return m, {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in w.items()}


@pytest.fixture(scope="module")
def tiny_decode(tiny, tmp_path_factory):
    m, w = tiny
    return r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path_factory.mktemp("dec"), options={"entry": "decode"})


def empty_caches(m, batch: int, slots: int) -> list[np.ndarray]:
    k, v = m.functions["decode"].args[1:3]
    shape = lambda t: [batch if d == "B" else slots if d == "C" else d for d in t.type.shape]  # noqa: E731
    rng = np.random.default_rng(7)  # unwritten slots hold garbage: a step must never read them
    return [rng.standard_normal(shape(k)).astype(np.float32), rng.standard_normal(shape(v)).astype(np.float32)]


def test_tiny_decode_matches_the_reference_and_forward_greedy(tiny, tiny_decode):
    """Prefill, then decode steps feeding back the greedy token: the cpu logits and caches equal the interpreter's
    run of `decode` at every step, and the tokens are forward's greedy continuation."""
    m, w = tiny
    prompt = np.random.default_rng(3).integers(0, 512, (2, 6)).astype(np.int32)
    new = 5
    caches = empty_caches(m, 2, 6 + new)
    ref_caches = [c.copy() for c in caches]
    seq, start = prompt, np.zeros(2, np.int32)
    tokens = []
    for step in range(new):
        logits, *caches = tiny_decode.run([seq, *caches, start])
        ref_logits, *ref_caches = run(m, [seq, *ref_caches, start], w, "decode")
        assert rel(logits, ref_logits) < 1e-5, step
        assert all(rel(c, r) < 1e-5 for c, r in zip(caches, ref_caches))
        tokens.append(logits[:, -1].argmax(-1).astype(np.int32))
        start = start + seq.shape[1]
        seq = tokens[-1][:, None]
    full = prompt
    for t in tokens:  # forward over the whole sequence each step: no cache
        np.testing.assert_array_equal(run(m, [full], w)[0][:, -1].argmax(-1), t)
        full = np.concatenate([full, t[:, None]], axis=1)
    assert len({int(x) for t in tokens for x in t}) > 2  # not a degenerate repeat of one token


def test_tiny_decode_rows_at_different_fill_levels(tiny, tiny_decode):
    m, w = tiny
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 512, 7).astype(np.int32), rng.integers(0, 512, 4).astype(np.int32)
    kc, vc = empty_caches(m, 2, 10)
    pre = np.stack([a[:6], np.r_[b[:3], 0, 0, 0].astype(np.int32)])
    _, kc, vc = tiny_decode.run([pre, kc, vc, np.zeros(2, np.int32)])  # row 1's padding lands past its fill
    logits, _, _ = tiny_decode.run([np.array([[a[6]], [b[3]]], np.int32), kc, vc, np.array([6, 3], np.int32)])
    assert rel(logits[0, 0], run(m, [a[None]], w)[0][0, -1]) < 1e-5
    assert rel(logits[1, 0], run(m, [b[None]], w)[0][0, -1]) < 1e-5


def test_tiny_kv_quant_forward(tiny, tmp_path):
    m, w = tiny
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a", options={"passes": KVQ_PIPELINE})
    opt = run_pipeline(r1c.load(TINY), KVQ_PIPELINE)
    names = {op.name for op in opt.functions["forward"].body}
    assert {"quantize", "mla_attention_kvq"} <= names
    for shape in ((2, 11), (1, 20)):  # one build, two shapes
        toks = np.random.default_rng(sum(shape)).integers(0, 512, shape).astype(np.int32)
        assert rel(art.run([toks])[0], run(opt, [toks], w)[0]) < 1e-5
