"""Data loading (byte-level text, .npy tokens), the batch sampler's saved state, and checkpoint files."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.train import checkpoint
from r1c.train.data import Batches, DataError, load_tokens


def test_text_is_bytes(tmp_path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes("héllo".encode())
    np.testing.assert_array_equal(load_tokens(p, 256), [104, 195, 169, 108, 108, 111])
    with pytest.raises(DataError, match="vocab_size >= 256"):
        load_tokens(p, 100)


def test_npy_tokens(tmp_path) -> None:
    p = tmp_path / "t.npy"
    np.save(p, np.array([[3, 1], [4, 1]], dtype=np.int64))
    got = load_tokens(p, 10)
    assert got.dtype == np.int32 and got.tolist() == [3, 1, 4, 1]
    with pytest.raises(DataError, match="outside the vocabulary"):
        load_tokens(p, 4)
    np.save(p, np.array([0.5]))
    with pytest.raises(DataError, match="must hold integers"):
        load_tokens(p, 4)


def test_sampler_windows_and_state(corpus_tokens) -> None:
    b = Batches(corpus_tokens, batch=3, seq=16, seed=7)
    x, y = b.next()
    assert x.shape == y.shape == (3, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
    saved = b.state()
    later = [b.next() for _ in range(3)]
    b.restore(saved)
    for want in later:
        got = b.next()
        np.testing.assert_array_equal(got[0], want[0])
    assert b.drawn == 4
    with pytest.raises(DataError, match="needs at least 17"):
        Batches(corpus_tokens[:10], 1, 16, 0)


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((3, 4)).astype(np.float32), "adamw.exp_avg.w": rng.random(5).astype(np.float32)}
    meta = {"step": 3, "data": {"drawn": 3, "rng": np.random.default_rng(1).bit_generator.state}}
    path = checkpoint.save(tmp_path / "c.safetensors", state, meta)
    got, got_meta = checkpoint.load(path)
    assert got_meta == meta
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.safetensors")
