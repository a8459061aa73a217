"""cross_entropy / cross_entropy_grad kernels against the IR ops' numpy references (Triton's interpreter on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import cross_entropy as xent
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}  # f16: the gradient is rounded to f16 on store


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list, **attrs) -> list[np.ndarray]:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs(attrs))


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert out.shape == want.shape and not np.isnan(out).any()
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


def inputs(n: int, v: int, dtype: torch.dtype, ignored: float, ignore_index: int = -100, seed: int = 0):
    rng = np.random.default_rng(seed + n + v)
    logits = torch.from_numpy(3 * rng.standard_normal((n, v)).astype(np.float32)).to(DEVICE, dtype)
    labels = rng.integers(0, v, n)
    labels[rng.random(n) < ignored] = ignore_index
    g = torch.tensor(rng.uniform(0.5, 2.0), dtype=torch.float32, device=DEVICE)
    return logits, torch.from_numpy(labels.astype(np.int64)).to(DEVICE), g


# (N, V, block_v): block_v below V makes the online max/sum-exp span chunks, V not a multiple of it: a masked tail
CASES = [(1, 7, 4096), (5, 1000, 128), (16, 300, 64), (33, 517, 4096), (8, 5000, 4096), (3, 129, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,v,block_v", CASES)
def test_matches_reference(monkeypatch: pytest.MonkeyPatch, n: int, v: int, block_v: int, dtype: torch.dtype) -> None:
    monkeypatch.setattr(xent, "_BLOCK_V", block_v)
    logits, labels, g = inputs(n, v, dtype, ignored=0.3)
    loss = get_launcher("cross_entropy")(logits, labels, ignore_index=-100)
    assert loss.shape == () and loss.dtype == torch.float32
    assert rel(loss, ref("cross_entropy", [logits, labels])[0]) < 1e-5
    dx = get_launcher("cross_entropy_grad")(logits, labels, g, ignore_index=-100)
    assert dx.dtype == dtype
    assert rel(dx, ref("cross_entropy_grad", [logits, labels, g])[0]) < TOL[dtype]


def test_ignored_rows_and_custom_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xent, "_BLOCK_V", 64)
    logits, labels, g = inputs(20, 200, torch.float32, ignored=0.5, ignore_index=7)
    loss = get_launcher("cross_entropy")(logits, labels, ignore_index=7)
    assert rel(loss, ref("cross_entropy", [logits, labels], ignore_index=7)[0]) < 1e-5
    dx = get_launcher("cross_entropy_grad")(logits, labels, g, ignore_index=7)
    assert rel(dx, ref("cross_entropy_grad", [logits, labels, g], ignore_index=7)[0]) < 1e-5
    ignored = (labels == 7).cpu()
    assert ignored.any() and (dx.cpu()[ignored] == 0).all()


def test_all_rows_ignored() -> None:
    logits, labels, g = inputs(6, 50, torch.float32, ignored=1.0)
    loss = get_launcher("cross_entropy")(logits, labels)
    assert loss.item() == 0.0
    dx = get_launcher("cross_entropy_grad")(logits, labels, g)
    assert (dx.cpu() == 0).all()


def test_no_rows() -> None:
    logits = torch.zeros(0, 10, device=DEVICE)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert get_launcher("cross_entropy")(logits, labels).item() == 0.0
    g = torch.tensor(1.0, device=DEVICE)
    assert get_launcher("cross_entropy_grad")(logits, labels, g).shape == (0, 10)


def test_int32_labels_and_bad_label_is_nan() -> None:
    logits, labels, g = inputs(9, 40, torch.float32, ignored=0.2)
    labels = labels.to(torch.int32)
    assert rel(get_launcher("cross_entropy")(logits, labels), ref("cross_entropy", [logits, labels])[0]) < 1e-5
    labels[2] = 40  # out of range, not ignored: NaN, never an out-of-bounds read
    labels[3] = -1
    assert torch.isnan(get_launcher("cross_entropy")(logits, labels)).item()
    dx = get_launcher("cross_entropy_grad")(logits, labels, g).cpu()
    assert torch.isnan(dx[2]).all() and torch.isnan(dx[3]).all()
    ok = [r for r in range(9) if r not in (2, 3)]
    assert not torch.isnan(dx[ok]).any()
