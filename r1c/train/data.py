"""Training data: token streams from text (byte-level: ids are the bytes, so the vocabulary needs >= 256 entries) or
`.npy` token arrays, and a seeded batch sampler whose whole state can be saved and restored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    pass


def load_tokens(path: str | Path, vocab_size: int) -> np.ndarray:
    """A 1-D int32 token stream: the bytes of a text file, or the ids of a `.npy` array (flattened)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a numeric .npy array ({e})") from None
        if arr.dtype.kind not in "iu":
            raise DataError(f"{path}: token arrays must hold integers, got {arr.dtype}")
        tokens = arr.reshape(-1).astype(np.int64)
    else:
        if vocab_size < 256:
            raise DataError(f"byte-level text needs vocab_size >= 256, the model has {vocab_size}")
        tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(
            f"{path}: token ids span [{tokens.min()}, {tokens.max()}], outside the vocabulary [0, {vocab_size})"
        )
    return tokens.astype(np.int32)


class Batches:
    """Random windows of `seq + 1` tokens: inputs are the first `seq`, labels the next-token shift.

    The sampler's state (numpy PCG64 state and how many batches were drawn) goes into checkpoints, so a resumed run
    draws exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, tokens: np.ndarray, batch: int, seq: int, seed: int) -> None:
        if tokens.size < seq + 1:
            raise DataError(f"the data has {tokens.size} tokens; a window of seq={seq} needs at least {seq + 1}")
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.rng = np.random.default_rng(seed)
        self.drawn = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, self.tokens.size - self.seq, self.batch)
        windows = np.stack([self.tokens[s : s + self.seq + 1] for s in starts])
        self.drawn += 1
        return windows[:, :-1].copy(), windows[:, 1:].copy()

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "rng": self.rng.bit_generator.state}

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])
