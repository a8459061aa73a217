"""Training checkpoints: one safetensors file with every state tensor (parameters, optimizer state, balancing
biases) stored exactly, and the step, data-sampler state and training config as JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

FORMAT = "r1c-train-checkpoint-1"


class CheckpointError(ValueError):
    pass


def save(path: str | Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a run killed while saving leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an r1c training checkpoint (format {header.get('format')!r})")
    return state, json.loads(header["meta"])
