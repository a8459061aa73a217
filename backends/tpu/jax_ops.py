"""One JAX lowering per r1c op name (the semantics are the references in ir/ops/*.py).

A lowering takes the context, its operands as JAX arrays and the op, and returns one array per result. Floats are
computed in float32 (lower.py widens narrow operands and rounds results to their declared dtype, as the
interpreter does). Masks, RoPE frequencies and block maps depend only on attributes and static shapes, so they are
built with numpy at trace time and enter the program as constants.

Backward ops (`attention_grad`, `rmsnorm_grad`, ...) are the `jax.vjp` of their forward op's lowering: one
definition of the math per op, and the attention/MoE backward then runs the Pallas kernels' own backward.

The hot ops have two forms, picked by `Ctx.kernels`: "pallas" (megablox `gmm` for grouped GEMMs, `splash_attention`
for attention; on a TPU compile they are Mosaic custom calls, on XLA:CPU they run in Pallas interpret mode) and
"xla" (`lax.ragged_dot` and a masked softmax, plain XLA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from r1c.ir import dims
from r1c.ir.core import Op
from r1c.ir.ops.attention_tiled import block_map_from_mask, map_columns, structured_mask
from r1c.ir.ops.moe_fused import capacity
from r1c.ir.ops.nn import rope_inv_freq
from r1c.ir.ops.quant import inner_attention, qmax, reduced_axes
from r1c.ir.types import DType

KERNELS = ("pallas", "xla")
F32 = jnp.float32
LANES = 128  # TPU vector lane width: Pallas blocks are padded to multiples of it


def jdtype(d: DType) -> Any:
    return {
        DType.f32: jnp.float32,
        DType.bf16: jnp.bfloat16,
        DType.f16: jnp.float16,
        DType.fp8e4m3: jnp.float8_e4m3fn,
        DType.int8: jnp.int8,
        DType.int32: jnp.int32,
        DType.bool: jnp.bool_,
    }[d]


@dataclass
class Ctx:
    """What lowerings need besides operands: the bound symbolic dims, the kernel form, Pallas interpret mode
    (True off-TPU) and the matmul precision (f32 semantics on TPU need HIGHEST; DEFAULT is bf16 passes)."""

    env: dict[str, int] = field(default_factory=dict)
    kernels: str = "pallas"
    interpret: bool = True
    precision: Any = lax.Precision.HIGHEST
    mesh: Any = None  # a jax Mesh over the axes `data` and `expert`: Pallas calls are then wrapped in shard_map

    def axis(self, name: str) -> int:
        return int(self.mesh.shape[name]) if self.mesh is not None and name in self.mesh.shape else 1

    def dims(self, ds: tuple) -> tuple[int, ...]:
        return tuple(d if d == -1 else dims.evaluate(d, self.env) for d in ds)


Lowering = Callable[[Ctx, list[Any], Op], list[Any]]
LOWERINGS: dict[str, Lowering] = {}


def lowers(*names: str) -> Callable[[Lowering], Lowering]:
    def wrap(fn: Lowering) -> Lowering:
        for n in names:
            if n in LOWERINGS:
                raise ValueError(f"tpu: op '{n}' has two lowerings")
            LOWERINGS[n] = fn
        return fn

    return wrap


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- elementwise ----

UNARY: dict[str, Callable[[Any], Any]] = {
    "neg": jnp.negative,
    "exp": jnp.exp,
    "log": jnp.log,
    "sqrt": jnp.sqrt,
    "rsqrt": lax.rsqrt,
    "reciprocal": lambda x: 1.0 / x,
    "abs": jnp.abs,
    "square": jnp.square,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": lambda x: x * jax.nn.sigmoid(x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": lambda x: jnp.maximum(x, 0),
    "softplus": lambda x: jnp.logaddexp(0.0, x),
    "sin": jnp.sin,
    "cos": jnp.cos,
}
for _n, _f in UNARY.items():
    lowers(_n)(lambda c, ins, op, f=_f: [f(ins[0])])


def _div(a: Any, b: Any) -> Any:
    return a / b if jnp.issubdtype(a.dtype, jnp.floating) else jnp.floor_divide(a, b)


BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "div": _div,
    "pow": jnp.power,
    "maximum": jnp.maximum,
    "minimum": jnp.minimum,
    "eq": jnp.equal,
    "ne": jnp.not_equal,
    "lt": jnp.less,
    "le": jnp.less_equal,
    "gt": jnp.greater,
    "ge": jnp.greater_equal,
    "logical_and": jnp.logical_and,
    "logical_or": jnp.logical_or,
    "swiglu": lambda g, u: g * jax.nn.sigmoid(g) * u,
}
for _n, _f in BINARY.items():
    lowers(_n)(lambda c, ins, op, f=_f: [f(ins[0], ins[1])])

lowers("logical_not")(lambda c, ins, op: [jnp.logical_not(ins[0])])
lowers("where")(lambda c, ins, op: [jnp.where(*ins)])


# ---- values ----


@lowers("constant")
def _constant(c: Ctx, ins: list, op: Op) -> list:
    return [jnp.full(c.dims(op.attrs["shape"]), op.attrs["value"], F32)]


@lowers("iota")
def _iota(c: Ctx, ins: list, op: Op) -> list:
    (like,) = ins
    return [lax.broadcasted_iota(jdtype(op.attrs["dtype"]), like.shape, op.attrs["axis"] % like.ndim)]


@lowers("cast")
def _cast(c: Ctx, ins: list, op: Op) -> list:
    (x,), to = ins, op.attrs["dtype"]
    if to == DType.bool:
        return [x != 0]  # nonzero is true, as the reference (no truncation of 0.5 to 0 first)
    if to.is_float:
        return [x.astype(F32)]
    return [x.astype(jdtype(to))]  # float -> int: XLA's convert truncates toward zero, as np.trunc


# ---- shape ----


@lowers("reshape")
def _reshape(c: Ctx, ins: list, op: Op) -> list:
    return [jnp.reshape(ins[0], c.dims(op.attrs["shape"]))]


lowers("transpose")(lambda c, ins, op: [jnp.transpose(ins[0], op.attrs["perm"])])
lowers("concat")(lambda c, ins, op: [jnp.concatenate(ins, axis=op.attrs["axis"])])


def _slice_index(ndim: int, a: dict) -> tuple:
    idx = [slice(None)] * ndim
    idx[a["axis"]] = slice(a["start"], a["stop"], a["step"])
    return tuple(idx)


lowers("slice")(lambda c, ins, op: [ins[0][_slice_index(ins[0].ndim, op.attrs)]])


@lowers("broadcast_to")
def _broadcast_to(c: Ctx, ins: list, op: Op) -> list:
    (x,), shape = ins, c.dims(op.attrs["shape"])
    return [jnp.broadcast_to(x.reshape((1,) * (len(shape) - x.ndim) + x.shape), shape)]


lowers("gather")(lambda c, ins, op: [jnp.take_along_axis(ins[0], ins[1], axis=op.attrs["axis"], mode="clip")])
lowers("take")(lambda c, ins, op: [jnp.take(ins[0], ins[1], axis=op.attrs["axis"], mode="clip")])
lowers("embedding")(lambda c, ins, op: [jnp.take(ins[0], ins[1], axis=0, mode="clip")])


@lowers("one_hot")
def _one_hot(c: Ctx, ins: list, op: Op) -> list:
    return [(ins[0][..., None] == jnp.arange(op.attrs["depth"], dtype=ins[0].dtype)).astype(F32)]


# ---- reductions ----

REDUCE = {"reduce_sum": jnp.sum, "reduce_mean": jnp.mean, "reduce_max": jnp.max, "reduce_min": jnp.min}
for _n, _f in REDUCE.items():
    lowers(_n)(lambda c, ins, op, f=_f: [f(ins[0], axis=tuple(op.attrs["axes"]), keepdims=op.attrs["keepdims"])])

lowers("argmax")(lambda c, ins, op: [jnp.argmax(ins[0], axis=op.attrs["axis"]).astype(jnp.int32)])
lowers("cumsum")(lambda c, ins, op: [jnp.cumsum(ins[0], axis=op.attrs["axis"])])


def softmax(x: Any, axis: int) -> Any:
    m = jnp.max(x, axis=axis, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))  # an all -inf row gives 0/0 -> nan, as the reference
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=axis, keepdims=True)


lowers("softmax")(lambda c, ins, op: [softmax(ins[0], op.attrs["axis"])])
lowers("log_softmax")(lambda c, ins, op: [jax.nn.log_softmax(ins[0], axis=op.attrs["axis"])])


@lowers("topk")
def _topk(c: Ctx, ins: list, op: Op) -> list:
    (x,), k, axis = ins, op.attrs["k"], op.attrs["axis"] % ins[0].ndim
    xt = jnp.moveaxis(x, axis, -1)
    if op.attrs["largest"]:
        vals, idx = lax.top_k(xt, k)  # ties: the lower index first, as the reference's stable sort
    else:
        idx = jnp.argsort(xt, axis=-1, stable=True)[..., :k]
        vals = jnp.take_along_axis(xt, idx, axis=-1)
    return [jnp.moveaxis(vals, -1, axis), jnp.moveaxis(idx.astype(jnp.int32), -1, axis)]


# ---- linear algebra ----


@lowers("matmul")
def _matmul(c: Ctx, ins: list, op: Op) -> list:
    return [jnp.matmul(ins[0], ins[1], precision=c.precision)]


@lowers("linear")
def _linear(c: Ctx, ins: list, op: Op) -> list:
    x, w = ins
    return [lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=c.precision)]


# ---- model blocks ----


def rmsnorm(x: Any, w: Any, eps: float) -> Any:
    return w * (x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


lowers("rmsnorm")(lambda c, ins, op: [rmsnorm(ins[0], ins[1], op.attrs["eps"])])


def rope(x: Any, pos: Any, a: dict) -> Any:
    inv, scale = rope_inv_freq(x.shape[-1], a)  # static: attributes and the rotary dim only
    angles = pos.astype(F32)[..., None] * jnp.asarray(inv, F32)  # in float32, as HF and the reference
    cos, sin = (jnp.cos(angles) * scale)[:, :, None, :], (jnp.sin(angles) * scale)[:, :, None, :]
    if a["interleaved"]:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


lowers("rope")(lambda c, ins, op: [rope(ins[0], ins[1], op.attrs)])


def cross_entropy(logits: Any, labels: Any, ignore_index: int) -> Any:
    logp = jax.nn.log_softmax(logits, axis=-1)
    keep = labels != ignore_index
    picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    n = jnp.sum(keep)
    return -jnp.sum(jnp.where(keep, picked, 0.0)) / jnp.maximum(n, 1)  # no kept row: 0, as the reference


lowers("cross_entropy")(lambda c, ins, op: [cross_entropy(ins[0], ins[1], op.attrs["ignore_index"])])


# ---- attention ----


def _dense_attention(q: Any, k: Any, v: Any, mask: np.ndarray | Any, scale: float, precision: Any) -> Any:
    """softmax(q k^T * scale, masked) v with grouped k/v heads; mask [Sq, Skv] or [B, 1, Sq, Skv]; a fully masked
    row gives zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # a fully masked row: p is 0 already
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision=precision)


def _splash(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float, interpret: bool) -> Any:
    """Pallas splash attention over the static element mask [Sq, Skv]: sequence and head dims are padded to the
    lane width (padded keys are masked, padded query rows see key 0 so their softmax stays finite, padded head dims
    are zeros and add nothing), the batch is vmapped. Rows the mask leaves empty are zeroed after the kernel, as
    the reference gives."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, h, sq, dk = q.shape
    skv, dv = k.shape[2], v.shape[3]
    sqp, skp, dkp, dvp = (_round_up(n, LANES) for n in (sq, skv, dk, dv))
    full = np.zeros((sqp, skp), dtype=bool)
    full[:sq, :skv] = mask
    full[sq:, 0] = True
    kernel = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([sa.NumpyMask(full) for _ in range(h)]),
        block_sizes=sa.BlockSizes.get_default(),
        interpret=interpret,
    )
    qp = jnp.pad(q * scale, ((0, 0), (0, 0), (0, sqp - sq), (0, dkp - dk)))
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, skp - skv), (0, dkp - dk)))
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, skp - skv), (0, dvp - dv)))
    out = jax.vmap(kernel)(qp, kp, vp)[:, :, :sq, :dv]
    empty = ~mask.any(axis=-1)
    return jnp.where(empty[None, None, :, None], 0.0, out) if empty.any() else out


def attention(c: Ctx, q: Any, k: Any, v: Any, mask: np.ndarray, scale: float) -> Any:
    """Attention with a static element mask [Sq, Skv], in the context's kernel form."""
    if c.kernels != "pallas":
        return _dense_attention(q, k, v, mask, scale, c.precision)
    if c.mesh is None:
        return _splash(q, k, v, mask, scale, c.interpret)
    # The partitioner cannot split a Mosaic call: shard_map runs it per device on its batch rows (the `data` axis;
    # replicated over `expert`).
    from jax.sharding import PartitionSpec as P

    batch = P("data") if c.axis("data") > 1 and q.shape[0] % c.axis("data") == 0 else P()
    return jax.shard_map(
        lambda q_, k_, v_: _splash(q_, k_, v_, mask, scale, c.interpret),
        mesh=c.mesh,
        in_specs=(batch, batch, batch),
        out_specs=batch,
        check_vma=False,
    )(q, k, v)


def _mask_of(a: dict, sq: int, skv: int) -> np.ndarray:
    return structured_mask(sq, skv, {"layout_block": 0, "layout": (), **a})[0]


@lowers("attention", "tiled_attention", "block_sparse_attention")
def _attention(c: Ctx, ins: list, op: Op) -> list:
    # tiled_attention's block map is a function of the same attributes and static lengths (attention_block_map):
    # the splash kernel derives its own block metadata from the element mask, at its own tile sizes.
    q, k, v = ins[:3]
    return [attention(c, q, k, v, _mask_of(op.attrs, q.shape[2], k.shape[2]), op.attrs["scale"])]


@lowers("attention_block_map")
def _block_map(c: Ctx, ins: list, op: Op) -> list:
    q, k = ins
    sq, skv, a = q.shape[2], k.shape[2], op.attrs
    cols = map_columns(skv, a)  # an int: the lengths are static here
    bm, counts = block_map_from_mask(structured_mask(sq, skv, a), a["block_q"], a["block_k"], cols)
    return [jnp.asarray(bm), jnp.asarray(counts)]


# ---- KV cache ----


@lowers("cache_write")
def _cache_write(c: Ctx, ins: list, op: Op) -> list:
    # Out-of-range starts are clamped by dynamic_update_slice (the reference raises): the runtime checks the fill.
    cache, new, start = ins
    layer = op.attrs["layer"]
    rows = jax.vmap(lambda row, n, s: lax.dynamic_update_slice(row, n, (0, s, 0)))(cache[layer], new, start)
    return [cache.at[layer].set(rows)]


@lowers("cached_attention")
def _cached_attention(c: Ctx, ins: list, op: Op) -> list:
    # Query i of row b sits at position start[b] + i and sees slots 0 .. start[b] + i: a per-row mask over all C
    # slots (the fill level is data, so no static block skipping: the dense form).
    q, kc, vc, start = ins
    layer, sq, slots = op.attrs["layer"], q.shape[2], kc.shape[3]
    qpos = start[:, None] + jnp.arange(sq)[None, :]  # [B, S]
    mask = jnp.arange(slots)[None, None, :] <= qpos[:, :, None]  # [B, S, C]
    return [_dense_attention(q, kc[layer], vc[layer], mask[:, None], op.attrs["scale"], c.precision)]


# ---- MoE ----


def moe_permute(x: Any, ids: Any, e: int, shared: int, cf: float) -> tuple[Any, Any, Any]:
    """(x_sorted [T*K, D], offsets [E+1], row_of [T, K]) as the reference: a stable sort of the pairs by expert,
    dropped pairs (capacity) moved past the kept rows and marked -1."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    n = t * k
    if cf > 0:
        routed = e - shared
        order0 = jnp.argsort(flat, stable=True)
        sorted_ids = flat[order0]
        rank = jnp.arange(n) - jnp.searchsorted(sorted_ids, sorted_ids, side="left")
        keep_sorted = (sorted_ids >= routed) | (rank < capacity(cf, t, k - shared, routed))
        keep = jnp.zeros(n, bool).at[order0].set(keep_sorted)
    else:
        keep = jnp.ones(n, bool)
    key = jnp.where(keep, flat, e)  # dropped pairs sort after every kept row
    order = jnp.argsort(key, stable=True)
    kept = jnp.sum(keep)
    counts = jnp.bincount(key, length=e + 1)[:e]
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    row_of = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    row_of = jnp.where(keep, row_of, -1).reshape(t, k)
    x_sorted = jnp.where((jnp.arange(n) < kept)[:, None], x[order // k], 0.0)
    return x_sorted, offsets, row_of


def gather_rows(y: Any, row_of: Any) -> Any:
    out = y[jnp.maximum(row_of, 0)]
    return jnp.where((row_of >= 0)[..., None], out, 0.0)


def scatter_rows(z: Any, row_of: Any) -> Any:
    t, k, d = z.shape
    idx = jnp.where(row_of >= 0, row_of, t * k).reshape(-1)  # -1: out of bounds, dropped by the scatter
    return jnp.zeros((t * k, d), z.dtype).at[idx].add(z.reshape(t * k, d), mode="drop")


def _gmm(x: Any, w: Any, offsets: Any, first: Any, interpret: bool) -> Any:
    """megablox gmm over the rows of groups first .. first + w's E (a traced `first` under expert parallelism);
    other rows 0. Rows are padded to the m tile, contraction and output dims to the lane width (zeros add
    nothing); group_offset selects the experts this call holds."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    m, e = x.shape[0], w.shape[0]
    tm = min(128, _round_up(m, 8))
    mp, kp, np_ = _round_up(m, tm), _round_up(x.shape[1], LANES), _round_up(w.shape[1], LANES)
    xp = jnp.pad(x, ((0, mp - m), (0, kp - x.shape[1])))
    wp = jnp.pad(w, ((0, 0), (0, np_ - w.shape[1]), (0, kp - w.shape[2])))
    sizes = jnp.diff(offsets).astype(jnp.int32)
    first = jnp.asarray(first, jnp.int32)
    out = megablox.gmm(xp, wp, sizes, F32, (tm, LANES, LANES), first, None, True, interpret)[:m, : w.shape[1]]
    rows = jnp.arange(m)
    lo, hi = offsets[first], offsets[first + e]
    return jnp.where(((rows >= lo) & (rows < hi))[:, None], out, 0.0)  # the kernel leaves other rows unwritten


def grouped_matmul(c: Ctx, x: Any, w: Any, offsets: Any, first: int) -> Any:
    """out[r] = x[r] @ w[i]^T for the rows of group first+i (i < w's E), 0 elsewhere."""
    m, e = x.shape[0], w.shape[0]
    lo, hi = offsets[first], offsets[first + e]
    n_exp = c.axis("expert")
    if c.kernels == "pallas" and c.mesh is not None:
        from jax.sharding import PartitionSpec as P

        # Experts that do not split evenly (a fused dispatch of routed + shared experts) are padded with empty
        # zero-weight groups: group_offsets repeats its end, so they own no rows.
        pad = -e % n_exp
        if pad:
            w = jnp.concatenate([w, jnp.zeros((pad, *w.shape[1:]), w.dtype)])
            offsets = jnp.concatenate([offsets, jnp.broadcast_to(offsets[-1:], (pad,))])
        per = (e + pad) // n_exp

        def shard(x_: Any, w_: Any, off_: Any) -> Any:
            # Expert parallel: each device multiplies the rows of its own experts; every row belongs to one
            # expert, so the sum over the expert axis assembles the result.
            mine = first + lax.axis_index("expert") * per if n_exp > 1 else first
            out = _gmm(x_, w_, off_, mine, c.interpret)
            return lax.psum(out, "expert") if n_exp > 1 else out

        wspec = P("expert") if n_exp > 1 else P()
        return jax.shard_map(shard, mesh=c.mesh, in_specs=(P(), wspec, P()), out_specs=P(), check_vma=False)(
            x, w, offsets
        )
    if c.kernels == "pallas":
        return _gmm(x, w, offsets, first, c.interpret)
    # ragged_dot needs groups that tile the rows: rows before/after this dispatch's experts form two extra
    # groups against zero weights.
    sizes = jnp.concatenate([lo[None], jnp.diff(offsets[first : first + e + 1]), (m - hi)[None]]).astype(jnp.int32)
    zero = jnp.zeros((1, w.shape[2], w.shape[1]), w.dtype)
    rhs = jnp.concatenate([zero, jnp.swapaxes(w, 1, 2), zero])
    return lax.ragged_dot(x, rhs, sizes, precision=c.precision)


@lowers("moe_permute")
def _moe_permute(c: Ctx, ins: list, op: Op) -> list:
    a = op.attrs
    return list(moe_permute(ins[0], ins[1], a["num_experts"], a["num_shared"], a["capacity_factor"]))


lowers("moe_gather_rows")(lambda c, ins, op: [gather_rows(ins[0], ins[1])])
lowers("moe_scatter_rows")(lambda c, ins, op: [scatter_rows(ins[0], ins[1])])
lowers("moe_unpermute")(lambda c, ins, op: [jnp.einsum("tk,tkd->td", ins[2], gather_rows(ins[0], ins[1]))])
lowers("grouped_matmul")(lambda c, ins, op: [grouped_matmul(c, *ins, op.attrs["first_expert"])])


@lowers("grouped_matmul_wgrad")
def _gmm_wgrad(c: Ctx, ins: list, op: Op) -> list:
    # dw[i] = sum over group first+i of dy^T x: the transpose of grouped_matmul in w (tgmm under Pallas).
    dy, x, offsets = ins
    n, first = op.attrs["num_experts"], op.attrs["first_expert"]
    w0 = jnp.zeros((n, dy.shape[1], x.shape[1]), F32)
    _, pullback = jax.vjp(lambda w: grouped_matmul(c, x, w, offsets, first), w0)
    return [pullback(dy)[0]]


def moe_experts(c: Ctx, x: Any, ids: Any, w: Any, wg: Any, wu: Any, wd: Any) -> Any:
    """The routed SwiGLU experts as permute -> grouped GEMMs -> weighted combine (the expert-fusion form), so the
    unfused op also runs the grouped-GEMM kernel and computes only the routed rows."""
    x_sorted, offsets, row_of = moe_permute(x, ids, wg.shape[0], 0, 0.0)
    h = grouped_matmul(c, x_sorted, wg, offsets, 0)
    h = h * jax.nn.sigmoid(h) * grouped_matmul(c, x_sorted, wu, offsets, 0)
    y = grouped_matmul(c, h, wd, offsets, 0)
    return jnp.einsum("tk,tkd->td", w, gather_rows(y, row_of))


lowers("moe_experts")(lambda c, ins, op: [moe_experts(c, *ins)])


# ---- backward ops: the VJP of the forward lowering ----


def _vjp(fn: Callable, primals: list, g: Any) -> list:
    _, pullback = jax.vjp(fn, *primals)
    return list(pullback(g))


@lowers("attention_grad")
def _attention_grad(c: Ctx, ins: list, op: Op) -> list:
    q, k, v, g = ins
    mask = _mask_of(op.attrs, q.shape[2], k.shape[2])
    return _vjp(lambda q_, k_, v_: attention(c, q_, k_, v_, mask, op.attrs["scale"]), [q, k, v], g)


@lowers("rmsnorm_grad")
def _rmsnorm_grad(c: Ctx, ins: list, op: Op) -> list:
    x, w, g = ins
    return _vjp(lambda x_, w_: rmsnorm(x_, w_, op.attrs["eps"]), [x, w], g)


@lowers("rope_grad")
def _rope_grad(c: Ctx, ins: list, op: Op) -> list:
    g, pos = ins
    return _vjp(lambda x_: rope(x_, pos, op.attrs), [jnp.zeros_like(g)], g)


@lowers("cross_entropy_grad")
def _xent_grad(c: Ctx, ins: list, op: Op) -> list:
    logits, labels, g = ins
    return _vjp(lambda x_: cross_entropy(x_, labels, op.attrs["ignore_index"]), [logits], g)


@lowers("gelu_grad")
def _gelu_grad(c: Ctx, ins: list, op: Op) -> list:
    x, g = ins
    return _vjp(UNARY["gelu"], [x], g)


@lowers("moe_experts_grad")
def _moe_grad(c: Ctx, ins: list, op: Op) -> list:
    x, ids, w, wg, wu, wd, g = ins
    return _vjp(lambda x_, w_, a_, b_, d_: moe_experts(c, x_, ids, w_, a_, b_, d_), [x, w, wg, wu, wd], g)


def _along_axis(idx: Any, axis: int) -> tuple:
    """Index arrays addressing base[..idx[..i..]..] along `axis` (take_along_axis's positions)."""
    grids = list(jnp.indices(idx.shape, sparse=True))
    grids[axis] = idx
    return tuple(grids)


@lowers("scatter_add")
def _scatter_add(c: Ctx, ins: list, op: Op) -> list:
    base, idx, upd = ins
    return [base.at[_along_axis(idx, op.attrs["axis"] % base.ndim)].add(upd)]


@lowers("index_add")
def _index_add(c: Ctx, ins: list, op: Op) -> list:
    base, idx, upd = ins
    ax = op.attrs["axis"] % base.ndim
    moved = jnp.moveaxis(base, ax, 0)
    flat = jnp.moveaxis(upd.reshape(base.shape[:ax] + (idx.size,) + base.shape[ax + 1 :]), ax, 0)
    return [jnp.moveaxis(moved.at[idx.reshape(-1)].add(flat), 0, ax)]


lowers("slice_scatter")(lambda c, ins, op: [ins[0].at[_slice_index(ins[0].ndim, op.attrs)].set(ins[1])])


# ---- optimizer ----


@lowers("adamw_update")
def _adamw(c: Ctx, ins: list, op: Op) -> list:
    p, g, m, v, lr, step = ins
    a, t = op.attrs, step.astype(F32)
    b1, b2 = a["beta1"], a["beta2"]
    p = p * (1.0 - lr * a["weight_decay"])
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    denom = jnp.sqrt(v) / jnp.sqrt(1.0 - b2**t) + a["eps"]
    return [p - (lr / (1.0 - b1**t)) * m / denom, m, v]


@lowers("sgd_update")
def _sgd(c: Ctx, ins: list, op: Op) -> list:
    p, g, buf, lr = ins
    d = g + op.attrs["weight_decay"] * p
    if op.attrs["momentum"]:
        d = op.attrs["momentum"] * buf + d
        buf = d
    return [p - lr * d, buf]


lowers("global_norm")(lambda c, ins, op: [jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in ins))])
lowers("clip_coef")(lambda c, ins, op: [jnp.minimum(1.0, op.attrs["max_norm"] / (ins[0] + op.attrs["eps"]))])


@lowers("lr_schedule")
def _lr_schedule(c: Ctx, ins: list, op: Op) -> list:
    a, step = op.attrs, ins[0].astype(F32)
    warmup, lr, min_lr = a["warmup"], a["lr"], a["min_lr"]
    progress = jnp.minimum(1.0, (step - warmup) / max(1, a["total"] - warmup))
    if a["kind"] == "constant":
        decayed = jnp.asarray(lr, F32)
    else:
        shape = 0.5 * (1.0 + jnp.cos(math.pi * progress)) if a["kind"] == "cosine" else 1.0 - progress
        decayed = min_lr + (lr - min_lr) * shape
    return [jnp.where(step <= warmup, lr * step / max(warmup, 1), decayed) if warmup > 0 else decayed]


lowers("balance_bias_update")(lambda c, ins, op: [ins[0] + op.attrs["gamma"] * jnp.sign(jnp.mean(ins[1]) - ins[1])])


# ---- KV quantization ----


def quantize(x: Any, dtype: DType, bits: int, token_axis: int, granularity: str) -> tuple[Any, Any]:
    top = qmax(dtype, bits)
    amax = jnp.max(jnp.abs(x), axis=reduced_axes(x.ndim, token_axis % x.ndim, granularity), keepdims=True)
    scale = amax / top
    y = jnp.where(scale > 0, x / jnp.where(scale > 0, scale, 1.0), 0.0)
    y = jnp.where(jnp.isnan(y), 0.0, jnp.clip(y, -top, top))
    q = jnp.rint(y).astype(jnp.int8) if dtype == DType.int8 else y  # fp8: rounded by the result's dtype
    return q, scale


@lowers("quantize")
def _quantize(c: Ctx, ins: list, op: Op) -> list:
    a = op.attrs
    return list(quantize(ins[0], a["dtype"], a["bits"], a["token_axis"], a["granularity"]))


lowers("dequantize")(lambda c, ins, op: [ins[0].astype(F32) * ins[1]])


def _inner(c: Ctx, op: Op, q: Any, k: Any, v: Any, n_maps: int) -> Any:
    """The attention a quantized op wraps (attention, tiled or block-sparse) on dequantized K/V."""
    inner, attrs = inner_attention(op.attrs, n_maps, op.name)
    return attention(c, q, k, v, _mask_of(attrs, q.shape[2], k.shape[2]), attrs["scale"])


def _decode_kvq(c: Ctx, qs: list, ks: list, v: Any, a: dict) -> Any:
    """The quantized-KV decode kernel (backends/tpu/pallas_decode.py), per device on its batch rows under a mesh."""
    from r1c.backends.tpu.pallas_decode import QuantKV, decode_attention

    def run(qs_: list, ks_: list, v_: Any) -> Any:
        return decode_attention(
            qs_, ks_, v_, a["scale"], a["causal"], a["window"], a["sinks"], interpret=c.interpret, precision=c.precision
        )

    if c.mesh is None:
        return run(qs, ks, v)
    from jax.sharding import PartitionSpec as P

    b = qs[0].shape[0]
    kvs = ks + ([] if v is None else [v])
    flat = [x for kv in kvs for x in (kv.codes, jnp.broadcast_to(kv.scale, (b, *kv.scale.shape[1:])))]
    batch = P("data") if c.axis("data") > 1 and b % c.axis("data") == 0 else P()

    def shard(qs_: list, flat_: list) -> Any:
        kvs_ = [QuantKV(flat_[2 * i], flat_[2 * i + 1], kv.fp8) for i, kv in enumerate(kvs)]
        return run(qs_, kvs_[: len(ks)], None if v is None else kvs_[-1])

    specs = ([batch] * len(qs), [batch] * len(flat))
    return jax.shard_map(shard, mesh=c.mesh, in_specs=specs, out_specs=batch, check_vma=False)(qs, flat)


def _fp8_codes(op: Op) -> bool:
    return op.operands[1].type.dtype == DType.fp8e4m3  # lower.py has widened the fp8 codes to float32 values


@lowers("attention_kvq")
def _attention_kvq(c: Ctx, ins: list, op: Op) -> list:
    q, kq, ks, vq, vs, *maps = ins
    if c.kernels == "pallas":
        from r1c.backends.tpu.pallas_decode import QuantKV, supported

        k, v = QuantKV(kq, ks, _fp8_codes(op)), QuantKV(vq, vs, _fp8_codes(op))
        if supported(q.shape[2], [k, v], op.attrs):  # decode: dequantized inside the Pallas kernel
            return [_decode_kvq(c, [q], [k], v, op.attrs)]
    # Prefill (or a scale varying over tokens and channels): dequantized in XLA (fused into its producer) before
    # splash.
    return [_inner(c, op, q, kq.astype(F32) * ks, vq.astype(F32) * vs, len(maps))]


@lowers("mla_attention_kvq")
def _mla_attention_kvq(c: Ctx, ins: list, op: Op) -> list:
    q, lq, ls, rq, rs, w, *maps = ins
    dn, dv = op.attrs["qk_nope_head_dim"], op.attrs["v_head_dim"]
    h, cl = q.shape[1], lq.shape[2]
    w = w.reshape(h, dn + dv, cl)
    if c.kernels == "pallas":
        from r1c.backends.tpu.pallas_decode import QuantKV, supported

        # The inner MQA: one kv head; keys [latent | k_rot] (two parts, each with its scale), values the latent.
        lat = QuantKV(lq[:, None], ls[:, None], _fp8_codes(op))
        rot = QuantKV(jnp.transpose(rq, (0, 2, 1, 3)), jnp.transpose(rs, (0, 2, 1, 3)), _fp8_codes(op))
        if supported(q.shape[2], [lat, rot], op.attrs):
            q_lat = jnp.einsum("bhsd,hdc->bhsc", q[..., :dn], w[:, :dn], precision=c.precision)
            o_lat = _decode_kvq(c, [q_lat, q[..., dn:]], [lat, rot], None, op.attrs)
            return [jnp.einsum("bhsc,hec->bhse", o_lat, w[:, dn:], precision=c.precision)]
    latent = (lq.astype(F32) * ls)[:, None]  # [B, 1, Skv, C]
    k_rot = jnp.transpose(rq.astype(F32) * rs, (0, 2, 1, 3))  # [B, 1, Skv, dr]
    q_lat = jnp.einsum("bhsd,hdc->bhsc", q[..., :dn], w[:, :dn], precision=c.precision)
    qk = jnp.concatenate([q_lat, q[..., dn:]], axis=-1)
    kk = jnp.concatenate([latent, k_rot], axis=-1)
    o_lat = _inner(c, op, qk, kk, latent, len(maps))
    return [jnp.einsum("bhsc,hec->bhse", o_lat, w[:, dn:], precision=c.precision)]


__all__ = ["KERNELS", "LOWERINGS", "Ctx", "jdtype"]
