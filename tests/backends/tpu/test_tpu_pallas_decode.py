"""The quantized-KV decode attention kernel (backends/tpu/pallas_decode.py): `attention_kvq` and
`mla_attention_kvq` with few queries per row, lowered by the tpu target and run on XLA:CPU (the Pallas kernel in
interpret mode) against the reference interpreter, for int8, 4-bit and fp8 codes, per-token and per-channel
scales, GQA/MQA, one and four queries, key lengths that are not block multiples, causal, window + sinks and
unmasked, queries before the first key; every fp8 code's decoding; the prefill shapes keep the splash path; and
ahead-of-time compiles for a TPU v5e topology whose HLO holds the kernel's Mosaic custom call (a small module,
r1-tiny after kv-quant at S=1 also run against the reference, and under --mesh data=2).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import r1c  # noqa: E402
from r1c.backends.tpu import pallas_decode  # noqa: E402
from r1c.backends.tpu.lower import lower, to_device_dtype  # noqa: E402
from r1c.ir import registry  # noqa: E402
from r1c.ir.core import Module  # noqa: E402
from r1c.ir.interpreter import run_function  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402
from r1c.ir.types import DType  # noqa: E402

KERNEL = "kvq_decode_attention"
TINY = Path(__file__).parents[3] / "examples" / "r1-tiny.r1"
FORMATS = {"int8": (DType.int8, 8), "int4": (DType.int8, 4), "fp8": (DType.fp8e4m3, 8)}


def rel(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def quantize(x: np.ndarray, fmt: str, granularity: str, token_axis: int) -> tuple[np.ndarray, np.ndarray]:
    dtype, bits = FORMATS[fmt]
    opdef = registry.get("quantize")
    attrs = opdef.complete_attrs({"dtype": dtype, "bits": bits, "granularity": granularity, "token_axis": token_axis})
    q, s = opdef.reference([x], attrs)
    return q, s


def shape(dtype: str, a: np.ndarray) -> str:
    return f"{dtype}[{','.join(str(d) for d in a.shape)}]"


def mask_attrs(causal: bool, window: int, sinks: int, bits: int) -> str:
    return (
        f"block_q=64, block_k=64, causal={str(causal).lower()}, window={window}, sinks={sinks}, layout_block=0, "
        f"layout=[], bits={bits}"
    )


@dataclass
class Case:
    """One quantized attention op of an IR function: its arguments (name, type, value), op line and result."""

    args: list[tuple[str, str, np.ndarray]]
    op: str
    result: str
    out: str


def module(*cases: Case) -> tuple[Module, list[np.ndarray]]:
    sig = ", ".join(f"%{n}: {t}" for c in cases for n, t, _ in c.args)
    ops = "\n".join(f"    {c.op}" for c in cases)
    text = f"""module @m {{
  func @forward({sig}) -> ({", ".join(c.out for c in cases)}) {{
{ops}
    return {", ".join(c.result for c in cases)}
  }}
}}"""
    return parse_module(text), [x for c in cases for _, _, x in c.args]


def kvq_case(fmt, kgran, vgran, b, h, hkv, sq, skv, dk, dv, causal, window, sinks, seed, p="") -> Case:
    """attention_kvq on random inputs (K/V drawn away from zero, then quantized); names prefixed by p."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, dk)).astype(np.float32)
    k = (rng.standard_normal((b, hkv, skv, dk)) * 2 + 0.3).astype(np.float32)
    v = (rng.standard_normal((b, hkv, skv, dv)) * 3 - 0.2).astype(np.float32)
    kq, ks = quantize(k, fmt, kgran, 2)
    vq, vs = quantize(v, fmt, vgran, 2)
    code = FORMATS[fmt][0].value
    args = [(f"{p}q", shape("f32", q), q), (f"{p}kq", shape(code, kq), kq), (f"{p}ks", shape("f32", ks), ks)]
    args += [(f"{p}vq", shape(code, vq), vq), (f"{p}vs", shape("f32", vs), vs)]
    out = f"f32[{b},{h},{sq},{dv}]"
    operands = ", ".join(f"%{n}" for n, _, _ in args)
    attrs = f"scale=0.37, {mask_attrs(causal, window, sinks, FORMATS[fmt][1])}"
    return Case(args, f"%{p}o = attention_kvq({operands}) {{{attrs}}} : {out}", f"%{p}o", out)


def mla_case(fmt, lgran, rgran, b, h, sq, skv, c, dn, dr, dv, causal, window, sinks, seed, p="") -> Case:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, dn + dr)).astype(np.float32)
    latent = (rng.standard_normal((b, skv, c)) + 0.2).astype(np.float32)
    k_rot = (rng.standard_normal((b, skv, 1, dr)) * 2 - 0.1).astype(np.float32)
    w = (rng.standard_normal((h * (dn + dv), c)) * 0.3).astype(np.float32)
    lq, ls = quantize(latent, fmt, lgran, 1)
    rq, rs = quantize(k_rot, fmt, rgran, 1)
    code = FORMATS[fmt][0].value
    args = [(f"{p}q", shape("f32", q), q), (f"{p}lq", shape(code, lq), lq), (f"{p}ls", shape("f32", ls), ls)]
    args += [(f"{p}rq", shape(code, rq), rq), (f"{p}rs", shape("f32", rs), rs), (f"{p}w", shape("f32", w), w)]
    out = f"f32[{b},{h},{sq},{dv}]"
    operands = ", ".join(f"%{n}" for n, _, _ in args)
    attrs = f"scale=0.21, {mask_attrs(causal, window, sinks, FORMATS[fmt][1])}, qk_nope_head_dim={dn}, v_head_dim={dv}"
    return Case(args, f"%{p}o = mla_attention_kvq({operands}) {{{attrs}}} : {out}", f"%{p}o", out)


def device_inputs(m, inputs: list) -> list:
    return [to_device_dtype(x, a.type.dtype) for x, a in zip(inputs, m.main.args)]


def uses_kernel(m, inputs: list) -> bool:
    fn = lower(m, "forward").fn
    return KERNEL in str(jax.make_jaxpr(fn)(*device_inputs(m, inputs)))


def check_against_reference(m, inputs: list, tol: float = 2e-5) -> None:
    assert uses_kernel(m, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pallas interpret mode on CPU
        (got,) = jax.jit(lower(m, "forward").fn)(*device_inputs(m, inputs))
    (want,) = run_function(m, m.main, inputs, {})
    assert np.abs(want).max() > 0.1  # a real output, not the zeros of an empty mask
    assert rel(got, want) < tol, rel(got, want)


def test_fp8_codes_decode_exactly():
    """Every fp8e4m3 bit pattern but NaN (quantize never stores it), subnormals included, decodes to its value."""
    import ml_dtypes

    codes = np.arange(-128, 128, dtype=np.int8)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    keep = ~np.isnan(want)
    got = np.asarray(jax.jit(lambda c: pallas_decode._codes_to_f32(c, fp8=True))(codes))
    np.testing.assert_array_equal(got[keep], want[keep])
    assert np.sum(keep & (np.abs(want) < 2.0**-6) & (want != 0)) == 14  # the subnormals are in there


@pytest.fixture
def small_blocks(monkeypatch):
    # 128-key blocks: lengths of a few hundred keys take several grid steps, a tail and skipped blocks.
    monkeypatch.setattr(pallas_decode, "BLOCK_K", 128)


KVQ_CASES = {
    # fmt, K / V granularity, b, h, hkv, sq, skv, dk, dv, causal, window, sinks
    "int8-kivi-gqa-sq1": ("int8", "per_channel", "per_token", 2, 4, 2, 1, 300, 40, 24, True, 0, 0),
    "int4-window-sinks-sq4": ("int4", "per_token", "per_channel", 2, 8, 2, 4, 520, 64, 64, True, 100, 4),
    "fp8-mqa-unmasked-sq4": ("fp8", "per_channel", "per_token", 1, 2, 1, 4, 77, 32, 48, False, 0, 0),
    "fp8-per-token-window-sq1": ("fp8", "per_token", "per_token", 2, 4, 4, 1, 260, 16, 16, True, 50, 3),
}


@pytest.mark.parametrize("case", list(KVQ_CASES))
def test_attention_kvq_decode_kernel_matches_the_reference(case, small_blocks):
    check_against_reference(*module(kvq_case(*KVQ_CASES[case], seed=len(case))))


def test_queries_before_the_first_key_get_zeros(small_blocks):
    """Sq > Skv: the first queries (causal, aligned to the end of the keys) see nothing: zeros, as the reference."""
    m, inputs = module(kvq_case("int8", "per_token", "per_channel", 1, 2, 1, 4, 2, 8, 8, True, 0, 0, seed=5))
    check_against_reference(m, inputs)
    (got,) = jax.jit(lower(m, "forward").fn)(*device_inputs(m, inputs))
    assert np.all(np.asarray(got)[:, :, :2] == 0) and np.all(np.asarray(got)[:, :, 2:] != 0)


MLA_CASES = {
    # fmt, latent / k_rot granularity, b, h, sq, skv, c, dn, dr, dv, causal, window, sinks
    "int8-window-sinks-sq4": ("int8", "per_token", "per_channel", 2, 4, 4, 300, 48, 16, 8, 16, True, 64, 2),
    "fp8-sq1": ("fp8", "per_channel", "per_token", 1, 2, 1, 140, 64, 8, 16, 8, True, 0, 0),
}


@pytest.mark.parametrize("case", list(MLA_CASES))
def test_mla_attention_kvq_decode_kernel_matches_the_reference(case, small_blocks):
    check_against_reference(*module(mla_case(*MLA_CASES[case], seed=len(case))))


def test_prefill_and_unsupported_scales_keep_the_splash_path():
    def case(sq: int) -> Case:
        return kvq_case("int8", "per_channel", "per_token", 1, 2, 1, sq, 40, 8, 8, True, 0, 0, seed=1)

    assert uses_kernel(*module(case(pallas_decode.MAX_DECODE_QUERIES)))
    assert not uses_kernel(*module(case(pallas_decode.MAX_DECODE_QUERIES + 1)))  # prefill: splash
    c = case(1)
    kq = c.args[1][2]
    full = np.broadcast_to(c.args[2][2], kq.shape).copy()  # a scale per element: no folded form
    c.args[2] = ("ks", shape("f32", full), full)
    assert not uses_kernel(*module(c))


def test_aot_for_tpu_has_the_decode_kernel(tmp_path):
    """A decode step's quantized attentions (int8 GQA over 1000 keys, fp8 with window and sinks, 4-bit absorbed
    MLA) compile for TPU v5e: Mosaic accepts the kernel, one custom call each."""
    m, _ = module(
        kvq_case("int8", "per_channel", "per_token", 2, 8, 2, 1, 1000, 128, 128, True, 0, 0, seed=1, p="a"),
        kvq_case("fp8", "per_token", "per_channel", 2, 4, 1, 4, 700, 64, 64, True, 256, 4, seed=2, p="b"),
        mla_case("int4", "per_token", "per_channel", 2, 4, 1, 600, 128, 32, 64, 32, True, 0, 0, seed=3, p="c"),
    )
    art = r1c.compile(m, target="tpu", weights={}, out_dir=tmp_path, options={"shapes": {}})
    plan = json.loads((Path(art.path) / "tpu_plan.json").read_text())
    assert plan["device_kind"].startswith("TPU v5")
    assert plan["compiled"]["pallas_custom_calls"] == {KERNEL: 3}
    hlo = (Path(art.path) / "tpu_hlo.txt").read_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3


def test_r1_tiny_after_kv_quant_at_decode_shapes(tmp_path):
    """r1-tiny's forward after kv-quant with one new token per row (its `decode` entry reads the float cache through
    cached_attention, which kv-quant leaves alone): the three absorbed-MLA attentions compile to the kernel for
    v5e, and the artifact on XLA:CPU gives the reference's logits (at another few-query shape)."""
    passes = "canonicalize,cse,dce,expert-fusion,sparse-attention-tiling,kv-quant{dtype=int8},cse,dce"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert-fusion's note on shared experts; Pallas interpret mode
        art = r1c.compile(r1c.load(str(TINY)), target="tpu", out_dir=tmp_path, options={"passes": passes,
                          "shapes": {"B": 2, "S": 1}})  # fmt: skip
        plan = json.loads((Path(art.path) / "tpu_plan.json").read_text())
        assert plan["compiled"]["pallas_custom_calls"] == {"gmm": 4, KERNEL: 3}
        tokens = np.random.default_rng(0).integers(0, 512, (2, 5)).astype(np.int32)
        (want,) = run_function(art.module, art.module.functions["forward"], [tokens], art.weights)
        (got,) = art.run([tokens])
    assert rel(got, want) < 2e-5, rel(got, want)


def test_aot_with_a_data_mesh_runs_the_kernel_per_device(tmp_path):
    """Under --mesh the kernel runs in shard_map on each device's batch rows (Mosaic calls are not partitioned)."""
    m, _ = module(kvq_case("int8", "per_channel", "per_token", 4, 4, 2, 1, 384, 64, 64, True, 0, 0, seed=4))
    art = r1c.compile(m, target="tpu", weights={}, out_dir=tmp_path, options={"shapes": {}, "mesh": "data=2"})
    plan = json.loads((Path(art.path) / "tpu_plan.json").read_text())
    assert plan["compiled"]["pallas_custom_calls"] == {KERNEL: 1} and plan["shardings"][0][0] == "data"
    hlo = (Path(art.path) / "tpu_hlo.txt").read_text()
    assert "num_partitions=2" in hlo and "s8[2,2,384,128]" in hlo  # each device: 2 of the 4 rows' int8 codes
