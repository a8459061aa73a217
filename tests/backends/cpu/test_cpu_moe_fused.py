"""The cpu lowerings of the expert-fusion ops (backends/cpu/relax_moe.py, kernels_moe.py) against the reference
interpreter: every op on random inputs at several token counts from one build (symbolic T), skewed routings (all
pairs on one expert, empty experts), a capacity that drops pairs, shared experts, grouped GEMMs over one expert
range of a split dispatch and through concatenated weights; r1-tiny and a small V2-Lite end to end through the
`expert-fusion` pass; a hypothesis property over token counts, k and expert counts for permute -> GEMM ->
unpermute; and the errors for what is not supported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import r1c  # noqa: E402
from r1c.backends.cpu.lower import LoweringError  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402

EXAMPLES = Path(__file__).parents[3] / "examples"
PASSES = "canonicalize,expert-fusion,cse,dce"
RNG = np.random.default_rng(7)


def F(*s: int) -> np.ndarray:
    return RNG.standard_normal(s).astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def compare(got: list[np.ndarray], want: list[np.ndarray], tol: float = 2e-6) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (i, g.shape, w.shape)
        if w.dtype.kind == "f":
            assert rel(g, w) < tol, (i, rel(g, w))
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"result {i}")


def build(text: str, tmp_path_factory) -> tuple:
    m = parse_module(text, "test.ir")
    out = tmp_path_factory.mktemp("moe")
    return m, r1c.compile(m, target="cpu", weights={}, out_dir=out, options={"passes": ""})


# Every fused op in one build. E=5 experts, the last one shared (ids[:, 2] == 4); D=16, F=12 (gate and up are
# concatenated along N, routed and shared along E: the lowering reads the parts in place); widths 24 and 12 are not
# whole vectors of 16. %rows/%offs are free row indices and offsets (repeats, -1s, empty groups, padding tails).
OPS = """module @m {
  func @forward(%x: f32[T,16], %ids: int32[T,3], %wt: f32[T,3], %wg: f32[4,12,16], %wu: f32[4,12,16],
                %sg: f32[1,12,16], %su: f32[1,12,16], %wd: f32[5,16,12], %z: f32[T,3,16], %rows: int32[T,3],
                %xr: f32[T*3,16], %offs: int32[6], %dy: f32[T*3,24])
      -> (f32[T*3,16], int32[6], int32[T,3], f32[T*3,24], f32[T*3,16], f32[T,16], f32[T*3,16], int32[6],
          int32[T,3], f32[T,24], f32[T,3,16], f32[T*3,16], f32[T*3,16], f32[T*3,24], f32[5,24,16], f32[2,24,16]) {
    %xs, %off, %ro = moe_permute(%x, %ids) {num_experts=5, num_shared=1, capacity_factor=0.0}
        : f32[T*3,16], int32[6], int32[T,3]
    %gu = concat(%wg, %wu) {axis=1} : f32[4,24,16]
    %sgu = concat(%sg, %su) {axis=1} : f32[1,24,16]
    %wall = concat(%gu, %sgu) {axis=0} : f32[5,24,16]
    %h = grouped_matmul(%xs, %wall, %off) {first_expert=0} : f32[T*3,24]
    %g = slice(%h) {axis=1, start=0, stop=12, step=1} : f32[T*3,12]
    %u = slice(%h) {axis=1, start=12, stop=24, step=1} : f32[T*3,12]
    %a = swiglu(%g, %u) : f32[T*3,12]
    %y = grouped_matmul(%a, %wd, %off) {first_expert=0} : f32[T*3,16]
    %o = moe_unpermute(%y, %ro, %wt) : f32[T,16]
    %cxs, %coff, %cro = moe_permute(%x, %ids) {num_experts=5, num_shared=1, capacity_factor=0.5}
        : f32[T*3,16], int32[6], int32[T,3]
    %cy = grouped_matmul(%cxs, %wall, %coff) {first_expert=0} : f32[T*3,24]
    %co = moe_unpermute(%cy, %cro, %wt) : f32[T,24]
    %gr = moe_gather_rows(%xr, %rows) : f32[T,3,16]
    %sr = moe_scatter_rows(%z, %rows) : f32[T*3,16]
    %wd23 = slice(%wd) {axis=0, start=2, stop=4, step=1} : f32[2,16,12]
    %part = grouped_matmul(%a, %wd23, %offs) {first_expert=2} : f32[T*3,16]
    %wg1 = grouped_matmul_wgrad(%dy, %xr, %offs) {first_expert=0, num_experts=5} : f32[5,24,16]
    %wg2 = grouped_matmul_wgrad(%dy, %xr, %offs) {first_expert=3, num_experts=2} : f32[2,24,16]
    return %xs, %off, %ro, %h, %y, %o, %cxs, %coff, %cro, %co, %gr, %sr, %part, %h, %wg1, %wg2
  }
}"""


@pytest.fixture(scope="module")
def ops_build(tmp_path_factory):
    return build(OPS, tmp_path_factory)


def routing(t: int, kind: str) -> np.ndarray:
    """ids [t, 3]: two routed slots (experts 0..3) and the shared expert 4."""
    if kind == "spread":
        routed = RNG.integers(0, 4, (t, 2))
    elif kind == "one_expert":  # every routed pair on expert 2: experts 0, 1, 3 empty, capacity drops most
        routed = np.full((t, 2), 2)
    else:  # two experts, one of them empty in the first half of the tokens
        routed = np.where(np.arange(t)[:, None] < t // 2, 1, RNG.choice([1, 3], (t, 2)))
    return np.concatenate([routed, np.full((t, 1), 4)], axis=1).astype(np.int32)


def op_inputs(t: int, kind: str) -> list[np.ndarray]:
    r = 3 * t
    rows = RNG.integers(-1, r, (t, 3)).astype(np.int32)  # -1s and repeated rows: scatter must add
    rows[0, :2] = [r - 1, r - 1] if t > 1 else [0, -1]
    cuts = np.sort(RNG.integers(0, r + 1, 4))
    offs = np.array([0, cuts[0], cuts[0], cuts[1], cuts[2], cuts[3]], np.int32)  # group 1 empty, padding tail
    return [F(t, 16), routing(t, kind), F(t, 3), F(4, 12, 16), F(4, 12, 16), F(1, 12, 16), F(1, 12, 16),
            F(5, 16, 12), F(t, 3, 16), rows, F(r, 16), offs, F(r, 24)]  # fmt: skip


@pytest.mark.parametrize("t,kind", [(37, "spread"), (6, "spread"), (1, "spread"), (20, "one_expert"), (9, "two")])
def test_fused_ops_match_the_reference(ops_build, t, kind):
    """One build, several token counts and routings: every result equal to the reference (offsets and row_of
    exactly; rows past the last group are zeros there, and x is never zero here)."""
    m, art = ops_build
    inputs = op_inputs(t, kind)
    want = run(m, inputs, {})
    compare(art.run(inputs), want)
    dropped = want[8] < 0
    if kind == "one_expert" and t > 2:
        assert dropped.any() and not dropped[:, 2].any()  # the capacity dropped pairs, never the shared slot


def test_runtime_index_errors(ops_build):
    """Out-of-range expert ids and row indices are errors at run time, as the reference raises."""
    _, art = ops_build
    bad = op_inputs(4, "spread")
    bad[1][0, 0] = 5
    with pytest.raises(Exception, match="expert id out of range"):
        art.run(bad)
    bad = op_inputs(4, "spread")
    bad[9][1, 1] = 12
    with pytest.raises(Exception, match="row_of out of range"):
        art.run(bad)
    bad = op_inputs(4, "spread")
    bad[11][3] = 0  # decreasing
    with pytest.raises(Exception, match="group_offsets"):
        art.run(bad)


CHAIN = """module @m {{
  func @forward(%x: f32[T,{d}], %ids: int32[T,{k}], %wt: f32[T,{k}], %w1: f32[{e},{f},{d}], %w2: f32[{e},{d},{f}])
      -> (f32[T,{d}]) {{
    %xs, %off, %ro = moe_permute(%x, %ids) {{num_experts={e}, num_shared=0, capacity_factor={cf}}}
        : f32[T*{k},{d}], int32[{e1}], int32[T,{k}]
    %h = grouped_matmul(%xs, %w1, %off) {{first_expert=0}} : f32[T*{k},{f}]
    %a = silu(%h) : f32[T*{k},{f}]
    %y = grouped_matmul(%a, %w2, %off) {{first_expert=0}} : f32[T*{k},{d}]
    %o = moe_unpermute(%y, %ro, %wt) : f32[T,{d}]
    return %o
  }}
}}"""
_CHAINS: dict[tuple, tuple] = {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.sampled_from([(1, 1, 0.0), (2, 3, 0.0), (3, 8, 1.25)]),
    tokens=st.integers(1, 40),
    skew=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_permute_gemm_unpermute_property(tmp_path_factory, shape, tokens, skew, seed):
    """For any token count (one build per (k, E, capacity)), any routing from spread to all on expert 0: the
    chain equals the reference."""
    k, e, cf = shape
    d, f = 32, 20
    if shape not in _CHAINS:
        _CHAINS[shape] = build(CHAIN.format(d=d, f=f, k=k, e=e, e1=e + 1, cf=cf), tmp_path_factory)
    m, art = _CHAINS[shape]
    rng = np.random.default_rng(seed)
    ids = np.where(rng.random((tokens, k)) < skew, 0, rng.integers(0, e, (tokens, k))).astype(np.int32)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inputs = [f32(tokens, d), ids, f32(tokens, k), f32(e, f, d), f32(e, d, f)]
    compare(art.run(inputs), run(m, inputs, {}))


V2_LITE = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=96, moe_intermediate_size=32,
               n_routed_experts=8, experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=8, vocab_size=300)  # fmt: skip


@pytest.mark.parametrize("model,overrides", [("r1-tiny.r1", {}), ("deepseek-v2-lite.r1", V2_LITE)])
def test_models_end_to_end_through_expert_fusion(model, overrides, tmp_path):
    """The expert-fusion pipeline compiles for cpu (shared experts ride in the grouped GEMMs) and matches the
    reference at two shapes from one build."""
    m = r1c.load(EXAMPLES / model, overrides=overrides)
    w = init_weights(m, 0)
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a", options={"passes": PASSES})
    ops = {op.name for op in art.module.functions[art.entry].body}  # the optimized IR the library was built from
    assert {"moe_permute", "grouped_matmul", "moe_unpermute"} <= ops and "moe_experts" not in ops
    for shape in ((2, 16), (1, 7)):
        toks = np.random.default_rng(sum(shape)).integers(0, m.attrs["vocab_size"], shape).astype(np.int32)
        assert rel(art.run([toks])[0], run(m, [toks], w)[0]) < 1e-5


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    text = """module @m {
  func @forward(%x: f16[T,8], %w: f16[2,4,8], %off: int32[3]) -> (f16[T,4]) {
    %0 = grouped_matmul(%x, %w, %off) {first_expert=0} : f16[T,4]
    return %0
  }
}"""
    with pytest.raises(LoweringError, match="grouped_matmul is lowered for float32 only.*op 'grouped_matmul'"):
        r1c.compile(parse_module(text), target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
