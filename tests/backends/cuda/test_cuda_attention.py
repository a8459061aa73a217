"""Block-sparse flash attention kernels (forward and backward) against the IR ops' numpy references.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py), which cannot do tl.dot on bfloat16, so
these tests use float16/float32; bfloat16 is checked on the GPU by bench/attention_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import flash_attention as fa
from r1c.backends.cuda.kernels.flash_attention import AttentionKernelError
from r1c.backends.cuda.kernels.flash_attention_bwd import attention_bwd
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry
from r1c.ir.ops.attention import attention_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float buffer the launchers allocate starts as NaN, so an element a kernel never writes fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *s, **kw: nan(empty(*s, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *s, **kw: nan(empty_like(*s, **kw)))


def rel(out: torch.Tensor, ref: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    assert not np.isnan(out).any()
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def inputs(rng, b, h, hkv, sq, skv, d, dv, dtype) -> list[torch.Tensor]:
    shapes = [(b, h, sq, d), (b, hkv, skv, d), (b, hkv, skv, dv)]
    return [torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(DEVICE, dtype) for s in shapes]


def as_np(ts: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.cpu().double().numpy() for t in ts]


# (B, H, Hkv, Sq, Skv, D, Dv, mask attributes)
CASES = [
    (1, 2, 1, 40, 40, 24, 16, dict(causal=True)),  # tiny-model head dims, GQA
    (2, 4, 2, 20, 70, 32, 32, dict(causal=True, window=9, sinks=3)),  # queries are the newest of longer keys
    (1, 2, 2, 33, 33, 16, 24, dict(causal=False)),
    (1, 1, 1, 50, 30, 64, 64, dict(causal=True)),  # Sq > Skv: the first queries see nothing (zero rows)
    (1, 2, 1, 48, 48, 192, 128, dict(causal=True, window=16)),  # MLA head dims
    (1, 2, 1, 64, 128, 32, 32, dict(causal=True, window=40, sinks=2)),  # whole tiles: unmasked loads
    (1, 2, 2, 256, 256, 32, 32, dict(causal=True)),  # 128 x 128 tiles
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_forward(case, dtype):
    b, h, hkv, sq, skv, d, dv, mask = case
    rng = np.random.default_rng(hash((case[:7], str(dtype))) % 2**32)
    q, k, v = inputs(rng, b, h, hkv, sq, skv, d, dv, dtype)
    a = registry.get("attention").complete_attrs(dict(scale=d**-0.5, **mask))
    ref = registry.get("attention").reference(as_np([q, k, v]), a)[0]
    assert rel(get_launcher("attention")(q, k, v, **a), ref) < TOL[dtype]


MAP_ATTRS = [
    dict(block_q=16, block_k=16, causal=True),
    dict(block_q=32, block_k=16, causal=True, window=20, sinks=5),
    dict(block_q=16, block_k=32, causal=False, layout_block=8, layout=(0, 0, 1, 1, 2, 0, 3, 2, 4, 4, 5, 1)),
    dict(block_q=16, block_k=16, causal=True, window=7, layout_block=24, layout=(0, 0, 1, 0, 1, 1, 2, 2)),
]


@pytest.mark.parametrize("attrs", MAP_ATTRS)
def test_block_map_matches_reference(attrs):
    q, k = torch.empty(1, 1, 45, 8, device=DEVICE), torch.empty(1, 1, 61, 8, device=DEVICE)
    a = registry.get("attention_block_map").complete_attrs(attrs)
    ref_map, ref_counts = registry.get("attention_block_map").reference([q.cpu().numpy(), k.cpu().numpy()], a)
    bmap, counts = get_launcher("attention_block_map")(q, k, **a)
    np.testing.assert_array_equal(bmap.cpu().numpy(), ref_map)
    np.testing.assert_array_equal(counts.cpu().numpy(), ref_counts)


@pytest.mark.parametrize("attrs", MAP_ATTRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tiled_and_block_sparse_attention(attrs, dtype):
    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, 2, 4, 2, 45, 61, 24, 16, dtype)
    a = registry.get("tiled_attention").complete_attrs(dict(scale=0.3, **attrs))
    map_attrs = registry.get("attention_block_map").complete_attrs({n: a[n] for n in attrs})
    bmap, counts = get_launcher("attention_block_map")(q, k, **map_attrs)
    ref = registry.get("tiled_attention").reference([*as_np([q, k, v]), bmap.cpu().numpy(), counts.cpu().numpy()], a)[0]
    assert rel(get_launcher("tiled_attention")(q, k, v, bmap, counts, **a), ref) < TOL[dtype]
    if a["layout_block"]:
        sparse_attrs = {n: a[n] for n in ("scale", "causal", "window", "sinks", "layout_block", "layout")}
        assert rel(get_launcher("block_sparse_attention")(q, k, v, **sparse_attrs), ref) < TOL[dtype]


def test_tiled_attention_batched_map_and_split_q_tile():
    """A per-batch map (Bm = B, as DSA maps are) and a BLOCK_M that splits the map's q tiles."""
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, 2, 2, 2, 40, 40, 16, 16, torch.float32)
    a = registry.get("tiled_attention").complete_attrs(dict(scale=0.25, block_q=32, block_k=16, causal=True))
    map_attrs = registry.get("attention_block_map").complete_attrs(dict(block_q=32, block_k=16))
    bmap, counts = get_launcher("attention_block_map")(q, k, **map_attrs)
    bmap2, counts2 = bmap.expand(2, -1, -1, -1).contiguous(), counts.expand(2, -1).contiguous()
    ref = registry.get("attention").reference(as_np([q, k, v]), {**a, "window": 0, "sinks": 0})[0]
    out, _, _ = fa.tiled_attention_fwd(
        q, k, v, bmap2, counts2, scale=0.25, block_q=32, block_k=16, mask=fa.mask_key(a), config=(16, 4, 1)
    )
    assert rel(out, ref) < TOL[torch.float32]


def test_forward_logsumexp():
    rng = np.random.default_rng(4)
    q, k, v = inputs(rng, 1, 2, 1, 30, 30, 16, 16, torch.float32)
    a = dict(scale=0.5, causal=True, window=6, sinks=2)
    out, lse, _ = fa.attention_fwd(q, k, v, a, return_lse=True)
    s = np.einsum("bhqd,bhkd->bhqk", *as_np([q, k.expand(-1, 2, -1, -1)])) * 0.5
    s = np.where(attention_mask(30, 30, True, 6, 2), s, -np.inf)
    ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert rel(lse, ref) < 1e-6


GRAD_CASES = [
    (1, 2, 1, 40, 40, 24, 16, dict(causal=True)),
    (2, 4, 2, 20, 70, 32, 32, dict(causal=True, window=9, sinks=3)),
    (1, 2, 2, 33, 33, 16, 24, dict(causal=False)),
    (1, 1, 1, 50, 30, 64, 64, dict(causal=True)),  # zero rows: their gradients are zero
]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_grad(case, dtype):
    b, h, hkv, sq, skv, d, dv, mask = case
    rng = np.random.default_rng(hash((case[:7], str(dtype), "g")) % 2**32)
    q, k, v = inputs(rng, b, h, hkv, sq, skv, d, dv, dtype)
    g = torch.from_numpy(rng.standard_normal((b, h, sq, dv)).astype(np.float32)).to(DEVICE, dtype)
    a = registry.get("attention_grad").complete_attrs(dict(scale=d**-0.5, **mask))
    refs = registry.get("attention_grad").reference(as_np([q, k, v, g]), a)
    outs = get_launcher("attention_grad")(q, k, v, g, **a)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, out, ref in zip(("dq", "dk", "dv"), outs, refs):
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel(out, ref) < tol, name


@pytest.mark.parametrize("mask", [dict(causal=True, window=9, sinks=3), dict(causal=False)])
def test_split_maps_forward_and_backward(mask):
    """Maps with each row's FULL tiles first (two loops, the mask code only in the second), forward and backward."""
    rng = np.random.default_rng(6)
    q, k, v = inputs(rng, 1, 4, 2, 40, 70, 32, 16, torch.float32)
    g = torch.from_numpy(rng.standard_normal((1, 4, 40, 16)).astype(np.float32)).to(DEVICE)
    a = registry.get("attention_grad").complete_attrs(dict(scale=0.2, **mask))
    ref = registry.get("attention").reference(as_np([q, k, v]), a)[0]
    out, lse, delta = fa.attention_fwd(q, k, v, a, tiles=(16, 16), split=True, return_lse=True, grad_out=g)
    assert rel(out, ref) < 1e-5
    refs = registry.get("attention_grad").reference(as_np([q, k, v, g]), a)
    grads = attention_bwd(q, k, v, g, lse, delta, a, ((16, 32, 4, 1), (32, 16, 4, 1)), split=True)
    for name, x, r in zip(("dq", "dk", "dv"), grads, refs):
        assert rel(x, r) < 1e-5, name


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tma_forward(split, dtype):
    """k/v tiles through tensor descriptors (GQA rows: each kv head's first row in the [B*Hkv*S, D] view)."""
    rng = np.random.default_rng(8)
    q, k, v = inputs(rng, 2, 4, 2, 48, 64, 32, 16, dtype)
    a = dict(scale=0.2, causal=True, window=20, sinks=3)
    ref = registry.get("attention").reference(as_np([q, k, v]), a)[0]
    out, _, _ = fa.attention_fwd(q, k, v, a, tiles=(16, 16), split=split, tma=True)
    assert rel(out, ref) < TOL[dtype]
    _, k70, v70 = inputs(rng, 2, 4, 2, 48, 70, 32, 16, dtype)
    with pytest.raises(AttentionKernelError, match="tma=True"):  # 70 keys are not whole 16-key tiles
        fa.attention_fwd(q, k70, v70, a, tiles=(16, 16), tma=True)
    with pytest.raises(AttentionKernelError, match="tma=True"):  # a strided k
        fa.attention_fwd(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, a, tiles=(16, 16), tma=True)


def test_unsupported_inputs_raise():
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng, 1, 1, 1, 16, 16, 16, 16, torch.float32)
    a = dict(scale=0.25, causal=True, window=0, sinks=0)
    with pytest.raises(AttentionKernelError, match="dtype"):
        get_launcher("attention")(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64), **a)
    big = torch.ones(1, 1, 16, 300, device=DEVICE)
    with pytest.raises(AttentionKernelError, match="head dim 300"):
        get_launcher("attention")(big, big, v, **a)
    with pytest.raises(AttentionKernelError, match="scale"):
        get_launcher("attention")(q, k, v, **{**a, "scale": -1.0})
    ta = registry.get("tiled_attention").complete_attrs(dict(scale=0.25, block_q=24, block_k=16))
    map_attrs = registry.get("attention_block_map").complete_attrs(dict(block_q=24, block_k=16))
    bmap, counts = get_launcher("attention_block_map")(q, k, **map_attrs)
    with pytest.raises(AttentionKernelError, match="block_q=24"):
        get_launcher("tiled_attention")(q, k, v, bmap, counts, **ta)
    with pytest.raises(AttentionKernelError, match="multiple"):
        get_launcher("attention")(q.expand(-1, 3, -1, -1), k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), **a)
