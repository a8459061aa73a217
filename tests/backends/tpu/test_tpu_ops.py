"""The tpu target's JAX lowerings (backends/tpu/jax_ops.py) against the reference interpreter, op by op.

Every op of the bundled models' flows (r1-tiny's forward unfused, after expert-fusion + sparse-attention-tiling and
after kv-quant, the training step with gradients and AdamW, the KV-cache decode step; a small DeepSeek-V2-Lite
forward) is lowered alone and fed the reference's own values of its operands from a run on random tokens and
weights, so each lowering is checked in isolation on realistic data (valid expert ids, offsets, caches). The fused
and attention ops run in both kernel forms (Pallas in interpret mode, and plain XLA). Edge cases the models do not
reach (capacity drops, split expert dispatches, empty groups, window/sinks/block-sparse masks at lengths that are
not tile multiples, fully masked rows, ragged cache fills, quantization formats) have their own IR below.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import r1c  # noqa: E402
from r1c.backends.tpu.jax_ops import LOWERINGS, Ctx  # noqa: E402
from r1c.backends.tpu.lower import LoweringError, _narrow, _widen, lower  # noqa: E402
from r1c.ir.core import Function, Module  # noqa: E402
from r1c.ir.interpreter import bind_dims, init_weights, random_inputs, run_function  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402
from r1c.passes import PassManager  # noqa: E402
from r1c.train.config import TrainConfig  # noqa: E402
from r1c.train.step import build_train_step  # noqa: E402

EXAMPLES = Path(__file__).parents[3] / "examples"
FUSED = "canonicalize,cse,dce,expert-fusion,sparse-attention-tiling,cse,dce"
KERNEL_OPS = {  # ops whose lowering differs between the Pallas and the XLA form
    "attention", "tiled_attention", "block_sparse_attention", "attention_grad", "grouped_matmul",
    "grouped_matmul_wgrad", "moe_experts", "moe_experts_grad", "attention_kvq", "mla_attention_kvq",
}  # fmt: skip
RNG = np.random.default_rng(11)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def check(got: np.ndarray, want: np.ndarray, what: str, tol: float = 2e-5) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    if want.dtype.kind == "f":
        finite = np.isfinite(want)  # -inf fills (masked scores) must match exactly, the rest within tol
        np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
        if finite.any():
            assert rel(got[finite], want[finite]) < tol, f"{what}: relative error {rel(got[finite], want[finite]):.3g}"
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def all_values(m: Module, f: Function, inputs: list, weights: dict) -> tuple[dict, dict]:
    """Every value of f on the reference (f with all values as results), and the bound dims."""
    every = [v for op in f.body for v in op.results]
    whole = Function(f.name, f.args, f.body, list(f.args) + every)
    vals = run_function(m, whole, inputs, weights)
    return dict(zip(whole.results, vals)), bind_dims(f, inputs)


def check_ops_alone(
    m: Module, f: Function, inputs: list, weights: dict, tol: float = 2e-5, pallas: bool = True
) -> set[str]:
    """Each op's lowering on the reference's operand values equals the reference's results; the op names seen.
    One instance per (op, attributes, operand types): the layers repeat the same ops on other values. The ops are
    traced into one jitted function per kernel form (one XLA compile instead of hundreds of eager ones), each op
    still reading only the reference's values."""
    values, env = all_values(m, f, inputs, weights)
    ops, done = [], set()
    for op in f.body:
        key = (op.name, repr(sorted(op.attrs.items())), tuple(str(v.type) for v in op.operands))
        if op.name != "param" and key not in done:
            done.add(key)
            ops.append(op)
    for kernels in ("pallas", "xla") if pallas else ("xla",):
        chosen = [op for op in ops if kernels == "xla" or op.name in KERNEL_OPS]
        ctx = Ctx(env=env, kernels=kernels, interpret=True)

        def alone(operands: list, chosen: list = chosen, ctx: Ctx = ctx) -> list:
            outs = []
            for op, ins in zip(chosen, operands):
                res = LOWERINGS[op.name](ctx, [_widen(x) for x in ins], op)
                assert len(res) == len(op.results), op.name
                outs.append([_narrow(jnp.asarray(o), r.type.dtype) for r, o in zip(op.results, res)])
            return outs

        got = jax.jit(alone)([[values[v] for v in op.operands] for op in chosen])
        for op, outs in zip(chosen, got):
            for r, o in zip(op.results, outs):
                o = np.asarray(o).astype(r.type.dtype.numpy)
                check(o, values[r], f"{op.name} -> %{r.name} ({kernels}) at {op.loc}", tol)
    return {op.name for op in ops}


def tiny(**overrides: int) -> Module:
    return r1c.load(str(EXAMPLES / "r1-tiny.r1"), overrides=overrides or None)


@pytest.mark.parametrize(
    "pipeline, function, env",
    [
        (FUSED, "forward", {"B": 2, "S": 9}),
        ("expert-fusion,sparse-attention-tiling,kv-quant{dtype=int8}", "forward", {"B": 2, "S": 9}),
        (FUSED, "decode", {"B": 2, "S": 3, "C": 8}),
    ],
)
def test_r1_tiny_ops_alone(pipeline, function, env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert-fusion's note on shared experts
        m = PassManager(pipeline).run(tiny(num_layers=2))
    w = init_weights(m, 0)
    f = m.functions[function]
    inputs = random_inputs(m, f, env, 3)
    if function == "decode":
        inputs[-1] = np.array([0, 5], np.int32)  # one prefill row, one row with 5 cached tokens
    seen = check_ops_alone(m, f, inputs, w)
    want = (
        {"tiled_attention", "grouped_matmul", "moe_permute"} if pipeline == FUSED and function == "forward" else set()
    )
    assert want <= seen


def test_train_step_ops_alone():
    """Forward, every backward op (attention, MoE, RMSNorm, RoPE, cross-entropy, scatters), clipping, AdamW."""
    m = build_train_step(tiny(num_layers=2), TrainConfig())
    w = init_weights(m, 0)
    f = m.functions["train_step"]
    inputs = random_inputs(m, f, {"B": 2, "S": 8}, 4)
    inputs[-1] = np.array(3, np.int32)
    # The Pallas backward (splash dq/dkv, tgmm) is checked by the attention and MoE tests below.
    seen = check_ops_alone(m, f, inputs, w, tol=5e-5, pallas=False)
    backward = {"attention_grad", "moe_experts_grad", "rmsnorm_grad", "rope_grad", "cross_entropy_grad", "index_add",
                "scatter_add", "slice_scatter", "adamw_update", "global_norm", "clip_coef", "lr_schedule"}  # fmt: skip
    assert backward <= seen


def test_deepseek_v2_lite_forward_ops_alone():
    m = r1c.load(
        str(EXAMPLES / "deepseek-v2-lite.r1"),
        overrides={"num_layers": 2, "hidden_size": 64, "vocab_size": 128, "moe_intermediate_size": 32,
                   "intermediate_size": 96},
    )  # fmt: skip
    m = PassManager(FUSED).run(m)
    w = init_weights(m, 0)
    f = m.functions["forward"]
    check_ops_alone(m, f, random_inputs(m, f, {"B": 1, "S": 7}, 5), w)


def run_both(text: str, inputs: list, tol: float = 2e-5) -> None:
    """Whole function through lower() in both kernel forms against the reference."""
    m = parse_module(text, "test.ir")
    f = m.main
    want = run_function(m, f, inputs, {})
    for kernels in ("pallas", "xla"):
        got = jax.jit(lower(m, f.name, kernels=kernels).fn)(*inputs)
        for i, (g, r) in enumerate(zip(got, want)):
            check(np.asarray(g).astype(np.asarray(r).dtype), r, f"result {i} ({kernels})", tol)


def F(*s: int) -> np.ndarray:
    return RNG.standard_normal(s).astype(np.float32)


MOE = """module @m {
  func @forward(%x: f32[T,16], %ids: int32[T,3], %wt: f32[T,3], %w: f32[5,24,16], %wd: f32[5,16,12],
                %xr: f32[T*3,16], %offs: int32[6], %dy: f32[T*3,24], %z: f32[T,3,16], %rows: int32[T,3])
      -> (f32[T*3,16], int32[6], int32[T,3], f32[T,24], f32[T*3,16], f32[5,24,16], f32[2,24,16], f32[T,3,16],
          f32[T*3,16], f32[T,16]) {
    %xs, %off, %ro = moe_permute(%x, %ids) {num_experts=5, num_shared=1, capacity_factor=0.5}
        : f32[T*3,16], int32[6], int32[T,3]
    %h = grouped_matmul(%xs, %w, %off) {first_expert=0} : f32[T*3,24]
    %o = moe_unpermute(%h, %ro, %wt) : f32[T,24]
    %wd23 = slice(%wd) {axis=0, start=2, stop=4, step=1} : f32[2,16,12]
    %a = slice(%dy) {axis=1, start=0, stop=12, step=1} : f32[T*3,12]
    %part = grouped_matmul(%a, %wd23, %offs) {first_expert=2} : f32[T*3,16]
    %wg1 = grouped_matmul_wgrad(%dy, %xr, %offs) {first_expert=0, num_experts=5} : f32[5,24,16]
    %wg2 = grouped_matmul_wgrad(%dy, %xr, %offs) {first_expert=3, num_experts=2} : f32[2,24,16]
    %gr = moe_gather_rows(%xr, %rows) : f32[T,3,16]
    %sr = moe_scatter_rows(%z, %rows) : f32[T*3,16]
    %wg = slice(%w) {axis=1, start=0, stop=12, step=1} : f32[5,12,16]
    %wu = slice(%w) {axis=1, start=12, stop=24, step=1} : f32[5,12,16]
    %me = moe_experts(%x, %ids, %wt, %wg, %wu, %wd) : f32[T,16]
    return %xs, %off, %ro, %o, %part, %wg1, %wg2, %gr, %sr, %me
  }
}"""


@pytest.mark.parametrize("t, skew", [(37, False), (20, True)])
def test_moe_ops_capacity_split_dispatch_empty_groups(t, skew):
    routed = np.full((t, 2), 2) if skew else RNG.integers(0, 4, (t, 2))  # skew: one expert takes all, drops
    ids = np.concatenate([routed, np.full((t, 1), 4)], axis=1).astype(np.int32)
    r = 3 * t
    cuts = np.sort(RNG.integers(0, r + 1, 4))
    offs = np.array([0, cuts[0], cuts[0], cuts[1], cuts[2], cuts[3]], np.int32)  # group 1 empty, padding tail
    rows = RNG.integers(-1, r, (t, 3)).astype(np.int32)  # -1s and repeats: scatter adds
    inputs = [F(t, 16), ids, F(t, 3), F(5, 24, 16), F(5, 16, 12), F(r, 16), offs, F(r, 24), F(t, 3, 16), rows]
    run_both(MOE, inputs)


ATTN = """module @m {
  func @forward(%q: f32[1,4,S,24], %k: f32[1,2,S,24], %v: f32[1,2,S,16]) -> (f32[1,4,S,16], f32[1,4,S,16],
                f32[1,4,S,16], f32[1,4,S,24], f32[1,2,S,24], f32[1,2,S,16]) {
    %a = attention(%q, %k, %v) {scale=0.2, causal=true, window=37, sinks=3} : f32[1,4,S,16]
    %bm, %cnt = attention_block_map(%q, %k) {block_q=64, block_k=64, causal=true, window=0, sinks=0,
        layout_block=32, layout=[0, 0, 1, 0, 3, 2, 4, 4]} : int32[1,S_cdiv64,COLS,2], int32[1,S_cdiv64]
    %t = tiled_attention(%q, %k, %v, %bm, %cnt) {scale=0.2, block_q=64, block_k=64, causal=true, window=0,
        sinks=0, layout_block=32, layout=[0, 0, 1, 0, 3, 2, 4, 4]} : f32[1,4,S,16]
    %b = block_sparse_attention(%q, %k, %v) {scale=0.2, causal=false, window=0, sinks=0, layout_block=32,
        layout=[0, 1, 2, 2]} : f32[1,4,S,16]
    %dq, %dk, %dv = attention_grad(%q, %k, %v, %a) {scale=0.2, causal=true, window=37, sinks=3}
        : f32[1,4,S,24], f32[1,2,S,24], f32[1,2,S,16]
    return %a, %t, %b, %dq, %dk, %dv
  }
}"""


def test_attention_masks_at_lengths_off_the_tiles():
    """Window + sinks, a block-sparse layout (rows 64..95 see nothing: zeros), S=150 (not a multiple of 128),
    GQA, head dims 24/16 (padded to the lane width inside the kernel); the dense backward through the kernel."""
    s = 150
    text = ATTN.replace("COLS", "2")
    run_both(text, [F(1, 4, s, 24), F(1, 2, s, 24), F(1, 2, s, 16)])


CACHE = """module @m {
  func @forward(%kc: f32[2,B,2,C,8], %vc: f32[2,B,2,C,8], %kn: f32[B,2,S,8], %q: f32[B,4,S,8], %start: int32[B])
      -> (f32[2,B,2,C,8], f32[B,4,S,8]) {
    %k2 = cache_write(%kc, %kn, %start) {layer=1} : f32[2,B,2,C,8]
    %o = cached_attention(%q, %k2, %vc, %start) {layer=1, scale=0.3} : f32[B,4,S,8]
    return %k2, %o
  }
}"""


def test_cache_write_and_attention_with_ragged_fills():
    b, c, s = 3, 12, 4
    run_both(CACHE, [F(2, b, 2, c, 8), F(2, b, 2, c, 8), F(b, 2, s, 8), F(b, 4, s, 8), np.array([0, 3, 8], np.int32)])


QUANT = """module @m {
  func @forward(%x: f32[2,6,3,16], %q: f32[2,4,6,16]) -> (int8[2,6,3,16], f32[2,6,1,1], fp8e4m3[2,6,3,16],
                f32[2,1,3,16], int8[2,6,3,16], f32[2,6,3,16], f32[2,4,6,16]) {
    %q8, %s8 = quantize(%x) {dtype=int8, bits=8, granularity="per_token", token_axis=1} : int8[2,6,3,16], f32[2,6,1,1]
    %qf, %sf = quantize(%x) {dtype=fp8e4m3, bits=8, granularity="per_channel", token_axis=1}
        : fp8e4m3[2,6,3,16], f32[2,1,3,16]
    %q4, %s4 = quantize(%x) {dtype=int8, bits=4, granularity="per_token", token_axis=1} : int8[2,6,3,16], f32[2,6,1,1]
    %d = dequantize(%qf, %sf) {dtype=f32, bits=8} : f32[2,6,3,16]
    %kt = transpose(%x) {perm=[0, 2, 1, 3]} : f32[2,3,6,16]
    %k = slice(%kt) {axis=1, start=0, stop=2, step=1} : f32[2,2,6,16]
    %kq, %ks = quantize(%k) {dtype=int8, bits=8, granularity="per_channel", token_axis=2}
        : int8[2,2,6,16], f32[2,2,1,16]
    %o = attention_kvq(%q, %kq, %ks, %kq, %ks) {scale=0.25, block_q=64, block_k=64, causal=true, window=0,
        sinks=0, layout_block=0, layout=[], bits=8} : f32[2,4,6,16]
    return %q8, %s8, %qf, %sf, %q4, %d, %o
  }
}"""


def test_quantize_formats_and_attention_on_quantized_kv():
    run_both(QUANT, [F(2, 6, 3, 16) * 3, F(2, 4, 6, 16)])


MISC = """module @m {
  func @forward(%x: f32[5,7], %labels: int32[5], %step: int32[], %p: f32[5,7], %g: f32[5,7])
      -> (f32[5,3], int32[5,3], f32[], f32[], f32[], f32[5,7], f32[5,7], f32[5,7], f32[5,7], f32[5,7]) {
    %v, %i = topk(%x) {k=3, axis=1, largest=false} : f32[5,3], int32[5,3]
    %ce = cross_entropy(%x, %labels) {ignore_index=2} : f32[]
    %lr = lr_schedule(%step) {lr=0.01, warmup=4, total=20, min_lr=0.001, kind="cosine"} : f32[]
    %lr2 = lr_schedule(%step) {lr=0.01, warmup=0, total=20, min_lr=0.001, kind="linear"} : f32[]
    %np, %m1, %m2 = adamw_update(%p, %g, %x, %p, %lr, %step) {beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1}
        : f32[5,7], f32[5,7], f32[5,7]
    %sp, %buf = sgd_update(%p, %g, %x, %lr) {momentum=0.9, weight_decay=0.01} : f32[5,7], f32[5,7]
    %ge = gelu(%x) : f32[5,7]
    return %v, %i, %ce, %lr, %lr2, %np, %m1, %sp, %buf, %ge
  }
}"""


@pytest.mark.parametrize("step", [2, 9])
def test_topk_smallest_cross_entropy_ignore_and_optimizers(step):
    labels = np.array([1, 2, 6, 2, 0], np.int32)  # rows 1 and 3 are ignored
    p = np.abs(F(5, 7)) + 0.1  # the second moment must be positive
    run_both(MISC, [F(5, 7), labels, np.array(step, np.int32), p, F(5, 7)], tol=1e-5)


def test_an_op_without_lowering_is_a_named_error():
    text = """module @m {
  func @forward(%q: f32[1,2,4,8], %k: f32[1,2,4,8], %v: f32[1,2,4,8], %idx: int32[1,4,2]) -> (f32[1,2,4,8]) {
    %o = dsa_attention(%q, %k, %v, %idx) {scale=0.5} : f32[1,2,4,8]
    return %o
  }
}"""
    m = parse_module(text, "t.ir")
    with pytest.raises(LoweringError, match=r"no lowering for op\(s\) dsa_attention in @forward .*%o"):
        lower(m, "forward")
    with pytest.raises(LoweringError, match="kernels must be one of pallas, xla"):
        lower(m, "forward", kernels="cuda")
