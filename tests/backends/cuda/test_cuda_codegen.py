"""The cuda target's generated kernels, one kind at a time, against the IR ops' numpy references (and the fusion
decisions they come from). Tiny shapes: on a CPU they run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import r1c
from r1c.backends.cuda.lower import LoweringError
from r1c.backends.cuda.runtime import program
from r1c.ir.interpreter import run
from r1c.ir.parser import parse_module

torch = pytest.importorskip("torch")
TOL = {"f32": 1e-5, "f16": 2e-3}


def compile_text(text: str, tmp_path, dtype: str = "f32"):
    module = parse_module(text.replace("{T}", dtype), "test.ir")
    return module, r1c.compile(module, target="cuda", out_dir=tmp_path / "art", options={"passes": ""})


def steps(art) -> list[dict]:
    return json.loads((art.path / "plan.json").read_text())["steps"]


def check(text: str, tmp_path, inputs: list[np.ndarray], dtype: str = "f32"):
    """Compile, run with poisoned buffers, compare every result with the reference; return the plan's steps."""
    module, art = compile_text(text, tmp_path, dtype)
    prog = program(art)
    prog.poison = True
    want = run(module, inputs, {})
    got = prog.run(inputs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if w.dtype.kind == "f":
            w, g = w.astype(np.float64), g.astype(np.float64)
            assert not np.isnan(g).any()  # poisoned: every element was written
            np.testing.assert_array_equal(g[~np.isfinite(w)], w[~np.isfinite(w)])  # -inf of masked routing rows
            fin = np.isfinite(w)
            err = np.linalg.norm(g[fin] - w[fin]) / max(np.linalg.norm(w[fin]), 1e-30)
            assert err < TOL[dtype], err
        else:
            np.testing.assert_array_equal(g, w)
    return steps(art)


def rand(rng, *shape, dtype="f32"):
    return rng.standard_normal(shape).astype(np.float16 if dtype == "f16" else np.float32)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_elementwise_chain_is_one_kernel(tmp_path, dtype):
    text = """module @m {
  func @forward(%x: {T}[2,3,8], %y: {T}[8], %z: {T}[2,1,8]) -> ({T}[2,3,8]) {
    %0 = exp(%x) : {T}[2,3,8]
    %1 = mul(%0, %y) : {T}[2,3,8]
    %2 = sigmoid(%z) : {T}[2,1,8]
    %3 = sub(%1, %2) : {T}[2,3,8]
    %c = constant() {dtype={T}, shape=[], value=0.5} : {T}[]
    %4 = gt(%x, %c) : bool[2,3,8]
    %5 = silu(%3) : {T}[2,3,8]
    %6 = where(%4, %5, %x) : {T}[2,3,8]
    %7 = div(%6, %c) : {T}[2,3,8]
    %8 = neg(%7) : {T}[2,3,8]
    return %8
  }
}"""
    rng = np.random.default_rng(0)
    plan = check(
        text,
        tmp_path,
        [rand(rng, 2, 3, 8, dtype=dtype), rand(rng, 8, dtype=dtype), rand(rng, 2, 1, 8, dtype=dtype)],
        dtype,
    )
    kinds = [s["kind"] for s in plan]
    # sigmoid has another shape ([2,1,8]): its own kernel; the eight [2,3,8] ops are one
    assert kinds.count("ew") == 2 and [len(s["ops"]) for s in plan if s["kind"] == "ew"] == [1, 8]


def test_64_bit_offsets_where_a_launch_needs_them(tmp_path, monkeypatch):
    """BIG (64-bit coordinates) is set from the launch's element count and its operands' strided spans; the
    64-bit path computes the same results (forced here on small tensors: 2^31-element ones do not fit CI)."""
    from types import SimpleNamespace

    from r1c.backends.cuda.codegen import elementwise as ew

    def fake(shape, stride):
        return SimpleNamespace(shape=shape, stride=lambda: stride)

    assert not ew.tile_grid((3, 4), [fake((3, 4), (4, 1))])[1]["BIG"]
    assert ew.tile_grid((3, 4), [fake((3, 4), (1 << 30, 1))])[1]["BIG"]  # a view reaching past 2^31 elements
    assert ew.tile_grid((1 << 16, 1 << 15), [])[1]["BIG"]
    monkeypatch.setattr(ew, "span", lambda t: 1 << 31)
    test_elementwise_chain_is_one_kernel(tmp_path, "f32")


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_linear_absorbs_its_elementwise_consumers(tmp_path, dtype):
    text = """module @m {
  func @forward(%x: {T}[2,5,32], %w: {T}[48,32], %r: {T}[2,5,48], %b: {T}[48]) -> ({T}[2,5,48]) {
    %0 = linear(%x, %w) : {T}[2,5,48]
    %1 = add(%0, %r) : {T}[2,5,48]
    %2 = silu(%1) : {T}[2,5,48]
    %3 = mul(%2, %b) : {T}[2,5,48]
    return %3
  }
}"""
    rng = np.random.default_rng(1)
    ins = [rand(rng, 2, 5, 32, dtype=dtype), rand(rng, 48, 32, dtype=dtype)]
    plan = check(text, tmp_path, ins + [rand(rng, 2, 5, 48, dtype=dtype), rand(rng, 48, dtype=dtype)], dtype)
    assert [s["kind"] for s in plan] == ["gemm"] and len(plan[0]["ops"]) == 4


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_linear_through_tensor_descriptors(tmp_path, dtype, monkeypatch):
    """The TMA load path of the GEMM template: M, N and K tails (10 rows, 48 columns, K=40) read as zeros."""
    from r1c.backends.cuda.codegen import matmul

    monkeypatch.setattr(matmul, "USE_TMA", True)
    text = """module @m {
  func @forward(%x: {T}[2,5,40], %w: {T}[48,40], %r: {T}[2,5,48]) -> ({T}[2,5,48]) {
    %0 = linear(%x, %w) : {T}[2,5,48]
    %1 = add(%0, %r) : {T}[2,5,48]
    return %1
  }
}"""
    rng = np.random.default_rng(11)
    ins = [rand(rng, 2, 5, 40, dtype=dtype), rand(rng, 48, 40, dtype=dtype), rand(rng, 2, 5, 48, dtype=dtype)]
    check(text, tmp_path, ins, dtype)
    a, b = torch.zeros(1, 10, 40), torch.zeros(48, 40).t()[None]
    assert matmul.tma_operands(a, b) is not None
    assert matmul.tma_operands(a.transpose(1, 2).contiguous().transpose(1, 2), b) is None  # strided K
    assert matmul.tma_operands(a.expand(2, -1, -1), b.expand(2, -1, -1)) is None  # batched


def test_batched_matmul_broadcast(tmp_path):
    text = """module @m {
  func @forward(%a: f32[3,17,20], %b: f32[20,24]) -> (f32[3,17,24]) {
    %0 = matmul(%a, %b) : f32[3,17,24]
    return %0
  }
}"""
    rng = np.random.default_rng(2)
    check(text, tmp_path, [rand(rng, 3, 17, 20), rand(rng, 20, 24)])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_row_kernels(tmp_path, dtype):
    text = """module @m {
  func @forward(%x: {T}[2,3,20], %w: {T}[20])
      -> ({T}[2,3,20], {T}[2,3,20], {T}[2,3,20], {T}[2,20], {T}[2,1,1], {T}[2,3]) {
    %0 = rmsnorm(%x, %w) {eps=1e-06} : {T}[2,3,20]
    %1 = softmax(%x) {axis=-1} : {T}[2,3,20]
    %2 = softmax(%x) {axis=1} : {T}[2,3,20]
    %3 = reduce_sum(%x) {axes=[1], keepdims=false} : {T}[2,20]
    %4 = reduce_max(%x) {axes=[1,2], keepdims=true} : {T}[2,1,1]
    %5 = reduce_mean(%x) {axes=[-1], keepdims=false} : {T}[2,3]
    return %0, %1, %2, %3, %4, %5
  }
}"""
    rng = np.random.default_rng(3)
    check(text, tmp_path, [rand(rng, 2, 3, 20, dtype=dtype), rand(rng, 20, dtype=dtype)], dtype)


@pytest.mark.parametrize("scaling, interleaved", [("yarn", True), ("none", False)])
def test_rope(tmp_path, scaling, interleaved):
    attrs = f'factor=4.0, interleaved={str(interleaved).lower()}, original_max_position=64, scaling="{scaling}"'
    attrs += ", theta=10000.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0"
    text = f"""module @m {{
  func @forward(%x: f32[2,3,5,8], %p: int32[2,5]) -> (f32[2,5,3,8]) {{
    %t = transpose(%x) {{perm=[0,2,1,3]}} : f32[2,5,3,8]
    %0 = rope(%t, %p) {{{attrs}, mscale_all_dim=1.0}} : f32[2,5,3,8]
    return %0
  }}
}}"""
    rng = np.random.default_rng(4)
    check(text, tmp_path, [rand(rng, 2, 3, 5, 8), rng.integers(0, 300, (2, 5)).astype(np.int32)])


def test_routing_ops(tmp_path):
    """embedding, topk (ties and -inf), one_hot, iota, gather: the pieces of MoE routing."""
    text = """module @m {
  func @forward(%t: f32[16,6], %ids: int32[2,3], %s: f32[6,8])
      -> (f32[2,3,6], f32[6,3], int32[6,3], f32[6,3,8], int32[6,8], f32[6,3]) {
    %0 = embedding(%t, %ids) : f32[2,3,6]
    %ninf = constant() {dtype=f32, shape=[], value=-inf} : f32[]
    %half = constant() {dtype=f32, shape=[], value=0.5} : f32[]
    %m = gt(%s, %half) : bool[6,8]
    %s2 = where(%m, %ninf, %s) : f32[6,8]
    %1, %2 = topk(%s2) {axis=-1, k=3, largest=true} : f32[6,3], int32[6,3]
    %3 = one_hot(%2) {depth=8, dtype=f32} : f32[6,3,8]
    %4 = iota(%s) {axis=1, dtype=int32} : int32[6,8]
    %5 = gather(%s, %2) {axis=-1} : f32[6,3]
    return %0, %1, %2, %3, %4, %5
  }
}"""
    rng = np.random.default_rng(5)
    s = np.round(rng.standard_normal((6, 8)), 1).astype(np.float32)  # rounding makes ties
    s[0, :7] = 1.0  # a row with fewer finite values than k
    check(text, tmp_path, [rand(rng, 16, 6), rng.integers(0, 16, (2, 3)).astype(np.int32), s])


def test_take(tmp_path):
    text = """module @m {
  func @forward(%x: f32[3,5,4], %i: int32[2,3], %j: int32[]) -> (f32[3,2,3,4], f32[3,5]) {
    %0 = take(%x, %i) {axis=1} : f32[3,2,3,4]
    %1 = take(%x, %j) {axis=-1} : f32[3,5]
    return %0, %1
  }
}"""
    rng = np.random.default_rng(7)
    ins = [rand(rng, 3, 5, 4), rng.integers(0, 5, (2, 3)).astype(np.int32), np.array(2, np.int32)]
    check(text, tmp_path, ins)


def test_views_and_copies(tmp_path):
    text = """module @m {
  func @forward(%x: f32[4,6], %y: f32[4,2]) -> (f32[24], f32[4,3], f32[4,8], f32[3,4,6], f32[2,6,2]) {
    %t = transpose(%x) {perm=[1,0]} : f32[6,4]
    %0 = reshape(%t) {shape=[24]} : f32[24]
    %1 = slice(%x) {axis=1, start=1, stop=6, step=2} : f32[4,3]
    %2 = concat(%x, %y) {axis=1} : f32[4,8]
    %3 = broadcast_to(%x) {shape=[3,4,6]} : f32[3,4,6]
    %4 = reshape(%t) {shape=[2,6,2]} : f32[2,6,2]
    return %0, %1, %2, %3, %4
  }
}"""
    rng = np.random.default_rng(6)
    check(text, tmp_path, [rand(rng, 4, 6), rand(rng, 4, 2)])


def test_missing_lowering_names_op_and_loc(tmp_path):
    text = """module @m {
  func @forward(%x: f32[4,6]) -> (f32[4,6]) {
    %0 = cumsum(%x) {axis=1} : f32[4,6] loc("layer.7.odd")
    return %0
  }
}"""
    with pytest.raises(LoweringError, match=r"no lowering for op 'cumsum'.*at loc layer\.7\.odd"):
        compile_text(text, tmp_path)


def test_bad_option_is_an_error(tmp_path):
    text = "module @m {\n  func @forward(%x: f32[4]) -> (f32[4]) {\n    %0 = exp(%x) : f32[4]\n    return %0\n  }\n}"
    module = parse_module(text, "t.ir")
    with pytest.raises(ValueError, match="dtype must be one of"):
        r1c.compile(module, target="cuda", out_dir=tmp_path / "a", options={"dtype": "fp8"})
    with pytest.raises(ValueError, match="no option"):
        r1c.compile(module, target="cuda", out_dir=tmp_path / "a", options={"bogus": 1})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tiled_elementwise_and_copies_any_shape(tmp_path_factory, data):
    """Row-tile kernels on random shapes: a transposed operand (strided last dim), a broadcast row, a reshape of the
    transpose (a copy) and a fused exp/mul/add group, all against the reference."""
    rank = data.draw(st.integers(1, 4), label="rank")
    shape = data.draw(st.lists(st.integers(1, 37), min_size=rank, max_size=rank), label="shape")
    perm = data.draw(st.permutations(range(rank)), label="perm")
    tshape = [shape[p] for p in perm]
    dims = lambda s: ",".join(map(str, s))  # noqa: E731
    n = int(np.prod(shape))
    text = f"""module @m {{
  func @forward(%x: f32[{dims(shape)}], %b: f32[{tshape[-1]}]) -> (f32[{dims(tshape)}], f32[{n}]) {{
    %t = transpose(%x) {{perm=[{dims(perm)}]}} : f32[{dims(tshape)}]
    %e = exp(%t) : f32[{dims(tshape)}]
    %m = mul(%e, %b) : f32[{dims(tshape)}]
    %a = add(%m, %t) : f32[{dims(tshape)}]
    %r = reshape(%t) {{shape=[{n}]}} : f32[{n}]
    return %a, %r
  }}
}}"""
    rng = np.random.default_rng(n)
    check(text, tmp_path_factory.mktemp("tile"), [rand(rng, *shape), rand(rng, tshape[-1])])
