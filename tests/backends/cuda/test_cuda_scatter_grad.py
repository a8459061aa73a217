"""scatter_add and index_add kernels (the transposes of gather and take/embedding) against the IR references.

Repeated indices on purpose (every case has more updates than targets or draws with replacement), several ranks
and axes; the results must also be bitwise the same on a second run (no atomics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import scatter  # registers the launchers
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list, **attrs) -> np.ndarray:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs(attrs))[0]


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    got = out.detach().cpu().double().numpy()
    assert got.shape == want.shape and not np.isnan(got).any()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE, dtype)


def ints(rng: np.random.Generator, hi: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, hi, shape)).to(DEVICE, dtype)


# (base shape, axis, size of the indices along axis)
SCATTER_CASES = [
    ((37,), 0, 50),
    ((6, 9), 1, 4),  # topk's transpose: a few picks per row
    ((6, 9), -1, 20),
    ((13, 5), 0, 40),
    ((3, 7, 5), 1, 11),
    ((2, 3, 4, 6), 2, 9),
    ((2, 3, 4, 6), 0, 5),
    ((4, 300), 1, 700),  # several n blocks and k chunks
]


@pytest.mark.parametrize("shape,axis,k", SCATTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_add_matches_reference(shape: tuple[int, ...], axis: int, k: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(sum(shape) + k)
    ishape = list(shape)
    ishape[axis] = k
    base, upd = randn(rng, shape, dtype), randn(rng, tuple(ishape), dtype)
    idx = ints(rng, shape[axis], tuple(ishape), torch.int32)
    fn = get_launcher("scatter_add")
    out = fn(base, idx, upd, axis=axis)
    assert out.dtype == dtype and out.shape == base.shape
    assert rel(out, ref("scatter_add", [base, idx, upd], axis=axis)) < TOL[dtype]
    assert torch.equal(out, fn(base, idx, upd, axis=axis))


# (base shape, axis, indices shape)
INDEX_CASES = [
    ((11, 6), 0, (3, 4)),  # embedding's transpose: table [V, D], ids [B, S]
    ((50, 33), 0, (2, 160)),  # more ids than rows: every row repeated; several rank blocks
    ((257, 72), 0, (5, 7)),  # odd vocabulary, mostly untouched rows
    ((5, 7), 1, (9,)),
    ((5, 7), -1, ()),  # a 0-d index
    ((3, 6, 5), 1, (2, 2, 2)),
    ((2, 3, 4, 5), 2, (3, 6)),
    ((1, 4), 0, (25,)),  # one row hit 25 times: several entry chunks
    ((8, 3), 0, (0,)),  # no entries: the base unchanged
]


@pytest.mark.parametrize("shape,axis,ishape", INDEX_CASES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_index_add_matches_reference(
    shape: tuple[int, ...], axis: int, ishape: tuple[int, ...], idx_dtype: torch.dtype
) -> None:
    rng = np.random.default_rng(sum(shape) + len(ishape))
    ax = axis % len(shape)
    base = randn(rng, shape, torch.float32)
    upd = randn(rng, shape[:ax] + ishape + shape[ax + 1 :], torch.float32)
    idx = ints(rng, shape[ax], ishape, idx_dtype)
    fn = get_launcher("index_add")
    out = fn(base, idx, upd, axis=axis)
    assert out.dtype == base.dtype and out.shape == base.shape
    assert rel(out, ref("index_add", [base, idx, upd], axis=axis)) < TOL[torch.float32]
    assert torch.equal(out, fn(base, idx, upd, axis=axis))


@pytest.mark.parametrize("chunk,block,j", [(100, 32, 777), (2048, 128, 4500)])
def test_index_add_chunked_ranking(monkeypatch: pytest.MonkeyPatch, chunk: int, block: int, j: int) -> None:
    """Several rank programs (chunks of the indices), partial last chunk and block: still exact and in order."""
    monkeypatch.setattr(scatter, "RANK_CHUNK", chunk)
    monkeypatch.setattr(scatter, "RANK_BLOCK", block)
    rng = np.random.default_rng(j)
    base, upd = randn(rng, (37, 5), torch.float32), randn(rng, (j, 5), torch.float32)
    idx = ints(rng, 37, (j,), torch.int64)
    out = get_launcher("index_add")(base, idx, upd, axis=0)
    assert rel(out, ref("index_add", [base, idx, upd], axis=0)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_index_add_low_precision(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(7)
    base, upd = randn(rng, (40, 24), dtype), randn(rng, (3, 30, 24), dtype)
    idx = ints(rng, 40, (3, 30), torch.int32)
    out = get_launcher("index_add")(base, idx, upd, axis=0)
    assert out.dtype == dtype
    assert rel(out, ref("index_add", [base, idx, upd], axis=0)) < TOL[dtype]


def test_out_of_range_indices_are_skipped() -> None:
    """Kernels cannot raise: an out-of-range index contributes nothing (and writes nothing out of bounds)."""
    rng = np.random.default_rng(3)
    base, upd = randn(rng, (6, 4), torch.float32), randn(rng, (5, 4), torch.float32)
    idx = torch.tensor([1, 6, -1, 1, 100], device=DEVICE)
    want = base.clone()
    want[1] += upd[0] + upd[3]
    out = get_launcher("index_add")(base, idx, upd, axis=0)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)
    idx2 = torch.tensor([[0, 9], [3, -2]], device=DEVICE, dtype=torch.int32)
    base2, upd2 = randn(rng, (2, 4), torch.float32), randn(rng, (2, 2), torch.float32)
    want2 = base2.clone()
    want2[0, 0] += upd2[0, 0]
    want2[1, 3] += upd2[1, 0]
    assert torch.allclose(get_launcher("scatter_add")(base2, idx2, upd2, axis=1), want2, rtol=1e-6, atol=1e-6)
