"""embedding, rmsnorm, rope (plain and YaRN, half and interleaved) and cross_entropy against torch and
transformers' own DeepSeek-V3 code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import _compute_yarn_parameters
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

from r1c.ir import registry
from r1c.ir.ops.nn import rope_inv_freq
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def f32(*shape):
    return TensorType(DType.f32, shape)


def i32(*shape):
    return TensorType(DType.int32, shape)


# --- embedding -------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    vd=st.tuples(st.integers(1, 20), st.integers(1, 8)),
    ids_shape=st.lists(st.integers(1, 4), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_embedding_matches_torch(run_op, vd, ids_shape, seed):
    v, d = vd
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((v, d)).astype(np.float32)
    ids = np.asarray(rng.integers(0, v, ids_shape), dtype=np.int32)
    (got,) = run_op("embedding", [table, ids])
    np.testing.assert_array_equal(got, F.embedding(_t(ids).long(), _t(table)).numpy())


def test_embedding_out_of_range(run_op):
    table = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    with pytest.raises(Exception, match="embedding: token id out of range"):
        run_op("embedding", [table, np.array([1, 4], np.int32)])


# --- rmsnorm ---------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), max_size=3),
    d=st.integers(1, 16),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rmsnorm_matches_torch(run_op, assert_close, lead, d, eps, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(tuple(lead) + (d,)) * 3).astype(np.float32)
    w = rng.standard_normal((d,)).astype(np.float32)
    (got,) = run_op("rmsnorm", [x, w], eps=eps)
    assert_close(got, F.rms_norm(_t(x).double(), (d,), _t(w).double(), eps=eps))


# --- rope ------------------------------------------------------------------------------------------------


def _hf_config(dim: int, attrs: dict) -> DeepseekV3Config:
    """A tiny DeepSeek-V3 config whose rotary settings mirror the rope op's attributes."""
    params: dict = {"rope_type": "default", "rope_theta": attrs["theta"]}
    if attrs["scaling"] == "yarn":
        params.update(
            rope_type="yarn",
            factor=attrs["factor"],
            original_max_position_embeddings=attrs["original_max_position"],
            beta_fast=attrs["beta_fast"],
            beta_slow=attrs["beta_slow"],
            mscale=attrs["mscale"],
            mscale_all_dim=attrs["mscale_all_dim"],
        )
    return DeepseekV3Config(
        hidden_size=4 * dim,
        num_attention_heads=4,
        qk_rope_head_dim=dim,
        max_position_embeddings=int(attrs["original_max_position"] * attrs["factor"]),
        rope_parameters=params,
    )


yarn_attrs = st.fixed_dictionaries(
    {
        "theta": st.sampled_from([10000.0, 50000.0, 1e6]),
        "scaling": st.just("yarn"),
        "factor": st.sampled_from([1.0, 2.0, 4.0, 40.0]),
        "original_max_position": st.sampled_from([64, 512, 4096]),
        "beta_fast": st.sampled_from([32.0, 16.0, 8.0]),
        "beta_slow": st.sampled_from([1.0, 2.0]),
        "mscale": st.sampled_from([1.0, 0.707, 0.0]),
        "mscale_all_dim": st.sampled_from([0.0, 1.0, 0.707]),
    }
)
plain_attrs = st.fixed_dictionaries({"theta": st.sampled_from([10000.0, 500.0]), "scaling": st.just("none")})
ALL_DEFAULTS = registry.get("rope").complete_attrs({})


@settings(max_examples=30, deadline=None)
@given(dim=st.sampled_from([4, 8, 16, 32, 64, 128]), attrs=yarn_attrs)
def test_yarn_inv_freq_matches_transformers(dim, attrs):
    full = {**ALL_DEFAULTS, **attrs}
    inv, scale = rope_inv_freq(dim, full)
    hf_inv, hf_scale = _compute_yarn_parameters(_hf_config(dim, full))
    np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6)
    assert scale == pytest.approx(hf_scale, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.sampled_from([2, 8, 16, 64])),
    attrs=st.one_of(plain_attrs, yarn_attrs),
    interleaved=st.booleans(),
    big=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rope_matches_transformers(run_op, assert_close, shape, attrs, interleaved, big, seed):
    b, s, h, d = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    pos = rng.integers(0, 100_000 if big else 32, (b, s)).astype(np.int32)
    full = {**ALL_DEFAULTS, **attrs, "interleaved": interleaved}
    (got,) = run_op("rope", [x, pos], **full)

    rotary = DeepseekV3RotaryEmbedding(_hf_config(d, full))
    xt = _t(x)
    cos, sin = rotary(xt, _t(pos).long())  # [B, S, D], float32 as in HF
    apply = apply_rotary_pos_emb_interleave if interleaved else apply_rotary_pos_emb
    want, _ = apply(xt.double(), xt.double(), cos.double(), sin.double(), unsqueeze_dim=2)  # x is [B, S, H, D]
    # Angles are float32 in both, but HF's float32 inverse frequencies can be 1 ulp off the correctly rounded
    # ones r1c uses, which moves an angle by up to position * 2^-23 rad: the tolerance grows with position.
    assert_close(got, want, rtol=1e-5, atol=1e-5 + float(pos.max()) * 2.0**-21)


def test_rope_position_zero_is_identity_and_norm_preserved(run_op):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 5, 900]], np.int32)
    for interleaved in (False, True):
        (got,) = run_op("rope", [x, pos], interleaved=interleaved)
        if interleaved:  # position 0 only de-interleaves: [evens | odds]
            np.testing.assert_allclose(got[0, 0], np.concatenate([x[0, 0, :, 0::2], x[0, 0, :, 1::2]], -1), rtol=1e-6)
        else:
            np.testing.assert_allclose(got[0, 0], x[0, 0], rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


# --- cross_entropy ---------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    nv=st.tuples(st.integers(1, 8), st.integers(1, 10)),
    ignore=st.sampled_from([-100, -1, 0]),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_cross_entropy_matches_torch(run_op, assert_close, nv, ignore, data, seed):
    n, v = nv
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, v)) * 5).astype(np.float32)
    labels = rng.integers(0, v, (n,)).astype(np.int32)
    drop = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    labels[drop] = ignore
    if not (labels != ignore).any():
        labels[0] = 1 if ignore == 0 and v > 1 else (0 if ignore != 0 else labels[0])
    (got,) = run_op("cross_entropy", [logits, labels], ignore_index=ignore)
    assert got.shape == () and got.dtype == np.float32
    if (labels != ignore).any():
        assert_close(got, F.cross_entropy(_t(logits).double(), _t(labels).long(), ignore_index=ignore))
    else:  # every row ignored (only possible with V = 1 and ignore 0): r1c defines the loss as 0, torch as NaN
        assert got == 0.0


def test_cross_entropy_all_ignored_is_zero(run_op):
    logits = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (got,) = run_op("cross_entropy", [logits, np.full(3, -100, np.int32)])
    assert got == 0.0


@pytest.mark.parametrize("bad", [4, -1])
def test_cross_entropy_label_out_of_range(run_op, bad):
    """A label outside [0, V) that is not ignore_index is an error, as in torch, not a silent wrap-around."""
    logits = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    labels = np.array([0, bad, 2], np.int32)
    with pytest.raises(Exception, match="cross_entropy"):
        run_op("cross_entropy", [logits, labels])


# --- type rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,types,attrs,msg",
    [
        ("embedding", [f32(4), i32(3)], {}, "rank 2"),
        ("embedding", [f32(4, 2), f32(3)], {}, "token ids"),
        ("rmsnorm", [f32(2, 4), f32(3)], {"eps": 1e-6}, "normalized size"),
        ("rmsnorm", [f32(2, 4), f32(1, 4)], {"eps": 1e-6}, "rank 1"),
        ("rmsnorm", [i32(2, 4), f32(4)], {"eps": 1e-6}, "float"),
        ("rope", [f32(1, 2, 3, 4), i32(1, 3)], ALL_DEFAULTS, "sequence"),
        ("rope", [f32(1, 2, 3, 4), i32(2, 2)], ALL_DEFAULTS, "batch"),
        ("rope", [f32(1, 2, 3, 5), i32(1, 2)], ALL_DEFAULTS, "even"),
        ("rope", [f32(2, 3, 4), i32(2, 3)], ALL_DEFAULTS, "rank 4"),
        ("rope", [f32(1, 2, 3, 4), f32(1, 2)], ALL_DEFAULTS, "positions"),
        ("cross_entropy", [f32(3, 5), i32(4)], {"ignore_index": -100}, "rows"),
        ("cross_entropy", [f32(3, 5), f32(3)], {"ignore_index": -100}, "labels"),
        ("cross_entropy", [f32(15), i32(3)], {"ignore_index": -100}, "rank 2"),
    ],
)
def test_invalid(name, types, attrs, msg):
    with pytest.raises(OpError, match=msg) as e:
        registry.get(name).infer(types, attrs)
    assert name in str(e.value)


def test_rope_bad_scaling_attr():
    with pytest.raises(OpError, match="'scaling' of rope must be one of"):
        registry.get("rope").complete_attrs({"scaling": "ntk"})
