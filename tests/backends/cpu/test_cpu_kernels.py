"""The cpu target's kernels and schedules: routed MoE (counting sort + grouped GEMM) on skewed and empty routings,
GEMMs at shapes that are not whole tiles, weights packed at load and in the graph, the default schedules on every
function, static-shape builds, and MetaSchedule tuning into a database that compile applies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import r1c  # noqa: E402
from r1c.backends.cpu import kernels  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402

RNG = np.random.default_rng(1)
F = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


MOE = """module @m {{
  func @forward(%x: f32[T,{d}], %ids: int32[T,{k}], %wt: f32[T,{k}], %g: f32[{e},{f},{d}], %u: f32[{e},{f},{d}],
                %dn: f32[{e},{d},{f}]) -> (f32[T,{d}]) {{
    %0 = moe_experts(%x, %ids, %wt, %g, %u, %dn) : f32[T,{d}]
    return %0
  }}
}}"""


@pytest.mark.parametrize(
    "tokens,k,routing",
    [(1, 2, "spread"), (37, 2, "spread"), (40, 3, "one_expert"), (23, 2, "two_experts"), (64, 4, "spread")],
)
def test_routed_moe_matches_the_reference(tokens, k, routing, tmp_path):
    """Skewed routings: every token on one expert (many tiles of one expert, the others empty), two experts, a
    single token; widths (f=48, d=40) that are not whole panels, so packing pads."""
    e, f, d = 6, 48, 40
    m = parse_module(MOE.format(d=d, k=k, e=e, f=f))
    if routing == "spread":
        ids = np.stack([RNG.permutation(e)[:k] for _ in range(tokens)])
    elif routing == "one_expert":
        ids = np.stack([[4] + list(RNG.permutation([0, 1, 2, 3, 5])[: k - 1]) for _ in range(tokens)])
    else:
        ids = np.tile(np.array([[1, 3]]), (tokens, 1))
    inputs = [F(tokens, d), ids.astype(np.int32), F(tokens, k), F(e, f, d), F(e, f, d), F(e, d, f)]
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    assert rel(art.run(inputs)[0], run(m, inputs, {})[0]) < 2e-6


def test_pack_panels_layout():
    w = F(3, 40, 7)  # [E, N, K]: N=40 pads to two panels of 32
    p = kernels.pack_panels(w, 32)
    assert p.shape == (3, 2, 7, 32) == tuple(kernels.pack_panels_shape([3, 40, 7], 32))
    np.testing.assert_array_equal(p[1, 1, 5, 3], w[1, 35, 5])
    assert not p[:, 1, :, 8:].any()  # columns 40..63 are zero padding


GEMMS = """module @m {
  func @forward(%x: f32[B,S,24], %w: f32[40,24], %a: f32[B,13,24], %b: f32[B,24,7]) -> (f32[B,S,40], f32[B,13,7]) {
    %0 = linear(%x, %w) : f32[B,S,40]
    %1 = matmul(%a, %b) : f32[B,13,7]
    return %0, %1
  }
}"""


def test_gemms_at_partial_tiles_and_graph_packed_weights(tmp_path):
    """linear with a weight that is an argument (packed in the graph) and 40 columns (a partial panel); batched
    matmul with 13 x 7 results (partial tiles both ways); two shapes from one build."""
    m = parse_module(GEMMS)
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    for b, s in ((2, 9), (1, 1)):
        inputs = [F(b, s, 24), F(40, 24), F(b, 13, 24), F(b, 24, 7)]
        for got, want in zip(art.run(inputs), run(m, inputs, {})):
            assert rel(got, want) < 2e-6


def test_default_schedules_cover_every_function():
    import tvm

    from r1c.backends.cpu.schedule import HAND_WRITTEN, apply_default_schedules
    from r1c.backends.cpu.target import build_relax

    m = r1c.load(r1c_example("r1-tiny.r1"))
    mod, plan, _ = build_relax(m, {}, "cpu")
    mod = apply_default_schedules(mod, tvm.target.Target(plan["target"]))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    hand = {n for n, f in funcs.items() if f.attrs.get(kernels.KERNEL_ATTR) in HAND_WRITTEN}
    assert hand and all(funcs[n].attrs.get("tir.is_scheduled") for n in set(funcs) - hand)
    gemm = [f for f in funcs.values() if f.attrs.get(kernels.KERNEL_ATTR) == "gemm"]
    assert gemm and all("T.vectorized" in f.script() for f in gemm)
    assert any("T.parallel" in f.script() for f in gemm)  # threads for the large ones (lm_head), not all
    packed = plan["packed"]  # GEMM-only weights are packed at load; norms and embeddings are not
    assert {"lm_head.weight", "model.layers.1.mlp.experts.gate_proj", "model.layers.0.self_attn.o_proj.weight"} <= set(
        packed
    )
    assert not any("layernorm" in n or "embed" in n for n in packed)
    assert packed["model.layers.1.mlp.experts.gate_proj"] == kernels.expert_panel_width(32)


def r1c_example(name: str):
    from pathlib import Path

    return Path(__file__).parents[3] / "examples" / name


def test_static_shapes_build_and_wrong_shape_error(tmp_path):
    m = r1c.load(r1c_example("r1-tiny.r1"))
    w = init_weights(m, 0)
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a", options={"shapes": {"B": 1, "S": 8}})
    toks = RNG.integers(0, 512, (1, 8)).astype(np.int32)
    assert rel(art.run([toks])[0], run(m, [toks], w)[0]) < 1e-5
    with pytest.raises(Exception, match="shape|8|7"):
        art.run([toks[:, :7]])


def test_tvm_runs_a_thread_per_physical_core():
    """TVM's default pool is half the logical CPUs on x86 (it assumes SMT); r1c sets one thread per physical core
    this process may use, unless TVM_NUM_THREADS was given."""
    import os

    import tvm

    from r1c.backends.cpu import _physical_cpus

    want = int(os.environ.get("TVM_NUM_THREADS", _physical_cpus()))
    assert tvm.get_global_func("runtime.NumThreads")() == want >= 1


def test_results_outlive_the_next_run(tmp_path):
    """Results are views of the VM's output tensors (no copy): a later run must not overwrite an earlier result."""
    m = r1c.load(r1c_example("r1-tiny.r1"))
    w = init_weights(m, 0)
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a", options={"shapes": {"B": 1, "S": 8}})
    a, b = (RNG.integers(0, 512, (1, 8)).astype(np.int32) for _ in range(2))
    first = art.run([a])[0]
    kept = first.copy()
    art.run([b])
    np.testing.assert_array_equal(first, kept)


def test_elementwise_chains_are_one_loop_nest_and_rows_one_parallel_loop():
    """inline_injective folds a fused elementwise chain into one nest (no intermediate buffers); schedule_rows
    puts a norm's reduction and its elementwise work inside one loop over rows."""
    import tvm

    from r1c.backends.cpu.schedule import apply_default_schedules
    from r1c.backends.cpu.target import build_relax

    m = r1c.load(r1c_example("r1-tiny.r1"))
    mod, plan, _ = build_relax(m, {"shapes": {"B": 1, "S": 128}}, "cpu")
    mod = apply_default_schedules(mod, tvm.target.Target(plan["target"]))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    swiglu = [f for n, f in funcs.items() if "silu" in n and "multiply" in n]
    assert swiglu and all("sblock_alloc_buffer" not in f.script() for f in swiglu)
    norms = [f for n, f in funcs.items() if n.startswith("rms_norm")]
    assert norms and all(f.script().count("for ax0_ax1_fused in") == 1 for f in norms)


TOPK = """module @m {
  func @forward(%x: f32[T,8], %y: int32[T,6], %z: f32[T,40])
      -> (f32[T,3], int32[T,3], f32[T,2], int32[T,2], int32[T,4], int32[T,4], f32[T,12], int32[T,12]) {
    %0, %1 = topk(%x) {k=3, axis=-1, largest=true} : f32[T,3], int32[T,3]
    %2, %3 = topk(%x) {k=2, axis=1, largest=false} : f32[T,2], int32[T,2]
    %4, %5 = topk(%y) {k=4, axis=-1, largest=true} : int32[T,4], int32[T,4]
    %6, %7 = topk(%z) {k=12, axis=-1, largest=true} : f32[T,12], int32[T,12]
    return %0, %1, %2, %3, %4, %5, %6, %7
  }
}"""


def test_small_topk_orders_ties_and_nan_like_the_reference(tmp_path):
    """k <= 8 runs r1c's selection kernel (k = 12 TVM's sort): values and indices equal the reference's bit for bit
    with many ties (small integers), NaN (first when largest, last when smallest), -0.0 next to 0.0."""
    m = parse_module(TOPK)
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    for t in (50, 3):
        x = RNG.integers(-3, 3, (t, 8)).astype(np.float32)
        x[1, 2], x[2, [1, 6]], x[0, 4], x[0, 5] = np.nan, np.nan, -0.0, 0.0
        y = RNG.integers(-2, 2, (t, 6)).astype(np.int32)
        z = F(t, 40)
        for got, want in zip(art.run([x, y, z]), run(m, [x, y, z], {})):
            np.testing.assert_array_equal(got, want)


SMALL = """module @m {
  func @forward(%x: f32[B,64], %w: f32[64,64]) -> (f32[B,64]) {
    %0 = linear(%x, %w) : f32[B,64]
    %1 = silu(%0) : f32[B,64]
    return %1
  }
}"""


@pytest.mark.slow  # MetaSchedule's builder and runner processes: about two minutes for four trials here
def test_tune_writes_a_database_that_compile_applies(tmp_path):
    """A short MetaSchedule run on a two-kernel model: records and the default-vs-tuned report land in the
    database directory, compile applies the records it keeps (and not the rejected ones), and results still
    match the reference."""
    import tvm

    from r1c.backends.cpu import tune
    from r1c.backends.cpu.target import build_relax

    m = parse_module(SMALL)
    options = {"passes": "", "shapes": {"B": 16}}
    mod, plan, _ = build_relax(m, options, "cpu")
    db = str(tmp_path / "db")
    report = tune.tune(mod, tvm.target.Target(plan["target"]), db, trials=4)
    assert report["kernels"] and all(k["default_ms"] > 0 and k["tuned_ms"] > 0 for k in report["kernels"].values())
    saved = json.loads((tmp_path / "db" / tune.REPORT_FILE).read_text())
    assert saved["kernels"].keys() == report["kernels"].keys()
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path / "a", options={**options, "tuning": db})
    plan = json.loads((art.path / "cpu_plan.json").read_text())
    kept = [n for n, k in report["kernels"].items() if k["hash"] not in report["rejected"]]
    assert len(plan["tuned"]) == len(kept)
    inputs = [F(16, 64), F(64, 64)]
    assert rel(art.run(inputs)[0], run(m, inputs, {})[0]) < 2e-6


def test_tune_needs_static_shapes(tmp_path):
    import tvm

    from r1c.backends.cpu import tune
    from r1c.backends.cpu.target import build_relax

    mod, plan, _ = build_relax(parse_module(SMALL), {"passes": ""}, "cpu")
    with pytest.raises(ValueError, match="static shapes.*shapes"):
        tune.tune(mod, tvm.target.Target(plan["target"]), str(tmp_path / "db"), trials=2)


DENSE_ATTENTION = """module @m {
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,T,8], %v: f32[B,2,T,6], %x: f32[B,S,T], %w: f32[B,T,5])
      -> (f32[B,4,S,6], f32[B,4,S,6], f32[B,S,5], f32[B,S,T]) {
    %0 = attention(%q, %k, %v) {scale=0.7, causal=true, window=0, sinks=0} : f32[B,4,S,6]
    %1 = attention(%q, %k, %v) {scale=-0.4, causal=false, window=0, sinks=0} : f32[B,4,S,6]
    %2 = matmul(%x, %w) : f32[B,S,5]
    %3 = sigmoid(%x) : f32[B,S,T]
    return %0, %1, %2, %3
  }
}"""


@pytest.fixture(scope="module")
def dense_attention(tmp_path_factory):
    m = parse_module(DENSE_ATTENTION)
    out = tmp_path_factory.mktemp("attn")
    return m, r1c.compile(m, target="cpu", weights={}, out_dir=out, options={"passes": ""})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), s=st.integers(1, 40), t=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_attention_softmax_and_padded_gemms_property(dense_attention, b, s, t, seed):
    """One symbolic build at random shapes: the row softmax kernel (causal with more or fewer queries than keys,
    rows that see nothing, a negative scale), the batched GEMM's zero-padded columns, the fast sigmoid."""
    m, art = dense_attention
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(shape).astype(np.float32) * 3 for shape in
              ((b, 4, s, 8), (b, 2, t, 8), (b, 2, t, 6), (b, s, t), (b, t, 5))]  # fmt: skip
    for got, want in zip(art.run(inputs), run(m, inputs, {})):
        assert got.shape == want.shape and np.isfinite(got).all()
        assert rel(got, want) < 5e-6
