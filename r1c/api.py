"""The public Python API (re-exported by `r1c`): load a model, optimize it, compile it to an artifact, count it.

    import r1c
    m = r1c.load("examples/r1-tiny.r1")
    art = r1c.compile(m, target="ref", out_dir="out/r1-tiny")
    logits, = art.run([np.array([[1, 2, 3, 4]], dtype=np.int32)])
    print(r1c.stats(m, seq=4096).activated_params)

Heavy modules (frontends, passes, safetensors) are imported inside the functions so `import r1c` stays cheap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np


class InputError(ValueError):
    """A bad user input that no more specific error covers (file type, token list, --set syntax)."""


if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Module
    from r1c.model_stats import ModelStats


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> "Module":
    """A model from DSL source (.r1, with optional config overrides) or IR text (.ir), verified."""
    from r1c.ir.parser import parse_module
    from r1c.ir.verifier import verify

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    if path.suffix == ".r1":
        from r1c.frontends.dsl import load as load_dsl

        return load_dsl(path, overrides=overrides)
    if path.suffix == ".ir":
        if overrides:
            raise InputError(f"{path}: config overrides (--set) apply to .r1 models, not to IR text")
        return verify(parse_module(path.read_text(), str(path)))
    raise InputError(f"{path}: unsupported model file type '{path.suffix}'; expected a .r1 model or a .ir module")


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Weights from a .safetensors file; bf16/fp8 tensors are widened to float32 exactly."""
    from r1c.frontends.hf.safetensors_io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    return read_safetensors(path)


def optimize(module: "Module", pipeline: str, **instrumentation: Any) -> "Module":
    """Run a pass pipeline (`"canonicalize,cse"`); keyword arguments go to `r1c.passes.PassManager`."""
    from r1c.passes import PassManager

    return PassManager(pipeline, **instrumentation).run(module)


def compile(
    module: "Module",
    target: str = "ref",
    passes: str | None = None,
    weights: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> "Artifact":
    """Optimize (if `passes`), then compile for `target` into `out_dir` (a fresh temporary directory if None).

    Without `weights`, parameters are drawn from their initializers with `seed` (before the passes run,
    so the same seed gives the same model whatever the pipeline).
    """
    from r1c.backends import get_target
    from r1c.ir.interpreter import init_weights

    tgt = get_target(target)  # an unknown target fails before any work is done
    if weights is None:
        weights = init_weights(module, seed)
    if passes:
        module = optimize(module, passes)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"r1c-{module.name}-"))
    return tgt.compile(module, dict(weights), out, options or {})


def stats(module: "Module", seq: int = 4096, batch: int = 1) -> "ModelStats":
    """Parameter counts and forward FLOPs per token for a sequence of `seq` tokens (see `r1c.model_stats`)."""
    from r1c.model_stats import compute

    return compute(module, seq=seq, batch=batch)


def load_artifact(path: str | Path) -> "Artifact":
    from r1c.artifact import load as load_art

    return load_art(path)


__all__ = ["InputError", "compile", "load", "load_artifact", "load_weights", "optimize", "stats"]
