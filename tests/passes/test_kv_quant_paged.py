"""kv-quant on paged steps (passes/kv_quant_paged.py): the bundled model's `paged_step` with an int8 / fp8 pool,
prefill and decode steps on the reference interpreter against `forward` within the pass's declared tolerance, and
the errors. (The golden files tests/golden/kv-quant/paged_*.ir fix the rewritten IR.)"""

from __future__ import annotations

import numpy as np
import pytest

from r1c.frontends.dsl import load
from r1c.ir import init_weights, parse_module, print_module, run, verify
from r1c.ir.types import DType
from r1c.passes import PassManager, PipelineError, get_pass

MODEL = "examples/r1-tiny.r1"
DENSE = {"first_k_dense": 3}  # MoE routing flips are jumps no error bound covers (docs/passes.md, kv-quant)


def _steps(module, weights, tokens: np.ndarray, pools: list[np.ndarray], prefill: int) -> np.ndarray:
    """Logits of a prefill of `prefill` tokens then one decode step per remaining token, through @paged_step."""
    b, s = tokens.shape
    page, m = pools[0].shape[2], 4
    table = np.full((b, m), -1, np.int32)
    table[:, : -(-s // page)] = (
        np.random.default_rng(5).permutation(pools[0].shape[1])[: b * -(-s // page)].reshape(b, -1)
    )
    outs, start = [], 0
    for stop in [prefill, *range(prefill + 1, s + 1)]:
        logits, *pools = run(module, [tokens[:, start:stop], *pools, table, np.full(b, start, np.int32)], weights,
                             function="paged_step")  # fmt: skip
        outs.append(logits)
        start = stop
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("dtype", ["int8", "fp8e4m3"])
def test_quantized_paged_step_matches_forward_within_tolerance(dtype):
    base = load(MODEL, DENSE)
    weights = init_weights(base, 0)
    pipeline = f"kv-quant{{dtype={dtype}}}"
    quant = PassManager(pipeline).run(load(MODEL, DENSE))
    verify(quant)
    assert parse_module(print_module(quant)) == quant
    f = quant.functions["paged_step"]
    assert [a.name for a in f.args] == ["tokens", "kv_pool", "kv_pool_scale", "block_table", "start"]
    assert f.args[1].type.dtype == DType(dtype) and f.args[2].type.shape[3] == 5  # (32 + 8) / gcd(32, 8)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (2, 9)).astype(np.int32)
    want = run(base, [tokens], weights, function="forward")[0]
    pool = rng.integers(-100, 100, (3, 12, 4, 40)).astype(np.int8)  # stale codes and scales: must not be read
    if dtype == "fp8e4m3":
        pool = np.clip(rng.standard_normal(pool.shape), -4, 4).astype(np.float32)
    scales = rng.random((3, 12, 4, 5)).astype(np.float32)
    got = _steps(quant, weights, tokens, [pool, scales], prefill=5)
    err = np.abs(got - want).max() / np.abs(want).max()
    allowed = get_pass("kv-quant").tolerance_for({"dtype": DType(dtype), "bits": 8})
    assert 0 < err <= allowed, (err, allowed)
    # the float paged step is exact: the quantization is what the error measures
    exact = _steps(base, weights, tokens, [rng.standard_normal((3, 12, 4, 40)).astype(np.float32)], prefill=5)
    assert np.abs(exact - want).max() / np.abs(want).max() < 1e-6


def test_only_named_functions_and_errors():
    named = PassManager("kv-quant{functions=forward}").run(load(MODEL))
    assert named.functions["paged_step"].args[1].type.dtype == DType.f32  # not named: left alone
    four = PassManager("kv-quant{bits=4}").run(load(MODEL))  # 4-bit: the forward only, the pool stays float
    assert four.functions["paged_step"].args[1].type.dtype == DType.f32
    with pytest.raises(PipelineError, match="paged pools store 8-bit codes, not bits=4"):
        PassManager("kv-quant{bits=4,functions=paged_step}").run(load(MODEL))
    bad = parse_module(
        """module @m {
  func @forward(%x: f32[B,S,40], %p: f32[1,P,T,40], %table: int32[B,M], %start: int32[B]) -> (f32[1,P,T,40]) {
    %pool = neg(%p) : f32[1,P,T,40]
    %p1 = paged_write(%pool, %x, %table, %start) {layer=0} : f32[1,P,T,40]
    return %p1
  }
}"""
    )
    with pytest.raises(PipelineError, match="reads pool %pool, which is neither an argument"):
        PassManager("kv-quant").run(bad)
