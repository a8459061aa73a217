"""Model building blocks with one fixed meaning each: embedding, RMSNorm, RoPE (with YaRN), cross-entropy."""

from __future__ import annotations

import math

import numpy as np

from r1c.ir.ops._util import require_float, require_int, require_rank, same_dim
from r1c.ir.ops.grad_util import zeros
from r1c.ir.registry import AttrSpec, Cost, OpDef, OpError, bytes_of, per_input_cost, register
from r1c.ir.types import DType, TensorType


def _embedding_rule(ins, a):
    table, ids = ins
    require_rank("embedding", table, 2, "table")
    require_int("embedding", ids, "token ids")
    return [TensorType(table.dtype, ids.shape + (table.shape[1],))]


def _embedding_ref(ins, a):
    table, ids = ins
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise OpError(f"embedding: token id out of range [0, {table.shape[0]}): min {ids.min()}, max {ids.max()}")
    return [table[ids.astype(np.int64)]]


def _embedding_vjp(fb, op, cts):
    table, ids = op.operands
    (g,) = cts
    if g is None:
        return [None, None]
    return [fb.index_add(zeros(fb, table.type), ids, g, axis=0), None]


register(
    OpDef(
        "embedding",
        "Rows of table[V, D] selected by integer ids.",
        ("table", "ids"),
        _embedding_rule,
        _embedding_ref,
        lambda ins, outs, a: Cost(0, bytes_of(ins[1:]) + 2 * bytes_of(outs)),
        vjp=_embedding_vjp,
    )
)


def _rmsnorm_rule(ins, a):
    x, w = ins
    require_float("rmsnorm", x)
    require_rank("rmsnorm", w, 1, "weight")
    same_dim("rmsnorm", x.shape[-1], w.shape[0], "normalized size")
    return [x]


def _rmsnorm_ref(ins, a):
    x, w = (v.astype(np.float64) for v in ins)
    return [w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + a["eps"]))]


def _rmsnorm_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None]
    return list(fb.rmsnorm_grad(*op.operands, g, eps=op.attrs["eps"]))


register(
    OpDef(
        "rmsnorm",
        "w * x / sqrt(mean(x^2, last axis) + eps), in float32 or wider.",
        ("x", "w"),
        _rmsnorm_rule,
        _rmsnorm_ref,
        per_input_cost(4),
        {"eps": AttrSpec("float", 1e-6)},
        vjp=_rmsnorm_vjp,
    )
)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, a: dict) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale (YaRN's attention factor), as HF transformers computes them."""
    base = a["theta"]
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if a["scaling"] == "none":
        return 1.0 / pos_freqs, 1.0
    factor, mscale, mscale_all = a["factor"], a["mscale"], a["mscale_all_dim"]
    attention_factor = (
        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all else yarn_mscale(factor)
    )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(a["original_max_position"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(a["beta_fast"]), correction_dim(a["beta_slow"])
    low, high = max(math.floor(low), 0), min(math.ceil(high), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention_factor


def _rope_rule(ins, a):
    x, pos = ins
    require_float("rope", x)
    require_int("rope", pos, "positions")
    require_rank("rope", x, 4, "input [B, S, H, D]")
    require_rank("rope", pos, 2, "positions [B, S]")
    same_dim("rope", x.shape[0], pos.shape[0], "batch")
    same_dim("rope", x.shape[1], pos.shape[1], "sequence")
    if isinstance(x.shape[3], int) and x.shape[3] % 2:
        raise OpError(f"rope: rotary dim must be even, got {x.shape[3]}")
    return [x]


def rope_cos_sin(dim: int, pos: np.ndarray, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """Scaled cos and sin of the rotation angles, shaped [B, S, 1, dim/2] to broadcast over heads."""
    inv, scale = rope_inv_freq(dim, a)
    # HF computes angles in float32; so do we, or large positions drift apart.
    angles = (pos.astype(np.float32)[..., None] * inv.astype(np.float32)).astype(np.float64)  # [B, S, D/2]
    return (np.cos(angles) * scale)[:, :, None, :], (np.sin(angles) * scale)[:, :, None, :]


def _rope_ref(ins, a):
    x, pos = ins
    x = x.astype(np.float64)
    cos, sin = rope_cos_sin(x.shape[-1], pos, a)
    if a["interleaved"]:
        # Pairs (x0,x1),(x2,x3),... rotate together; the result is laid out [evens | odds] like DeepSeek-V3 in HF.
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return [np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)]


def _rope_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None]
    return [fb.rope_grad(g, op.operands[1], **op.attrs), None]


register(
    OpDef(
        "rope",
        "Rotary position embedding of x[B, S, H, D] at positions[B, S]; optional YaRN frequency scaling.",
        ("x", "positions"),
        _rope_rule,
        _rope_ref,
        per_input_cost(6),
        {
            "theta": AttrSpec("float", 10000.0),
            "interleaved": AttrSpec("bool", False),
            "scaling": AttrSpec("str", "none", ("none", "yarn")),
            "factor": AttrSpec("float", 1.0),
            "original_max_position": AttrSpec("int", 4096),
            "beta_fast": AttrSpec("float", 32.0),
            "beta_slow": AttrSpec("float", 1.0),
            "mscale": AttrSpec("float", 1.0),
            "mscale_all_dim": AttrSpec("float", 0.0),
        },
        vjp=_rope_vjp,
    )
)


def _xent_rule(ins, a):
    logits, labels = ins
    require_float("cross_entropy", logits)
    require_int("cross_entropy", labels, "labels")
    require_rank("cross_entropy", logits, 2, "logits [N, V]")
    require_rank("cross_entropy", labels, 1, "labels [N]")
    same_dim("cross_entropy", logits.shape[0], labels.shape[0], "rows")
    return [TensorType(DType.f32, ())]


def _xent_ref(ins, a):
    logits, labels = ins
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    keep = labels != a["ignore_index"]
    bad = keep & ((labels < 0) | (labels >= x.shape[-1]))
    if bad.any():  # a negative label would otherwise silently index from the end
        raise OpError(
            f"cross_entropy: label {labels[bad][0]} out of range [0, {x.shape[-1]}) "
            f"and not ignore_index {a['ignore_index']}"
        )
    if not keep.any():
        return [np.float64(0.0)]
    picked = logp[np.arange(len(labels))[keep], labels[keep].astype(np.int64)]
    return [-picked.mean()]


def _xent_vjp(fb, op, cts):
    (g,) = cts
    if g is None:
        return [None, None]
    return [fb.cross_entropy_grad(*op.operands, g, **op.attrs), None]


register(
    OpDef(
        "cross_entropy",
        "Mean negative log-likelihood of labels under softmax(logits); rows whose label is "
        "`ignore_index` do not count.",
        ("logits", "labels"),
        _xent_rule,
        _xent_ref,
        per_input_cost(5),
        {"ignore_index": AttrSpec("int", -100)},
        vjp=_xent_vjp,
    )
)
