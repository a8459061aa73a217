"""`r1c train --resume auto`: continue from the newest checkpoint under `--out`, or start at step 0 when there is
none. It makes one command line serve the first start and every restart after a failure (`torchrun
--max-restarts N` reruns the same command), losing only the steps since the last save.

This module finds the newest single-process checkpoint (`checkpoint.safetensors`, `checkpoint-K.safetensors`) and
words the resume line; `r1c.distributed.checkpoint.newest_complete` finds the newest pipeline checkpoint directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from r1c.train import checkpoint

AUTO = "auto"  # a checkpoint that is really named "auto" is still reachable as ./auto


def newest_file(out: str | Path) -> tuple[Path, int] | None:
    """The single-process checkpoint with the highest step under `out`, and its step. Each file is written
    atomically (temp file + rename), so any file that opens is complete; one that does not is skipped."""
    found: list[tuple[int, str, Path]] = []
    for path in Path(out).glob("checkpoint*.safetensors"):
        if not re.fullmatch(r"checkpoint(-\d+)?\.safetensors", path.name):
            continue
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
            if header.get("format") != checkpoint.FORMAT:
                continue
            step = int(json.loads(header["meta"])["step"])
        except (SafetensorError, OSError, ValueError, KeyError):
            continue
        found.append((step, path.name, path))
    if not found:
        return None
    step, _, path = max(found)  # a tie (checkpoint-K and the final checkpoint at step K) holds the same state
    return path, step


def restart_count() -> int:
    """How many times torchrun restarted this job (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def describe(found: str | Path | None, step: int, out: str | Path) -> str:
    after = f" after restart {n}" if (n := restart_count()) else ""
    if found is None:
        return f"no complete checkpoint under {out}: starting at step 0{after}"
    return f"resumed from {found} at step {step}{after}"
