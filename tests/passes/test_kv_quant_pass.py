"""The kv-quant pass: what it rewrites on r1-tiny and built graphs, that the result stays within the error
model's tolerance on random models, its options, and the per-pass numerics tolerance in the pass manager."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import r1c
from r1c.build import ModuleBuilder, tensor
from r1c.ir import print_module, verify
from r1c.ir.ops.quant import unit_error
from r1c.ir.types import DType
from r1c.passes import NumericsError, PassManager, PipelineError, compare_modules, get_pass, run_pipeline
from r1c.passes.kv_quant import AMPLIFICATION

TINY = Path(__file__).resolve().parents[2] / "examples" / "r1-tiny.r1"


def _ops(m, function: str = "forward") -> list[str]:
    return [op.name for op in m.functions[function].body]


def _tol(pipeline: str) -> float:
    info = get_pass("kv-quant")
    return info.tolerance_for(dict(r1c.passes.parse_pipeline(pipeline)[0][1]))


def test_r1_tiny_mla_uses_the_quantized_latent_cache():
    m = r1c.load(str(TINY), overrides={"num_layers": 2})
    out = run_pipeline(m, "kv-quant", verify_each=True)
    ops = _ops(out)
    assert "attention" not in ops and ops.count("mla_attention_kvq") == 2 and ops.count("quantize") == 4
    # The per-head K/V expansion is gone from the forward graph: kv_b_proj is read only by the fused op.
    assert not [op for op in out.main.body if op.name == "linear" and "kv_b_proj" in op.operands[1].name]
    assert "attention" in _ops(out, "loss")  # the training graph keeps exact attention
    for op in out.main.body:
        if op.name == "quantize":
            want = "per_token" if op.operands[0].type.rank == 3 else "per_channel"  # latent vs rotary key
            assert (op.attrs["granularity"], op.attrs["dtype"]) == (want, DType.int8)
    err = compare_modules(m, out, {"B": 2, "S": 8}, seed=0)
    assert 0 < err <= _tol("kv-quant")


def test_three_pass_pipeline_passes_check_numerics_and_prints_each_change():
    buf = io.StringIO()
    pipeline = "expert-fusion,sparse-attention-tiling,kv-quant{dtype=int8}"
    PassManager(pipeline, check_numerics=True, print_ir_after="all", verify_each=True, out=buf).run(r1c.load(str(TINY)))
    text = buf.getvalue()
    after = text.split("// ----- IR after kv-quant -----")[1]
    assert "mla_attention_kvq(" in after and "%block_map" in after and "quantize(" in after
    lines = [line for line in text.splitlines() if line.startswith("// numerics after kv-quant")]
    assert len(lines) == 1 and f"tolerance {1e-4 + AMPLIFICATION / 254:g}" in lines[0]


def test_lossy_tolerance_carries_to_later_passes_and_still_catches_errors():
    m = r1c.load(str(TINY), overrides={"num_layers": 1})
    buf = io.StringIO()
    PassManager("kv-quant{bits=4},cse,dce", check_numerics=True, out=buf).run(m)
    assert buf.getvalue().count(f"tolerance {1e-4 + _tol('kv-quant{bits=4}'):g}") == 3
    # The allowance is per format: 4-bit error is far beyond what int8 may add, so it would be caught.
    assert compare_modules(m, run_pipeline(m, "kv-quant{bits=4}"), {"B": 2, "S": 8}) > _tol("kv-quant")
    with pytest.raises(NumericsError, match="pass 'kv-quant' changed the result"):
        PassManager("kv-quant{bits=4}", check_numerics=True, numerics_tol=-_tol("kv-quant{bits=4}")).run(m)


def test_idempotent_and_functions_option():
    m = r1c.load(str(TINY), overrides={"num_layers": 1})
    once = run_pipeline(m, "kv-quant")
    assert print_module(run_pipeline(once, "kv-quant")) == print_module(once)
    both = run_pipeline(m, 'kv-quant{functions="forward,loss"}')
    assert "mla_attention_kvq" in _ops(both, "loss")
    with pytest.raises(PipelineError, match="no function"):
        run_pipeline(m, "kv-quant{functions=generate}")


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("kv-quant{dtype=bf16}", "int8 or fp8e4m3"),
        ("kv-quant{dtype=fp8e4m3,bits=4}", "fp8e4m3 quantization stores 8 bits"),
        ("kv-quant{bits=2}", "bits=2 is not supported"),
        ("kv-quant{key_granularity=per_head}", "key_granularity must be one of per_token, per_channel"),
    ],
)
def test_bad_options_are_clear_errors(pipeline, message):
    m = r1c.load(str(TINY), overrides={"num_layers": 1})
    with pytest.raises(PipelineError, match=message):
        run_pipeline(m, pipeline)


def test_tolerance_follows_the_error_model():
    assert _tol("kv-quant") == pytest.approx(AMPLIFICATION * 0.5 / 127)
    assert _tol("kv-quant{bits=4}") == pytest.approx(AMPLIFICATION * unit_error(DType.int8, 4))
    assert _tol("kv-quant{dtype=fp8e4m3}") == pytest.approx(AMPLIFICATION * 2.0**-4)
    assert get_pass("cse").tolerance_for({}) == 0.0


FORMATS = ["kv-quant", "kv-quant{bits=4}", "kv-quant{dtype=fp8e4m3}", "kv-quant{key_granularity=per_token}"]


@settings(max_examples=12, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    kv_lora_rank=st.sampled_from([8, 16, 32]),
    nope=st.sampled_from([4, 8]),
    rope=st.sampled_from([2, 4]),
    v_head=st.sampled_from([4, 8]),
    pipeline=st.sampled_from(FORMATS),
    seed=st.integers(0, 1000),
)
def test_random_mla_models_stay_within_tolerance(heads, kv_lora_rank, nope, rope, v_head, pipeline, seed):
    """Random r1-tiny-shaped MLA models with dense FFNs (MoE routing flips are jumps, see docs/passes.md)."""
    overrides = {
        "num_layers": 2,
        "n_routed_experts": 0,
        "num_heads": heads,
        "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_head,
    }
    m = r1c.load(str(TINY), overrides=overrides)
    out = run_pipeline(m, pipeline, verify_each=True)
    assert _ops(out).count("mla_attention_kvq") == 2
    assert compare_modules(m, out, {"B": 2, "S": 8}, seed=seed) <= _tol(pipeline)


@settings(max_examples=15, deadline=None)
@given(
    hkv=st.integers(1, 2),
    rep=st.integers(1, 3),
    d=st.sampled_from([4, 8, 16]),
    window=st.integers(0, 5),
    pipeline=st.sampled_from(FORMATS),
    seed=st.integers(0, 1000),
)
def test_random_plain_attention_stays_within_tolerance(hkv, rep, d, window, pipeline, seed):
    """A two-layer residual attention stack on random inputs: every attention becomes attention_kvq."""
    mb = ModuleBuilder("stack")
    h = hkv * rep
    fb = mb.function("forward", x=tensor("f32", ["B", "S", h * d]))
    x = fb.args[0]
    for layer in range(2):
        with fb.scope(f"layers.{layer}"):
            proj = {
                n: fb.param(f"layers.{layer}.{n}", tensor("f32", [hh * d, h * d]), "normal(0.1)")
                for n, hh in (("q", h), ("k", hkv), ("v", hkv))
            }
            heads = {
                n: fb.transpose(
                    fb.reshape(fb.linear(x, w), shape=["B", "S", w.type.shape[0] // d, d]), perm=[0, 2, 1, 3]
                )
                for n, w in proj.items()
            }
            o = fb.attention(heads["q"], heads["k"], heads["v"], scale=d**-0.5, window=window, sinks=min(window, 1))
            x = fb.add(x, fb.reshape(fb.transpose(o, perm=[0, 2, 1, 3]), shape=["B", "S", h * d]))
    fb.ret(x)
    m = mb.build()
    out = run_pipeline(m, pipeline, verify_each=True)
    assert _ops(out).count("attention_kvq") == 2 and "attention" not in _ops(out)
    err = compare_modules(m, out, {"B": 2, "S": 7}, seed=seed)
    assert 0 < err <= _tol(pipeline)
    verify(out)


def test_fewer_bytes_after_kv_quant():
    """The cost rules show the point of the pass: the attention ops read fewer bytes."""
    from r1c.ir import registry

    def attention_bytes(m, env):
        total = 0
        for op in m.main.body:
            if "attention" in op.name:
                ins = [v.type.concrete(env) for v in op.operands]
                outs = [v.type.concrete(env) for v in op.results]
                typed = [v.type.with_shape(s) for v, s in zip(op.operands, ins)]
                touts = [v.type.with_shape(s) for v, s in zip(op.results, outs)]
                total += registry.get(op.name).cost(typed, touts, op.attrs).bytes
        return total

    m = r1c.load(str(TINY), overrides={"num_layers": 1})
    env = {"B": 1, "S": 1024}
    full = attention_bytes(m, env)
    int8, int4 = (attention_bytes(run_pipeline(m, p), env) for p in ("kv-quant", "kv-quant{bits=4}"))
    # Full: q, per-head K/V in f32 and the output; quantized: q, the int8 latent + rotary key, kv_b, the output.
    assert int4 < int8 < 0.6 * full
