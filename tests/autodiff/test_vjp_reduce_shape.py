"""VJPs of reductions, softmax, cumsum, topk, data movement and matrix products against torch autograd, with
hypothesis-chosen shapes, (negative) axes, keepdims and broadcast batch dims."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c import build
from r1c.ir import run
from r1c.ir.core import DimList
from r1c.ir.types import DType, tensor
from r1c.passes.grad import grad_function

SETTINGS = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**16)


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@st.composite
def shape_and_axes(draw, min_rank=1):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=min_rank, max_size=4)))
    axes = draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True))
    return shape, tuple(a - len(shape) if draw(st.booleans()) else a for a in axes)


REDUCE = {"reduce_sum": torch.sum, "reduce_mean": torch.mean, "reduce_max": torch.amax, "reduce_min": torch.amin}


@SETTINGS
@given(name=st.sampled_from(sorted(REDUCE)), sa=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_reduce_vjp(check_vjp, name, sa, keepdims, seed):
    shape, axes = sa
    fn = REDUCE[name]
    check_vjp(name, [normal(shape, seed)], lambda x: fn(x, dim=axes, keepdim=keepdims), axes=axes, keepdims=keepdims)


def test_reduce_max_ties_share_like_amax(check_vjp):
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], np.float32)
    check_vjp("reduce_max", [x], lambda x: torch.amax(x, dim=1), axes=(1,))
    check_vjp("reduce_min", [x], lambda x: torch.amin(x, dim=-1), axes=(-1,))


def test_reduce_mean_symbolic_count():
    """The mean over a symbolic axis divides by its run-time size: d mean(w[None, :] * c[:, None]) / dw_j
    is sum(c) / (B * 3)."""
    mb = build.ModuleBuilder("m")
    fb = mb.function("loss", c=tensor("f32", ["B"]))
    w = fb.broadcast_to(fb.param("w", tensor("f32", [3])), shape=DimList(("B", 3)))
    fb.ret(fb.reduce_mean(fb.mul(w, fb.reshape(fb.args[0], shape=DimList(("B", 1)))), axes=(0, 1)))
    m = grad_function(mb.build(), "loss")
    c = np.array([1.0, 2.0, 4.0, 5.0, 3.0], np.float32)
    _, gw = run(m, [c], {"w": np.array([0.3, -1.0, 2.0], np.float32)}, function="loss_grad")
    np.testing.assert_allclose(gw, np.full(3, c.sum() / (5 * 3)), rtol=1e-6)


@SETTINGS
@given(name=st.sampled_from(["softmax", "log_softmax", "cumsum"]), sa=shape_and_axes(), seed=seeds)
def test_softmax_cumsum_vjp(check_vjp, name, sa, seed):
    shape, axes = sa
    axis = axes[0]
    fn = {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "cumsum": torch.cumsum}[name]
    check_vjp(name, [normal(shape, seed)], lambda x: fn(x, dim=axis), axis=axis)


@SETTINGS
@given(sa=shape_and_axes(), largest=st.booleans(), data=st.data(), seed=seeds)
def test_topk_values_vjp(check_vjp, sa, largest, data, seed):
    shape, axes = sa
    axis = axes[0]
    k = data.draw(st.integers(1, shape[axis]))
    check_vjp(
        "topk",
        [normal(shape, seed)],
        lambda x: torch.topk(x, k, dim=axis, largest=largest),
        k=k,
        axis=axis,
        largest=largest,
    )


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple), seed=seeds)
def test_reshape_transpose_vjp(check_vjp, shape, seed):
    x = normal(shape, seed)
    perm = tuple(np.random.default_rng(seed).permutation(len(shape)).tolist())
    check_vjp("transpose", [x], lambda t: t.permute(perm), perm=perm)
    target = (-1,) + shape[2:]
    check_vjp("reshape", [x], lambda t: t.reshape(target), shape=DimList(target))


@SETTINGS
@given(sa=shape_and_axes(), n=st.integers(1, 3), data=st.data(), seed=seeds)
def test_concat_vjp(check_vjp, sa, n, data, seed):
    shape, axes = sa
    axis = axes[0]
    xs = [
        normal(tuple(data.draw(st.integers(1, 3)) if i == axis % len(shape) else d for i, d in enumerate(shape)), s)
        for s in range(seed, seed + n)
    ]
    check_vjp("concat", xs, lambda *ts: torch.cat(ts, dim=axis), axis=axis)


@SETTINGS
@given(sa=shape_and_axes(), data=st.data(), seed=seeds)
def test_slice_vjp(check_vjp, sa, data, seed):
    shape, axes = sa
    axis = axes[0]
    size = shape[axis]
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, size))
    step = data.draw(st.integers(1, 3))

    def torch_slice(x):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, stop, step)
        return x[tuple(idx)]

    check_vjp("slice", [normal(shape, seed)], torch_slice, axis=axis, start=start, stop=stop, step=step)


@SETTINGS
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple), lead=st.integers(0, 2), seed=seeds)
def test_broadcast_to_vjp(check_vjp, shape, lead, seed):
    target = (2,) * lead + tuple(3 if d == 1 and seed % 2 else d for d in shape)
    check_vjp("broadcast_to", [normal(shape, seed)], lambda x: x.broadcast_to(target), shape=DimList(target))


@SETTINGS
@given(sa=shape_and_axes(), data=st.data(), seed=seeds)
def test_gather_vjp_with_repeats(check_vjp, sa, data, seed):
    shape, axes = sa
    axis = axes[0]
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(1, 5))
    idx_shape = tuple(n if i == axis % len(shape) else d for i, d in enumerate(shape))
    idx = rng.integers(0, shape[axis], idx_shape).astype(np.int32)  # repeats: contributions must add up
    check_vjp("gather", [normal(shape, seed), idx], lambda x, i: torch.gather(x, axis, i.long()), axis=axis)


@SETTINGS
@given(sa=shape_and_axes(), idx_shape=st.lists(st.integers(1, 3), max_size=2).map(tuple), seed=seeds)
def test_take_vjp_with_repeats(check_vjp, sa, idx_shape, seed):
    shape, axes = sa
    axis = axes[0]
    idx = np.random.default_rng(seed).integers(0, shape[axis], idx_shape).astype(np.int32)

    def torch_take(x, i):
        ax = axis % x.ndim
        return torch.index_select(x, ax, i.long().flatten()).reshape(x.shape[:ax] + i.shape + x.shape[ax + 1 :])

    check_vjp("take", [normal(shape, seed), idx], torch_take, axis=axis)


@st.composite
def matmul_shapes(draw):
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    batch = draw(st.lists(st.integers(2, 3), max_size=2))
    a_batch = tuple(1 if draw(st.booleans()) else d for d in batch)
    b_batch = tuple(1 if draw(st.booleans()) else d for d in batch)[draw(st.integers(0, len(batch))) :]
    return a_batch + (m, k), b_batch + (k, n)


@SETTINGS
@given(shapes=matmul_shapes(), seed=seeds)
def test_matmul_vjp_broadcast_batch(check_vjp, shapes, seed):
    check_vjp("matmul", [normal(shapes[0], seed), normal(shapes[1], seed + 1)], torch.matmul)


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), max_size=3).map(tuple), n_in=st.integers(1, 5), n_out=st.integers(1, 5), seed=seeds
)
def test_linear_vjp(check_vjp, lead, n_in, n_out, seed):
    x, w = normal(lead + (n_in,), seed), normal((n_out, n_in), seed + 1)
    check_vjp("linear", [x, w], torch.nn.functional.linear)


def test_cast_vjp(check_vjp):
    check_vjp("cast", [normal((3, 5), 7)], lambda t: t.to(torch.float32), dtype=DType.f32)


def test_cast_to_bf16_gives_the_cotangent_back_in_f32():
    mb = build.ModuleBuilder("m")
    fb = mb.function("loss", c=tensor("bf16", [4]))
    y = fb.cast(fb.param("w", tensor("f32", [4])), dtype=DType.bf16)
    fb.ret(fb.cast(fb.reduce_sum(fb.mul(y, fb.args[0]), axes=(0,)), dtype=DType.f32))
    m = grad_function(mb.build(), "loss")
    c = np.array([1.5, -2.0, 0.25, 3.0], np.float32)  # exact in bf16
    _, gw = run(m, [c], {"w": np.random.default_rng(0).standard_normal(4).astype(np.float32)}, function="loss_grad")
    assert gw.dtype == np.float32
    np.testing.assert_array_equal(gw, c)
