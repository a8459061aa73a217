"""The cpu target's paged-cache lowerings (backends/cpu/relax_paged.py) against the reference interpreter:
paged_write / paged_mla_attention (f32) and paged_write_q / paged_mla_attention_kvq (int8, fp8e4m3) on block
tables in random page order with -1 past each row's pages, rows at different starts, S = 1 and S > 1, the
in-place and the copy write in one build; r1-tiny's `paged_step` (prefill, then decode steps) against the
interpreter's `paged_step` and `forward`, and its kv-quant form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import r1c  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402
from r1c.ir.types import DType, round_to  # noqa: E402
from r1c.passes.manager import run_pipeline  # noqa: E402

TINY = Path(__file__).parents[3] / "examples" / "r1-tiny.r1"
D, G = 22, 2  # pool channels: latent rank 16 + rotary dim 6; scale groups of 11 channels
# 6 heads: the attention kernel's tasks take 3 heads each (kernels_paged.head_group), sharing the staged keys


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def block_table(rng: np.random.Generator, start: list[int], steps: int, page: int, pages: int, width: int):
    """Each row's pages drawn from one random permutation of the pool (no page shared), -1 past them."""
    free = list(rng.permutation(pages))
    table = np.full((len(start), width), -1, np.int32)
    for b, s in enumerate(start):
        n = -(-(s + steps) // page)
        table[b, :n] = [free.pop() for _ in range(n)]
    return table


# (B, S, page size T, pages P, table width M, starts): prefill, decode at different starts, a step across pages,
# a row of more keys than one online-softmax block (kernels_cache.KB = 16)
CASES = [(2, 3, 4, 9, 4, [2, 9]), (3, 1, 5, 8, 3, [0, 7, 13]), (1, 6, 3, 5, 4, [0]), (2, 2, 8, 12, 6, [0, 37])]

# The old pool %pool is returned, so the layer-1 write copies it; %p1's last reader is the layer-0 write, which
# therefore writes in place. Both attentions read a written pool.
FLOAT = f"""module @m {{
  func @forward(%q: f32[B,6,S,14], %new: f32[B,S,{D}], %pool: f32[2,P,T,{D}], %table: int32[B,M],
                %start: int32[B], %w: f32[96,16])
      -> (f32[2,P,T,{D}], f32[2,P,T,{D}], f32[B,6,S,8], f32[B,6,S,8]) {{
    %p1 = paged_write(%pool, %new, %table, %start) {{layer=1}} : f32[2,P,T,{D}]
    %o1 = paged_mla_attention(%q, %p1, %table, %start, %w) {{layer=1, scale=0.3, qk_nope_head_dim=8,
        v_head_dim=8}} : f32[B,6,S,8]
    %p2 = paged_write(%p1, %new, %table, %start) {{layer=0}} : f32[2,P,T,{D}]
    %o0 = paged_mla_attention(%q, %p2, %table, %start, %w) {{layer=0, scale=0.3, qk_nope_head_dim=8,
        v_head_dim=8}} : f32[B,6,S,8]
    return %pool, %p2, %o1, %o0
  }}
}}"""


def quant_module(c: str) -> str:
    pool, scales = f"{c}[2,P,T,{D}]", f"f32[2,P,T,{G}]"
    return f"""module @m {{
  func @forward(%q: f32[B,6,S,14], %new: f32[B,S,{D}], %pool: {pool}, %scales: {scales}, %table: int32[B,M],
                %start: int32[B], %w: f32[96,16]) -> ({scales}, {pool}, {scales}, f32[B,6,S,8], f32[B,6,S,8]) {{
    %p1, %s1 = paged_write_q(%pool, %scales, %new, %table, %start) {{layer=1}} : {pool}, {scales}
    %o1 = paged_mla_attention_kvq(%q, %p1, %s1, %table, %start, %w) {{layer=1, scale=0.3, qk_nope_head_dim=8,
        v_head_dim=8}} : f32[B,6,S,8]
    %p2, %s2 = paged_write_q(%p1, %s1, %new, %table, %start) {{layer=0}} : {pool}, {scales}
    %o0 = paged_mla_attention_kvq(%q, %p2, %s2, %table, %start, %w) {{layer=0, scale=0.3, qk_nope_head_dim=8,
        v_head_dim=8}} : f32[B,6,S,8]
    return %scales, %p2, %s2, %o1, %o0
  }}
}}"""


FORMATS = {"f32": FLOAT, "int8": quant_module("int8"), "fp8": quant_module("fp8e4m3")}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def paged_build(request, tmp_path_factory):
    m = parse_module(FORMATS[request.param], "test.ir")
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path_factory.mktemp(request.param),
                      options={"passes": ""})  # fmt: skip
    return request.param, m, art


def paged_inputs(fmt: str, case: tuple, seed: int) -> list[np.ndarray]:
    b, s, t, p, width, start = case
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    table = block_table(rng, start, s, t, p, width)
    # every slot holds random data (never zeros): a read of a slot outside the row's pages would show
    if fmt == "f32":
        pools = [f(2, p, t, D)]
    elif fmt == "int8":
        pools = [rng.integers(-127, 128, (2, p, t, D)).astype(np.int8), np.abs(f(2, p, t, G)) / 100]
    else:
        pools = [round_to(f(2, p, t, D) * 50, DType.fp8e4m3), np.abs(f(2, p, t, G)) / 100]
    return [f(b, 6, s, 14), f(b, s, D) * 3, *pools, table, np.array(start, np.int32), f(96, 16)]


@pytest.mark.parametrize("case", CASES, ids=["prefill-rows", "decode-3-rows", "one-row-across-pages", "long-row"])
def test_paged_ops_match_the_reference(paged_build, case):
    fmt, m, art = paged_build
    inputs = paged_inputs(fmt, case, seed=sum(case[:5]))
    got, want = art.run(inputs), run(m, inputs, {})
    outs = len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g).astype(w.dtype)  # fp8 codes come back as float8_e4m3fn; the reference keeps float32
        assert g.shape == w.shape, i
        if i < outs - 2:  # the pools (the returned old pool untouched, codes and scales) bit for bit
            np.testing.assert_array_equal(g, w, err_msg=f"result {i}")
        else:
            assert rel(g, w) < 1e-5, (i, rel(g, w))


def test_paged_write_of_nan_and_zero_tokens(paged_build):
    """A token group with a NaN gets a NaN scale and codes 0, an all-zero token scale 0 and codes 0 (quantize_ref);
    a float pool stores them as they are."""
    fmt, m, art = paged_build
    inputs = paged_inputs(fmt, CASES[0], 3)
    inputs[1][0, 1, 4] = np.nan
    inputs[1][1, 2] = 0.0
    got, want = art.run(inputs), run(m, inputs, {})
    for i in range(len(want) - 2):  # the pools; attention over a NaN key is NaN either way
        np.testing.assert_array_equal(np.asarray(got[i]).astype(want[i].dtype), want[i], err_msg=f"result {i}")
    assert np.isnan(want[len(want) - 3]).any()  # the NaN reached the written pool (scales, or the f32 pool)


def test_paged_write_is_in_place_only_when_the_old_pool_is_dead():
    from r1c.backends.cpu.target import build_relax

    for fmt, text in FORMATS.items():
        mod, _, _ = build_relax(parse_module(text), {"passes": ""}, "cpu")
        assert mod["main"].script().count("call_tir_inplace") == 1, fmt  # the layer-0 write; layer 1 copies


def test_bad_block_tables_are_runtime_errors(paged_build):
    fmt, m, art = paged_build
    case = (2, 2, 4, 9, 3, [1, 6])
    inputs = paged_inputs(fmt, case, 5)
    table = inputs[-3]
    table[1, 0] = -1  # a page the row reaches but that does not exist
    with pytest.raises(Exception, match="names a page outside the pool"):
        art.run(inputs)
    table[1, 0] = 9
    with pytest.raises(Exception, match="names a page outside the pool"):
        art.run(inputs)
    inputs = paged_inputs(fmt, case, 5)
    inputs[-2][0] = 11  # positions 11, 12 need a fourth page: past the table of 3
    with pytest.raises(Exception, match="past its block table"):
        art.run(inputs)
    inputs[-2][0] = -1
    with pytest.raises(Exception, match="negative start"):
        art.run(inputs)


# ---- r1-tiny's paged_step ----


@pytest.fixture(scope="module")
def tiny():
    m = r1c.load(TINY)
    w = init_weights(m, 0)
    # larger weights than the init's std 0.02, so the logits are far from ties and the argmax path is meaningful
    return m, {k: (v * 4 if k.endswith("proj.weight") or "experts" in k else v) for k, v in w.items()}


def pools_for(f, page: int, pages: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random pools (unwritten slots hold garbage) of the shapes and dtypes of f's pool arguments."""
    out = []
    for a in f.args[1:-2]:
        shape = [pages if d == "P" else page if d == "T" else d for d in a.type.shape]
        x = rng.standard_normal(shape).astype(np.float32)
        if a.type.dtype == DType.int8:
            x = rng.integers(-127, 128, shape).astype(np.int8)
        elif a.type.dtype == DType.fp8e4m3:
            x = round_to(x * 50, DType.fp8e4m3)
        out.append(x)
    return out


def steps_match(m, w, art, tol: float, forward: bool = True) -> None:
    """Prefill (row 0: 6 tokens; row 1: 3 tokens and 3 of padding, which its decode steps overwrite or never
    see), then 3 greedy decode steps at starts 6 and 3 onwards: each step's logits and pools equal the
    interpreter's run of m's paged_step, and (forward) each row's last logits equal forward's over the row's
    whole sequence."""
    rng = np.random.default_rng(11)
    f = m.functions["paged_step"]
    page, pages = 4, 9
    table = block_table(rng, [0, 0], 10, page, pages, 4)  # rows reach 9 positions: 3 pages each, one -1
    pools = pools_for(f, page, pages, rng)
    ref_pools = [p.copy() for p in pools]
    rows = [list(rng.integers(0, 512, 6)), list(rng.integers(0, 512, 3))]
    tokens = np.array([rows[0], rows[1] + [7, 7, 7]], np.int32)
    start = np.zeros(2, np.int32)
    for step in range(4):
        logits, *pools = art.run([tokens, *pools, table, start])
        ref_logits, *ref_pools = run(m, [tokens, *ref_pools, table, start], w, "paged_step")
        assert rel(logits, ref_logits) < tol, (step, rel(logits, ref_logits))
        if pools[0].dtype == np.float32:  # quantized pools: codes of values within rounding of the reference's
            assert rel(pools[0], ref_pools[0]) < tol
        last = [logits[0, -1], logits[1, 2 if step == 0 else -1]]
        for b in range(2 if forward else 0):
            want = run(m, [np.array([rows[b]], np.int32)], w)[0][0, -1]
            assert rel(last[b], want) < tol, (step, b, rel(last[b], want))
        nxt = [int(x.argmax()) for x in last]
        start = np.array([len(rows[0]), len(rows[1])], np.int32)
        for b in range(2):
            rows[b].append(nxt[b])
        tokens = np.array(nxt, np.int32)[:, None]
    assert len({t for r in rows for t in r[-3:]}) > 2  # not a degenerate repeat of one token


@pytest.fixture(scope="module")
def tiny_paged(tiny, tmp_path_factory):
    m, w = tiny
    return r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path_factory.mktemp("paged"),
                       options={"entry": "paged_step"})  # fmt: skip


def test_tiny_paged_step_matches_the_reference_and_forward(tiny, tiny_paged):
    m, w = tiny
    steps_match(m, w, tiny_paged, 1e-5)


def test_tiny_paged_step_writes_a_tensor_pool_in_place(tiny, tiny_paged):
    """A pool passed as a tvm.runtime.Tensor is the buffer the step writes (every layer's write is in place):
    after the call it holds the reference's new pool, and the returned pool is the same data."""
    import tvm

    from r1c.backends.cpu.target import program

    m, w = tiny
    rng = np.random.default_rng(4)
    table, start = block_table(rng, [0, 3], 2, 4, 6, 3), np.array([0, 3], np.int32)
    pool = rng.standard_normal((3, 6, 4, 40)).astype(np.float32)
    tokens = rng.integers(0, 512, (2, 2)).astype(np.int32)
    held = tvm.runtime.tensor(pool)
    logits, out = program(tiny_paged).run([tokens, held, table, start])
    ref_logits, ref_pool = run(m, [tokens, pool, table, start], w, "paged_step")
    assert rel(logits, ref_logits) < 1e-5
    assert rel(held.numpy(), ref_pool) < 1e-5
    np.testing.assert_array_equal(out, held.numpy())


@pytest.mark.parametrize("dtype", ["int8", "fp8e4m3"])
def test_tiny_kv_quant_paged_step(tiny, tmp_path, dtype):
    """kv-quant's paged form (codes + scales pools, paged_write_q, paged_mla_attention_kvq) against the
    interpreter's run of the same rewritten module. Not against forward: quantizing the cache moves logits by
    ~1% and, where it flips an expert choice of the MoE routing, by ~60% (kv-quant's own forward does the same)."""
    m, w = tiny
    pipeline = f"canonicalize,cse,dce,kv-quant{{dtype={dtype}}}"
    opt = run_pipeline(r1c.load(TINY), pipeline)
    assert {"paged_write_q", "paged_mla_attention_kvq"} <= {op.name for op in opt.functions["paged_step"].body}
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path, options={"entry": "paged_step", "passes": pipeline})
    steps_match(opt, w, art, 1e-5, forward=False)


def test_fp8_arguments_are_codes_for_code_readers_only():
    """An fp8 argument lowers as stored codes when only kernels that decode them read it; anything else on fp8
    (TVM 0.27's fp8 arithmetic is wrong) stays a clear error."""
    from r1c.backends.cpu.lower import LoweringError
    from r1c.backends.cpu.target import build_relax

    text = """module @m {
  func @forward(%x: fp8e4m3[4,8]) -> (fp8e4m3[4,8]) {
    %z = mul(%x, %x) : fp8e4m3[4,8]
    return %z
  }
}"""
    with pytest.raises(LoweringError, match="fp8e4m3 is not supported"):
        build_relax(parse_module(text), {"passes": ""}, "cpu")
