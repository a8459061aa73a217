"""Fixtures of the cuda launcher tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a launcher allocates with torch.empty starts as NaN (floats) or 12345 (ints), so an element it
    forgets to write fails the comparison with the reference. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("poison_empty")`."""
    empty = torch.empty

    def poisoned(*shape, **kw) -> torch.Tensor:
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(12345)

    monkeypatch.setattr(torch, "empty", poisoned)
