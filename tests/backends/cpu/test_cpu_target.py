"""The cpu target (TVM Relax, LLVM for this host) against the reference interpreter: every lowered op on random
inputs, r1-tiny and a small V2-style model end to end at two shapes (one build serves both: symbolic dims), and the
errors for what is not lowered."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import r1c  # noqa: E402
from r1c.backends.cpu.lower import LoweringError  # noqa: E402
from r1c.backends.cpu.relax_ops import LOWERINGS  # noqa: E402
from r1c.ir.interpreter import init_weights, run  # noqa: E402
from r1c.ir.parser import parse_module  # noqa: E402

EXAMPLES = Path(__file__).parents[3] / "examples"


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def check(text: str, inputs: list[np.ndarray], tmp_path, tol: float = 2e-6) -> None:
    m = parse_module(text, "test.ir")
    art = r1c.compile(m, target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    got, want = art.run(inputs), run(m, inputs, {})
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if w.dtype.kind == "f":
            assert rel(g, w) < tol
        else:
            np.testing.assert_array_equal(g, w)


RNG = np.random.default_rng(0)
F = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731

CASES = {
    "elementwise": (
        """module @m {
  func @forward(%x: f32[B,4], %y: f32[4], %i: int32[B,4]) -> (f32[B,4], int32[B,4], bool[B,4]) {
    %0 = exp(%x) : f32[B,4]
    %1 = mul(%0, %y) : f32[B,4]
    %2 = sigmoid(%1) : f32[B,4]
    %3 = silu(%2) : f32[B,4]
    %4 = div(%3, %y) : f32[B,4]
    %5 = sub(%4, %x) : f32[B,4]
    %6 = swiglu(%5, %x) : f32[B,4]
    %c = constant() {dtype=int32, shape=[], value=3.0} : int32[]
    %7 = div(%i, %c) : int32[B,4]
    %8 = gt(%x, %y) : bool[B,4]
    %9 = where(%8, %6, %x) : f32[B,4]
    return %9, %7, %8
  }
}""",
        [F(3, 4), F(4), RNG.integers(-9, 9, (3, 4)).astype(np.int32)],
    ),
    "linear_rmsnorm_softmax_reduce": (
        """module @m {
  func @forward(%x: f32[B,S,8], %w: f32[6,8], %g: f32[6]) -> (f32[B,S,6], f32[B,S,6], f32[B,6], f32[B,S,1]) {
    %0 = linear(%x, %w) : f32[B,S,6]
    %1 = rmsnorm(%0, %g) {eps=1e-5} : f32[B,S,6]
    %2 = softmax(%1) {axis=-1} : f32[B,S,6]
    %3 = reduce_sum(%2) {axes=[1], keepdims=false} : f32[B,6]
    %4 = reduce_max(%1) {axes=[-1], keepdims=true} : f32[B,S,1]
    return %1, %2, %3, %4
  }
}""",
        [F(2, 5, 8), F(6, 8), F(6)],
    ),
    "shapes": (
        """module @m {
  func @forward(%x: f32[B,6,4], %y: f32[B,6,2]) -> (f32[B,4,3], f32[B,6,6], f32[6,B,3], f32[2,B,6,2]) {
    %0 = slice(%x) {axis=1, start=0, stop=6, step=2} : f32[B,3,4]
    %1 = transpose(%0) {perm=[0,2,1]} : f32[B,4,3]
    %2 = concat(%x, %y) {axis=-1} : f32[B,6,6]
    %3 = reshape(%2) {shape=[B*6,6]} : f32[B*6,6]
    %4 = slice(%3) {axis=-1, start=1, stop=4, step=1} : f32[B*6,3]
    %5 = reshape(%4) {shape=[B,6,3]} : f32[B,6,3]
    %6 = transpose(%5) {perm=[1,0,2]} : f32[6,B,3]
    %7 = broadcast_to(%y) {shape=[2,B,6,2]} : f32[2,B,6,2]
    return %1, %2, %6, %7
  }
}""",
        [F(3, 6, 4), F(3, 6, 2)],
    ),
    "indexing": (
        """module @m {
  func @forward(%t: f32[10,4], %ids: int32[B,S], %x: f32[B,S,5])
      -> (f32[B,S,4], f32[B,S,2], int32[B,S,2], f32[B,S,2], f32[B,S,3], int32[B,S]) {
    %0 = embedding(%t, %ids) : f32[B,S,4]
    %1, %2 = topk(%x) {k=2, axis=-1, largest=true} : f32[B,S,2], int32[B,S,2]
    %3 = gather(%x, %2) {axis=-1} : f32[B,S,2]
    %4 = one_hot(%ids) {depth=3, dtype=f32} : f32[B,S,3]
    %5 = iota(%ids) {axis=1, dtype=int32} : int32[B,S]
    return %0, %1, %2, %3, %4, %5
  }
}""",
        [F(10, 4), RNG.integers(0, 3, (2, 7)).astype(np.int32), F(2, 7, 5)],
    ),
    "attention_gqa_causal": (
        """module @m {
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,T,8], %v: f32[B,2,T,6]) -> (f32[B,4,S,6], f32[B,4,S,6]) {
    %0 = attention(%q, %k, %v) {scale=0.3, causal=true, window=0, sinks=0} : f32[B,4,S,6]
    %1 = attention(%q, %k, %v) {scale=0.3, causal=false, window=0, sinks=0} : f32[B,4,S,6]
    return %0, %1
  }
}""",
        [F(2, 4, 3, 8), F(2, 2, 7, 8), F(2, 2, 7, 6)],
    ),
    "rope": (
        """module @m {
  func @forward(%x: f32[B,S,2,8], %p: int32[B,S]) -> (f32[B,S,2,8], f32[B,S,2,8]) {
    %0 = rope(%x, %p) {theta=10000.0, interleaved=true, scaling="yarn", factor=4.0, original_max_position=16,
                            beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0} : f32[B,S,2,8]
    %1 = rope(%x, %p) {theta=500.0, interleaved=false, scaling="none", factor=1.0, original_max_position=4096,
                            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0} : f32[B,S,2,8]
    return %0, %1
  }
}""",
        [F(2, 5, 2, 8), RNG.integers(0, 300, (2, 5)).astype(np.int32)],
    ),
    "moe_experts": (
        """module @m {
  func @forward(%x: f32[T,8], %ids: int32[T,2], %wt: f32[T,2], %g: f32[4,6,8], %u: f32[4,6,8],
                %d: f32[4,8,6]) -> (f32[T,8]) {
    %0 = moe_experts(%x, %ids, %wt, %g, %u, %d) : f32[T,8]
    return %0
  }
}""",
        [
            F(5, 8),
            np.array([[0, 3], [1, 2], [3, 1], [2, 0], [1, 1]], np.int32),
            F(5, 2),
            F(4, 6, 8),
            F(4, 6, 8),
            F(4, 8, 6),
        ],  # fmt: skip
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowered_ops_match_the_reference(name, tmp_path):
    text, inputs = CASES[name]
    check(text, inputs, tmp_path)


def test_every_lowering_is_exercised():
    """Every lowering appears as `name(` in the IR text of some cpu test (this file's CASES or a sibling's)."""
    text = "\n".join(t for t, _ in CASES.values()) + "".join(
        p.read_text() for p in Path(__file__).parent.glob("test_*.py")
    )
    untested = {n for n in LOWERINGS if f"{n}(" not in text}
    # the remaining unary/binary ops share the table lowering of the ones above
    assert untested <= {"neg", "sqrt", "log", "rsqrt", "abs", "cos", "sin", "add", "lt", "ge", "le", "eq", "ne",
                        "maximum", "minimum", "cast", "take", "matmul"}, untested  # fmt: skip


@pytest.mark.parametrize(
    "model,overrides",
    [
        ("r1-tiny.r1", {}),
        (
            "deepseek-v2-lite.r1",
            dict(
                num_layers=2,
                hidden_size=64,
                num_heads=4,
                intermediate_size=96,
                moe_intermediate_size=32,
                n_routed_experts=8,
                experts_per_tok=2,
                n_group=2,
                topk_group=1,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=8,
                vocab_size=300,
            ),
        ),  # fmt: skip
    ],
)
def test_models_end_to_end(model, overrides, tmp_path):
    m = r1c.load(EXAMPLES / model, overrides=overrides)
    w = init_weights(m, 0)
    art = r1c.compile(m, target="cpu", weights=w, out_dir=tmp_path / "a")
    for shape in ((2, 16), (1, 7)):  # one build, two shapes
        toks = np.random.default_rng(sum(shape)).integers(0, m.attrs["vocab_size"], shape).astype(np.int32)
        assert rel(art.run([toks])[0], run(m, [toks], w)[0]) < 1e-5


def test_unlowered_op_is_a_clear_error(tmp_path):
    text = """module @m {
  func @forward(%x: f32[4]) -> (f32[4]) {
    %0 = cumsum(%x) {axis=0} : f32[4]
    return %0
  }
}"""
    with pytest.raises(LoweringError, match="no lowering for op 'cumsum'"):
        r1c.compile(parse_module(text), target="cpu", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    grad = """module @m {
  func @forward(%q: f32[B,4,S,8], %k: f32[B,2,S,8], %v: f32[B,2,S,6], %g: f32[B,4,S,6])
      -> (f32[B,4,S,8], f32[B,2,S,8], f32[B,2,S,6]) {
    %dq, %dk, %dv = attention_grad(%q, %k, %v, %g) {scale=0.3, causal=true, window=0, sinks=0}
        : f32[B,4,S,8], f32[B,2,S,8], f32[B,2,S,6] loc("layers.1")
    return %dq, %dk, %dv
  }
}"""  # the backward of attention (training runs on the reference interpreter): not lowered for cpu
    with pytest.raises(LoweringError, match=r"no lowering for op 'attention_grad' \(defining %dq, .*loc layers.1"):
        r1c.compile(parse_module(grad), target="cpu", weights={}, out_dir=tmp_path / "b", options={"passes": ""})


def test_cpu_arm_cross_compiles_to_aarch64_neon(tmp_path):
    """cpu-arm: object files for aarch64 (ELF e_machine 183) whose assembly uses NEON vector FMAs. Not run: this
    machine has no aarch64 TVM runtime (qemu-user would also need one)."""
    import tarfile

    m = r1c.load(EXAMPLES / "r1-tiny.r1")
    art = r1c.compile(m, target="cpu-arm", weights=init_weights(m, 0), out_dir=tmp_path / "a", options={"asm": True})
    with tarfile.open(art.path / "cpu_lib.tar") as tar:
        objects = [tar.extractfile(x).read() for x in tar.getmembers() if x.name.endswith(".o")]
    assert objects and all(o[:4] == b"\x7fELF" and int.from_bytes(o[18:20], "little") == 183 for o in objects)
    asm = (art.path / "cpu_lib.s").read_text()
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) > 10  # aarch64 NEON: 4 x f32 fused multiply-adds
    with pytest.raises(ValueError, match="cannot be executed|no runner|run"):
        art.run([np.zeros((1, 4), np.int32)])
