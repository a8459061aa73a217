"""The `ref` target: the artifact is the verified IR plus weights, executed by the numpy reference interpreter.

It generates no code on purpose: it is the oracle the real backends are checked against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from r1c.artifact import Artifact, write
from r1c.backends import register_target
from r1c.ir.core import Module
from r1c.ir.interpreter import run
from r1c.ir.verifier import verify


def compile_ref(module: Module, weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any]) -> Artifact:
    if options:
        raise ValueError(f"target 'ref' takes no options, got {', '.join(sorted(options))}")
    verify(module)
    return write(out_dir, module, weights, "ref")


def run_ref(artifact: Artifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return run(artifact.module, inputs, artifact.weights, function=artifact.entry)


register_target(
    "ref", compile_ref, "numpy reference interpreter (verified IR + weights; the correctness oracle)", run_ref
)
