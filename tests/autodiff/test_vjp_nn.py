"""VJPs of the model ops (embedding, rmsnorm, rope with YaRN, cross_entropy, attention with GQA/window/sinks,
moe_experts) against torch autograd of straightforward torch implementations."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.ir.ops.attention import attention_mask
from r1c.ir.ops.nn import rope_cos_sin

SETTINGS = settings(max_examples=10, deadline=None)
seeds = st.integers(0, 2**16)


def normal(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@SETTINGS
@given(
    vocab=st.integers(1, 6),
    ids_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    dim=st.integers(1, 4),
    seed=seeds,
)
def test_embedding_vjp_repeated_ids(check_vjp, vocab, ids_shape, dim, seed):
    ids = np.random.default_rng(seed).integers(0, vocab, ids_shape).astype(np.int32)
    check_vjp("embedding", [normal((vocab, dim), seed), ids], lambda t, i: F.embedding(i.long(), t))


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    n=st.integers(1, 8),
    eps=st.sampled_from([1e-6, 1e-2]),
    seed=seeds,
)
def test_rmsnorm_vjp(check_vjp, lead, n, eps, seed):
    def torch_rmsnorm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    check_vjp("rmsnorm", [normal(lead + (n,), seed), normal((n,), seed + 1)], torch_rmsnorm, eps=eps)


YARN = dict(
    scaling="yarn",
    factor=4.0,
    original_max_position=16,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=0.707,
    mscale_all_dim=1.0,
)


@SETTINGS
@given(
    b=st.integers(1, 2),
    s=st.integers(1, 5),
    h=st.integers(1, 3),
    half=st.integers(1, 4),
    interleaved=st.booleans(),
    yarn=st.booleans(),
    seed=seeds,
)
def test_rope_vjp(check_vjp, b, s, h, half, interleaved, yarn, seed):
    attrs = dict(theta=10000.0, interleaved=interleaved, **(YARN if yarn else {}))
    full = {
        "scaling": "none",
        "factor": 1.0,
        "original_max_position": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
        **attrs,
    }
    pos = np.random.default_rng(seed).integers(0, 40, (b, s)).astype(np.int32)
    cos, sin = (torch.tensor(t) for t in rope_cos_sin(2 * half, pos, full))

    def torch_rope(x, p):
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    check_vjp("rope", [normal((b, s, h, 2 * half), seed), pos], torch_rope, **attrs)


@SETTINGS
@given(n=st.integers(1, 6), v=st.integers(2, 7), seed=seeds)
def test_cross_entropy_vjp_ignored_labels(check_vjp, n, v, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, v, n).astype(np.int32)
    labels[rng.random(n) < 0.3] = -100
    labels[0] = rng.integers(0, v)  # at least one row counts (torch's mean over no rows is NaN)
    check_vjp(
        "cross_entropy",
        [normal((n, v), seed, 3.0), labels],
        lambda x, y: F.cross_entropy(x, y.long(), ignore_index=-100),
    )


def test_cross_entropy_vjp_all_ignored_is_zero(check_vjp):
    labels = np.full(3, -7, np.int32)
    check_vjp("cross_entropy", [normal((3, 4), 0), labels], lambda x, y: (x * 0).sum(), ignore_index=-7)


@st.composite
def attention_case(draw):
    hkv = draw(st.integers(1, 2))
    rep = draw(st.integers(1, 3))
    skv = draw(st.integers(1, 6))
    sq = draw(st.integers(1, skv))
    causal = draw(st.booleans())
    window = draw(st.integers(0, 4)) if causal else 0
    sinks = draw(st.integers(0, 2)) if causal else 0
    dk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return dict(
        b=draw(st.integers(1, 2)),
        h=hkv * rep,
        hkv=hkv,
        sq=sq,
        skv=skv,
        dk=dk,
        dv=dv,
        attrs=dict(scale=dk**-0.5, causal=causal, window=window, sinks=sinks),
    )


def torch_attention(q, k, v, scale, causal, window, sinks):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = torch.tensor(attention_mask(q.shape[2], k.shape[2], causal, window, sinks))
    s = torch.where(mask, q @ k.transpose(-1, -2) * scale, -torch.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row attends to nothing
    return p @ v


@SETTINGS
@given(case=attention_case(), seed=seeds)
def test_attention_vjp_gqa_window_sinks(check_vjp, case, seed):
    c, a = case, case["attrs"]
    q = normal((c["b"], c["h"], c["sq"], c["dk"]), seed)
    k = normal((c["b"], c["hkv"], c["skv"], c["dk"]), seed + 1)
    v = normal((c["b"], c["hkv"], c["skv"], c["dv"]), seed + 2)
    check_vjp("attention", [q, k, v], lambda q, k, v: torch_attention(q, k, v, **a), **a)


def torch_moe(x, ids, w, wg, wu, wd):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
            out[t] = out[t] + w[t, j] * (wd[e] @ h)
    return out


@SETTINGS
@given(
    t=st.integers(1, 5), e=st.integers(1, 4), k=st.integers(1, 3), d=st.integers(1, 4), f=st.integers(1, 4), seed=seeds
)
def test_moe_experts_vjp_all_weights(check_vjp, t, e, k, d, f, seed):
    """Gradients w.r.t. x, the routing weights and all three expert stacks (unused experts get zeros)."""
    ids = np.random.default_rng(seed).integers(0, e, (t, k)).astype(np.int32)
    ins = [
        normal((t, d), seed),
        ids,
        normal((t, k), seed + 1),
        normal((e, f, d), seed + 2),
        normal((e, f, d), seed + 3),
        normal((e, d, f), seed + 4),
    ]
    check_vjp("moe_experts", ins, torch_moe)
