"""Shared fixtures: r1-tiny, the bundled corpus as byte tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import r1c
from r1c.train.data import load_tokens

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/r1-tiny.r1"
CORPUS = ROOT / "examples/data/tiny-corpus.txt"


@pytest.fixture(scope="session")
def tiny() -> r1c.ir.Module:
    return r1c.load(TINY)


@pytest.fixture(scope="session")
def corpus_tokens() -> np.ndarray:
    return load_tokens(CORPUS, 512)
