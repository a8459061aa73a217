"""Per-stage checkpoints: a directory with one safetensors file per stage (the rank's parameters and optimizer
state, stored exactly, via `r1c.train.checkpoint`) and `manifest.json` (stage count, which tensors each file
holds, the step, the data sampler's state, the loss history).

Loading is by tensor name, not by stage: a rank of a run with another stage count reads the tensors its own
stage owns from whichever files hold them, so a checkpoint saved with S stages resumes with S' stages. With expert
parallelism over E replicas, stage k's expert tensors are stored as E row blocks (block 0 in the stage file, block
r in `stage-<k>-experts-<r>.safetensors`); loading joins them, so the checkpoint resumes at any layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from r1c.train import checkpoint
from r1c.train.runtime import StepResult

MANIFEST = "manifest.json"
FORMAT = "r1c-pipeline-checkpoint-1"


def stage_file(k: int) -> str:
    return f"stage-{k}.safetensors"


def save_stage(directory: str | Path, k: int, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    return checkpoint.save(Path(directory) / stage_file(k), state, {"stage": k, **meta})


def expert_file(k: int, block: int) -> str:
    return f"stage-{k}-experts-{block}.safetensors"


def save_expert_block(
    directory: str | Path, k: int, block: int, tensors: dict[str, np.ndarray], meta: dict[str, Any]
) -> Path:
    """Expert parallelism: replica `block`'s row block of stage k's expert tensors (block 0 is in the stage file)."""
    return checkpoint.save(Path(directory) / expert_file(k, block), tensors, {"stage": k, "block": block, **meta})


def save_manifest(
    directory: str | Path,
    stage_names: list[list[str]],
    meta: dict[str, Any],
    blocks: list[list[str]] | None = None,
    ways: int = 1,
) -> Path:
    """Written by rank 0 after every rank saved its file (the caller synchronizes): a directory whose manifest
    exists is complete. Atomic, as the stage files. `blocks[k]`: the tensors of stage k stored as `ways` row
    blocks (expert parallelism); a file entry's "blocks" maps each to [its block, ways]."""
    path = Path(directory) / MANIFEST
    files: list[dict[str, Any]] = []
    for k, names in enumerate(stage_names):
        split = blocks[k] if blocks else []
        files.append({"file": stage_file(k), "tensors": [n for n in names if n not in split]})
        if split:
            files[-1]["blocks"] = {n: [0, ways] for n in split}
            files += [
                {"file": expert_file(k, r), "tensors": [], "blocks": {n: [r, ways] for n in split}}
                for r in range(1, ways)
            ]
    manifest = {"format": FORMAT, "stages": len(stage_names), "files": files, **meta}
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


def newest_complete(out: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint directory with the highest step under `out` (`checkpoint/`, `checkpoint-K/`) and
    its manifest, or None. Complete: the manifest exists (rank 0 writes it last, after every stage file) and every
    file it names exists; a directory left by a crash mid-save (stage files, no manifest) is skipped."""
    found: list[tuple[int, str, Path, dict[str, Any]]] = []
    for d in Path(out).glob("checkpoint*"):
        if not (d.is_dir() and re.fullmatch(r"checkpoint(-\d+)?", d.name)):
            continue
        try:
            manifest = read_manifest(d)
            files = [entry["file"] for entry in manifest["files"]]
            step = int(manifest["step"])
        except (checkpoint.CheckpointError, OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: not a checkpoint to resume from
        if all((d / f).is_file() for f in files):
            found.append((step, d.name, d, manifest))
    if not found:
        return None
    _, _, directory, manifest = max(found, key=lambda x: x[:2])  # a tie holds the same state: any is right
    return directory, manifest


def history(manifest: dict[str, Any]) -> list[StepResult]:
    """The loss history up to the checkpoint's step (a resumed run's losses.json holds the whole run)."""
    return [StepResult(int(s), loss, lr, norm, int(n)) for s, loss, lr, norm, n in manifest["history"]]


def load_tensors(directory: str | Path, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors `names` from the stage files that hold them (whole: row blocks joined), and the manifest."""
    manifest = read_manifest(directory)
    where = {n: entry["file"] for entry in manifest["files"] for n in entry["tensors"]}
    split: dict[str, list[str | None]] = {}  # a tensor stored as row blocks: each block's file, in block order
    for entry in manifest["files"]:
        for n, (block, ways) in entry.get("blocks", {}).items():
            split.setdefault(n, [None] * ways)[block] = entry["file"]
    missing = [n for n in names if n not in where and None in split.get(n, [None])]
    if missing:
        raise checkpoint.CheckpointError(
            f"{directory}: the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing): it holds another "
            "training state (different model or optimizer)"
        )
    out: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, int], np.ndarray] = {}
    joined = [n for n in names if n not in where]
    for file in sorted({where[n] for n in names if n in where} | {f for n in joined for f in split[n]}):
        state, _ = checkpoint.load(Path(directory) / file)
        out.update({n: state[n] for n in names if where.get(n) == file})
        parts.update({(n, b): state[n] for n in joined for b, f in enumerate(split[n]) if f == file})
    out.update({n: np.concatenate([parts[n, b] for b in range(len(split[n]))]) for n in joined})
    return out, manifest
