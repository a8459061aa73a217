"""Per-stage checkpoints: a directory with one safetensors file per stage (the rank's parameters and optimizer
state, stored exactly, via `r1c.train.checkpoint`) and `manifest.json` (stage count, which tensors each file
holds, the step, the data sampler's state, the loss history).

Loading is by tensor name, not by stage: a rank of a run with another stage count reads the tensors its own
stage owns from whichever files hold them, so a checkpoint saved with S stages resumes with S' stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from r1c.train import checkpoint

MANIFEST = "manifest.json"
FORMAT = "r1c-pipeline-checkpoint-1"


def stage_file(k: int) -> str:
    return f"stage-{k}.safetensors"


def save_stage(directory: str | Path, k: int, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    return checkpoint.save(Path(directory) / stage_file(k), state, {"stage": k, **meta})


def save_manifest(directory: str | Path, stage_names: list[list[str]], meta: dict[str, Any]) -> Path:
    """Written by rank 0 after every rank saved its file (the caller synchronizes): a directory whose manifest
    exists is complete. Atomic, as the stage files."""
    path = Path(directory) / MANIFEST
    manifest = {
        "format": FORMAT,
        "stages": len(stage_names),
        "files": [{"file": stage_file(k), "tensors": names} for k, names in enumerate(stage_names)],
        **meta,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise checkpoint.CheckpointError(
            f"{directory}: no {MANIFEST}: not a pipeline checkpoint directory (or one whose save did not finish)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{path}: not an r1c pipeline checkpoint (format {manifest.get('format')!r})")
    return manifest


def load_tensors(directory: str | Path, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors `names` from the stage files that hold them, and the manifest."""
    manifest = read_manifest(directory)
    where = {n: entry["file"] for entry in manifest["files"] for n in entry["tensors"]}
    missing = [n for n in names if n not in where]
    if missing:
        raise checkpoint.CheckpointError(
            f"{directory}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing): it holds another "
            "training state (different model or optimizer)"
        )
    out: dict[str, np.ndarray] = {}
    for file in sorted({where[n] for n in names}):
        state, _ = checkpoint.load(Path(directory) / file)
        out.update({n: state[n] for n in names if where[n] == file})
    return out, manifest
