"""expert-fusion on DeepSeek-style models: exact (dropless) on random configs, the capacity semantics against a
direct numpy implementation, expert groups, what it must not rewrite, and training through the fused form."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c import build
from r1c.frontends.dsl import load
from r1c.ir import verify
from r1c.ir.interpreter import init_weights, random_inputs, run
from r1c.passes import PipelineError, compare_modules, run_pipeline
from r1c.passes.expert_fusion import ExpertFusionWarning

ENV = {"B": 2, "S": 8}


def _op_names(m, function: str = "forward") -> list[str]:
    return [op.name for op in m.functions[function].body]


def test_r1_tiny_is_fused_exactly() -> None:
    m = load("examples/r1-tiny.r1")
    fused = run_pipeline(m, "expert-fusion", verify_each=True)
    for fn in ("forward", "loss"):
        names = _op_names(fused, fn)
        assert "moe_experts" not in names
        assert names.count("moe_permute") == names.count("moe_unpermute") == 2  # layers 1 and 2
        assert names.count("grouped_matmul") == 4
        shared = [op for op in fused.functions[fn].body if op.loc and "shared_experts" in op.loc]
        assert not shared, "the shared experts fold into the grouped GEMMs"
    assert fused.params.keys() == m.params.keys()
    assert compare_modules(m, fused, ENV, seed=3) <= 1e-5


# Small random DeepSeek-style configs (r1-tiny with random sizes and routing).
@st.composite
def configs(draw):
    experts = draw(st.sampled_from([4, 6, 8]))
    n_group = draw(st.sampled_from([g for g in (1, 2) if experts % g == 0 and experts // g >= 2]))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(3, topk_group * experts // n_group)))
    return {
        "num_layers": 2,
        "first_k_dense": draw(st.integers(0, 1)),
        "hidden_size": draw(st.sampled_from([16, 32])),
        "num_heads": 2,
        "moe_intermediate_size": draw(st.sampled_from([8, 16])),
        "n_routed_experts": experts,
        "n_shared_experts": draw(st.integers(0, 2)),
        "experts_per_tok": top_k,
        "n_group": n_group,
        "topk_group": topk_group,
        "use_score_bias": draw(st.booleans()),
        "norm_topk_prob": draw(st.booleans()),
    }


@settings(max_examples=12, deadline=None)
@given(
    cfg=configs(),
    groups=st.sampled_from([1, 2]),
    roomy=st.booleans(),
    b=st.integers(1, 2),
    s=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_fusion_preserves_the_reference_on_random_configs(cfg, groups, roomy, b, s, seed) -> None:
    m = load("examples/r1-tiny.r1", overrides=cfg)
    # capacity_factor >= E keeps every pair (capacity >= T*K), so it must be exact too.
    cf = float(cfg["n_routed_experts"]) if roomy else 0.0
    fused = run_pipeline(m, f"expert-fusion{{expert_groups={groups},capacity_factor={cf}}}", verify_each=True)
    assert "moe_experts" not in _op_names(fused)
    assert compare_modules(m, fused, {"B": b, "S": s}, seed=seed) <= 1e-5


def _moe_module(t: int, d: int, f: int, e: int, k: int, shared_width: int):
    """moe_experts on x [T, D] with ids and weights as inputs, plus a shared SwiGLU MLP when shared_width > 0."""
    mb = build.ModuleBuilder("moe")
    fb = mb.function(
        "forward",
        x=build.tensor("f32", [t, d]),
        ids=build.tensor("int32", [t, k]),
        weights=build.tensor("f32", [t, k]),
    )
    x, ids, weights = fb.args

    def p(name: str, shape: list[int]):
        return fb.param(name, build.tensor("f32", shape), init="normal(0.3)")

    y = fb.moe_experts(x, ids, weights, p("wg", [e, f, d]), p("wu", [e, f, d]), p("wd", [e, d, f]))
    if shared_width:
        act = fb.swiglu(fb.linear(x, p("sg", [shared_width, d])), fb.linear(x, p("su", [shared_width, d])))
        y = fb.add(y, fb.linear(act, p("sd", [d, shared_width])))
    fb.ret(y)
    return mb.build()


def _swiglu_ffn(x: np.ndarray, wg: np.ndarray, wu: np.ndarray, wd: np.ndarray) -> np.ndarray:
    g, u = x @ wg.T, x @ wu.T
    return (g / (1.0 + np.exp(-g)) * u) @ wd.T


def _capacity_moe(x, ids, weights, w: dict[str, np.ndarray], cf: float, shared: bool) -> np.ndarray:
    """A standard capacity implementation: per expert, the first ceil(cf*T*K/E) pairs in token order."""
    t, k = ids.shape
    e = w["wg"].shape[0]
    cap = math.ceil(cf * t * k / e)
    taken = np.zeros(e, int)
    out = np.zeros_like(x, dtype=np.float64)
    for tok in range(t):
        for slot in range(k):
            ex = ids[tok, slot]
            if taken[ex] < cap:
                taken[ex] += 1
                out[tok] += weights[tok, slot] * _swiglu_ffn(x[tok], w["wg"][ex], w["wu"][ex], w["wd"][ex])
    if shared:
        out += _swiglu_ffn(x, w["sg"], w["su"], w["sd"])
    return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.3])
def test_capacity_drops_like_a_standard_implementation(cf: float, shared: bool) -> None:
    t, d, f, e, k = 12, 8, 4, 4, 2
    m = _moe_module(t, d, f, e, k, shared_width=2 * f if shared else 0)
    rng = np.random.default_rng(11)
    # Skewed routing: expert 0 is popular, so some of its pairs exceed the capacity.
    ids = np.where(rng.random((t, k)) < 0.5, 0, rng.integers(1, e, (t, k))).astype(np.int32)
    x, weights = rng.standard_normal((t, d)).astype(np.float32), rng.random((t, k)).astype(np.float32)
    w = init_weights(m, seed=5)
    fused = run_pipeline(m, f"expert-fusion{{capacity_factor={cf}}}", verify_each=True)
    (got,) = run(fused, [x, ids, weights], w)
    want = _capacity_moe(
        x.astype(np.float64), ids, weights, {n: a.astype(np.float64) for n, a in w.items()}, cf, shared
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    (dropless,) = run(m, [x, ids, weights], w)
    assert np.abs(dropless - got).max() > 1e-3, "the routing must overflow the capacity for this test to mean much"


def test_shared_experts_that_cannot_fold_stay_dense_and_say_why() -> None:
    m = _moe_module(6, 8, 4, 4, 2, shared_width=6)
    with pytest.warns(ExpertFusionWarning, match="width 6 is not a multiple of the expert width 4"):
        fused = run_pipeline(m, "expert-fusion")
    names = _op_names(fused)
    assert names.count("linear") == 3 and "moe_permute" in names and "moe_experts" not in names
    assert compare_modules(m, fused, {}, seed=2) <= 1e-5


def test_shared_mlp_with_other_users_is_not_folded() -> None:
    m = _moe_module(6, 8, 4, 4, 2, shared_width=8)
    f = m.functions["forward"]
    act = next(op for op in f.body if op.name == "swiglu").results[0]
    f.results.append(act)  # the shared activation is also an output: folding would lose it
    with pytest.warns(ExpertFusionWarning, match="other users"):
        fused = run_pipeline(m, "expert-fusion", verify_each=True)
    assert _op_names(fused).count("linear") == 3
    assert compare_modules(m, fused, {}, seed=2) <= 1e-5


def test_expert_groups_dispatch_per_group() -> None:
    m = load("examples/r1-tiny.r1", overrides={"num_layers": 2})
    fused = run_pipeline(m, "expert-fusion{expert_groups=4}", verify_each=True)
    gmm = [op for op in fused.main.body if op.name == "grouped_matmul"]
    # 4 routed groups of 2 experts + the shared experts' own dispatch, each with gate_up and down GEMMs.
    assert sorted({op.attrs["first_expert"] for op in gmm}) == [0, 2, 4, 6, 8]
    assert len(gmm) == 10 and all(op.operands[1].type.shape[0] in (1, 2) for op in gmm)
    assert compare_modules(m, fused, ENV, seed=4) <= 1e-5


def test_bad_options_are_errors() -> None:
    m = load("examples/r1-tiny.r1", overrides={"num_layers": 2})
    with pytest.raises(ValueError, match="expert_groups=3 does not divide the 8 routed experts"):
        run_pipeline(m, "expert-fusion{expert_groups=3}")
    with pytest.raises(PipelineError, match="capacity_factor must be >= 0"):
        run_pipeline(m, "expert-fusion{capacity_factor=-1.0}")
    with pytest.raises(PipelineError, match="expert_groups must be >= 1"):
        run_pipeline(m, "expert-fusion{expert_groups=0}")


def test_dense_models_are_left_alone() -> None:
    m = load("examples/r1-tiny.r1", overrides={"num_layers": 2, "n_routed_experts": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = run_pipeline(m, "expert-fusion")
    assert str(fused) == str(m)


def test_training_through_the_fused_form() -> None:
    """grad after expert-fusion differentiates the fused ops; the gradients equal those of the original."""
    m = load("examples/r1-tiny.r1", overrides={"num_layers": 2})
    plain = run_pipeline(m, "grad")
    fused = run_pipeline(m, "expert-fusion,grad")
    verify(fused)
    assert "grouped_matmul_wgrad" in _op_names(fused, "loss_grad")
    w = init_weights(m, seed=1)
    inputs = random_inputs(m, m.functions["loss"], ENV, seed=1)
    want = run(plain, inputs, w, function="loss_grad")
    got = run(fused, inputs, w, function="loss_grad")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (np.abs(b).max() + 1e-30))
