"""The paged latent cache ops (ir/ops/paged.py): type rules and their errors, the write's placement through the block
table, absorbed MLA against the expanded (non-absorbed) attention computed by torch SDPA, the quantized forms, and
invariance to how the tokens are laid out in pages (property test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.ir import registry
from r1c.ir.ops.paged import dequantize_tokens
from r1c.ir.registry import OpError
from r1c.ir.types import DType, TensorType, round_to

WRITE, WRITE_Q = registry.get("paged_write"), registry.get("paged_write_q")
ATTN, ATTN_Q = registry.get("paged_mla_attention"), registry.get("paged_mla_attention_kvq")
H, DN, DR, DV, C = 4, 16, 8, 16, 32
ATTRS = {"layer": 1, "scale": 0.3, "qk_nope_head_dim": DN, "v_head_dim": DV}


def t(dtype: DType, *shape) -> TensorType:
    return TensorType(dtype, shape)


def test_types():
    pool, table, start = t(DType.f32, 2, "P", "T", C + DR), t(DType.int32, "B", "M"), t(DType.int32, "B")
    assert WRITE.type_rule([pool, t(DType.f32, "B", "S", C + DR), table, start], {"layer": 1}) == [pool]
    q, w = t(DType.f32, "B", H, "S", DN + DR), t(DType.f32, H * (DN + DV), C)
    assert ATTN.type_rule([q, pool, table, start, w], ATTRS) == [t(DType.f32, "B", H, "S", DV)]
    codes, scales = t(DType.int8, 2, "P", "T", C + DR), t(DType.f32, 2, "P", "T", 5)
    assert WRITE_Q.type_rule([codes, scales, t(DType.f32, "B", "S", C + DR), table, start], {"layer": 0}) == [
        codes,
        scales,
    ]
    assert ATTN_Q.type_rule([q, codes, scales, table, start, w], ATTRS) == [t(DType.f32, "B", H, "S", DV)]


POOL = t(DType.f32, 2, 9, 4, C + DR)
NEW = t(DType.f32, 3, 1, C + DR)


@pytest.mark.parametrize(
    "ins,attrs,msg",
    [
        ((POOL, NEW, t(DType.int32, 3, 2), t(DType.int32, 3)), {"layer": 2}, "layer 2 is out of range"),
        ((POOL, t(DType.f32, 3, 1, 8), t(DType.int32, 3, 2), t(DType.int32, 3)), {"layer": 0}, "channels of new"),
        ((POOL, NEW, t(DType.f32, 3, 2), t(DType.int32, 3)), {"layer": 0}, "block_table must be int32"),
        ((POOL, NEW, t(DType.int32, 2, 2), t(DType.int32, 3)), {"layer": 0}, "batch of block_table"),
        ((POOL, NEW, t(DType.int32, 3), t(DType.int32, 3)), {"layer": 0}, r"block_table \[B, M\] must have rank 2"),
        ((POOL, t(DType.bf16, 3, 1, C + DR), t(DType.int32, 3, 2), t(DType.int32, 3)), {"layer": 0}, "pool's dtype"),
    ],
)
def test_write_rule_errors(ins, attrs, msg):
    with pytest.raises(OpError, match=msg):
        WRITE.type_rule(list(ins), attrs)


def test_attention_and_quant_rule_errors():
    q, table, start = t(DType.f32, 3, H, 1, DN + DR), t(DType.int32, 3, 2), t(DType.int32, 3)
    with pytest.raises(OpError, match="pool channels 40 != latent rank 32 \\+ rotary dim 4"):
        ATTN.type_rule([t(DType.f32, 3, H, 1, DN + 4), POOL, table, start, t(DType.f32, H * (DN + DV), C)], ATTRS)
    with pytest.raises(OpError, match="kv_b weight rows"):
        ATTN.type_rule([q, POOL, table, start, t(DType.f32, H * DN, C)], ATTRS)
    with pytest.raises(OpError, match="must hold int8 or fp8e4m3 codes"):
        WRITE_Q.type_rule([POOL, t(DType.f32, 2, 9, 4, 5), NEW, table, start], {"layer": 0})
    with pytest.raises(OpError, match="3 scale groups do not divide the pool's 40 channels"):
        WRITE_Q.type_rule([t(DType.int8, 2, 9, 4, 40), t(DType.f32, 2, 9, 4, 3), NEW, table, start], {"layer": 0})


def _layout(rng: np.random.Generator, lengths: list[int], page: int, pages: int, m: int) -> np.ndarray:
    """A block table giving each row distinct pages in random order, -1 past what the row needs."""
    table = np.full((len(lengths), m), -1, np.int32)
    free = list(rng.permutation(pages))
    for b, n in enumerate(lengths):
        for j in range(-(-n // page)):
            table[b, j] = free.pop()
    return table


def test_write_places_tokens_through_the_table():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((2, 9, 4, 6)).astype(np.float32)
    table = np.array([[7, 2, -1], [0, 5, 3]], np.int32)
    start = np.array([3, 6], np.int32)
    new = rng.standard_normal((2, 3, 6)).astype(np.float32)
    (out,) = WRITE.reference([pool, new, table, start], {"layer": 1})
    want = pool.copy()
    for b, positions in ((0, (3, 4, 5)), (1, (6, 7, 8))):
        for i, p in enumerate(positions):
            want[1, table[b, p // 4], p % 4] = new[b, i]
    np.testing.assert_array_equal(out, want)  # and nothing else changed: layer 0 and untouched slots are equal


@pytest.mark.parametrize(
    "table,start,msg",
    [
        ([[7, -1]], [3], "position 4 maps to page -1"),
        ([[7, 9]], [3], "position 4 maps to page 9, not one of 9"),
        ([[7, 2]], [7], "past its block table of 2 pages"),
        ([[7, 2]], [-1], "negative start"),
    ],
)
def test_write_errors_at_run_time(table, start, msg):
    pool = np.ones((1, 9, 4, 6), np.float32)
    new = np.full((1, 2, 6), 0.5, np.float32)
    with pytest.raises(OpError, match=msg):
        WRITE.reference([pool, new, np.array(table, np.int32), np.array(start, np.int32)], {"layer": 0})


def _expanded_mla(q: np.ndarray, kv: np.ndarray, w: np.ndarray, scale: float) -> np.ndarray:
    """MLA as HF computes it, per head K = [latent W_UK^T | k_rot], V = latent W_UV^T, through torch SDPA with a
    causal mask aligned to the end (the queries are the newest tokens)."""
    w = torch.from_numpy(w).double().reshape(H, DN + DV, C)
    kv = torch.from_numpy(kv).double()
    latent, k_rot = kv[:, :C], kv[:, C:]
    k = torch.cat([torch.einsum("nc,hdc->hnd", latent, w[:, :DN]), k_rot.expand(H, -1, -1)], dim=-1)
    v = torch.einsum("nc,hdc->hnd", latent, w[:, DN:])
    sq, n = q.shape[1], kv.shape[0]
    mask = torch.arange(n)[None, :] <= torch.arange(sq)[:, None] + (n - sq)
    o = F.scaled_dot_product_attention(torch.from_numpy(q).double(), k, v, attn_mask=mask, scale=scale)
    return o.numpy()


def test_attention_matches_expanded_mla():
    rng = np.random.default_rng(1)
    page, pages, steps = 4, 12, 3
    starts = [0, 5, 9]
    table = _layout(rng, [s + steps for s in starts], page, pages, 4)
    pool = rng.standard_normal((2, pages, page, C + DR)).astype(np.float32)
    q = rng.standard_normal((3, H, steps, DN + DR)).astype(np.float32)
    w = (rng.standard_normal((H * (DN + DV), C)) * 0.3).astype(np.float32)
    (out,) = ATTN.reference([q, pool, table, np.array(starts, np.int32), w], ATTRS)
    for b, s in enumerate(starts):
        pos = np.arange(s + steps)
        kv = pool[1, table[b, pos // page], pos % page]
        np.testing.assert_allclose(out[b], _expanded_mla(q[b], kv, w, ATTRS["scale"]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [DType.int8, DType.fp8e4m3])
def test_quantized_write_and_attention(dtype):
    rng = np.random.default_rng(2)
    groups, page, pages = 5, 4, 8
    codes = rng.integers(-9, 9, (2, pages, page, C + DR)).astype(np.int8)
    if dtype == DType.fp8e4m3:
        codes = round_to(rng.standard_normal(codes.shape).astype(np.float32), DType.fp8e4m3)
    scales = rng.random((2, pages, page, groups)).astype(np.float32)
    table = _layout(rng, [6, 2], page, pages, 3)
    new = rng.standard_normal((2, 2, C + DR)).astype(np.float32)
    new[..., C:] *= 30.0  # the rotary group's range differs from the latent's: its own scale keeps it precise
    start = np.array([4, 0], np.int32)
    out_codes, out_scales = WRITE_Q.reference([codes, scales, new, table, start], {"layer": 1})
    bound = (0.5 / 127) if dtype == DType.int8 else 2.0**-4
    for b, s in enumerate(start):
        for i in range(2):
            p = s + i
            at = (1, table[b, p // page], p % page)
            got = dequantize_tokens(out_codes[at][None], out_scales[at][None])[0]
            amax = np.abs(new[b, i].reshape(groups, -1)).max(axis=1).repeat((C + DR) // groups)
            assert np.all(np.abs(got - new[b, i]) <= bound * amax + 1e-7)
    # the quantized attention is the float one on the dequantized pool
    q = rng.standard_normal((2, H, 2, DN + DR))
    w = rng.standard_normal((H * (DN + DV), C)) * 0.2
    deq = dequantize_tokens(out_codes.reshape(-1, C + DR), out_scales.reshape(-1, groups)).reshape(codes.shape)
    (want,) = ATTN.reference([q, deq, table, start, w], ATTRS)
    (got,) = ATTN_Q.reference([q, out_codes, out_scales, table, start, w], ATTRS)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    page=st.sampled_from([1, 2, 3, 5, 8]),
    starts=st.lists(st.integers(0, 12), min_size=1, max_size=3),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_layout_does_not_change_the_result(page, starts, steps, seed):
    """The same tokens written through two random page layouts (and page sizes) give identical attention."""
    rng = np.random.default_rng(seed)
    b = len(starts)
    lengths = [s + steps for s in starts]
    history = [rng.standard_normal((n, C + DR)).astype(np.float32) for n in lengths]
    q = rng.standard_normal((b, H, steps, DN + DR))
    w = rng.standard_normal((H * (DN + DV), C)) * 0.2
    outs = []
    for size in (page, 4):
        m = max(-(-n // size) for n in lengths)
        pages = b * m + 2
        table = _layout(rng, lengths, size, pages, m)
        pool = rng.standard_normal((2, pages, size, C + DR)).astype(np.float32)
        for r in range(b):  # the prefix through the write op, one row at a time
            (pool,) = WRITE.reference([pool, history[r][None], table[r : r + 1], np.zeros(1, np.int32)], {"layer": 1})
        (o,) = ATTN.reference([q, pool, table, np.array(starts, np.int32), w], ATTRS)
        outs.append(o)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_costs_and_no_vjp():
    q, table, start = t(DType.f32, 2, H, 1, DN + DR), t(DType.int32, 2, 8), t(DType.int32, 2)
    pool, w = t(DType.f32, 2, 64, 16, C + DR), t(DType.f32, H * (DN + DV), C)
    cost = ATTN.cost([q, pool, table, start, w], [t(DType.f32, 2, H, 1, DV)], ATTRS)
    assert cost.flops >= 2 * 2 * H * 8 * 16 * (C + DR + C)  # every key of the table's pages, an upper bound
    assert cost.bytes >= 2 * 8 * 16 * (C + DR) * 4
    assert ATTN.vjp is not None
    with pytest.raises(OpError, match="not differentiable"):
        ATTN.vjp(None, type("Op", (), {"name": "paged_mla_attention"})(), [None])
