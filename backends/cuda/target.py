"""The `cuda` target: verified IR -> kernel plan + generated Triton sources + weights, and a runner for it.

    OUT/plan.json         the ordered launches over named buffers (see lower.py)
    OUT/kernels/*.py      every generated kernel's source (imported through the kernel cache at run time)

Options: `passes` (pipeline run before lowering; default DEFAULT_PIPELINE, "" for none), `dtype` (f32|f16|bf16: cast
float parameters and activations; default the IR's dtypes), `dump_kernels` (a directory to write the sources to),
`entry` (the function to compile: default `forward`; `decode` for the KV-cache step, whose cache arguments the
runtime updates in place and returns).
This module imports neither torch nor triton at import time: `import r1c` and the ref target stay cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from r1c.backends import TargetError, check_options, optimized_entry, register_target

if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Module

OPTIONS = ("passes", "dtype", "dump_kernels", "entry")
DTYPES = ("f32", "f16", "bf16")


def compile_cuda(
    module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any]
) -> "Artifact":
    from r1c.artifact import write
    from r1c.backends.cuda import kernel_cache
    from r1c.backends.cuda.lower import DEFAULT_PIPELINE, lower
    from r1c.backends.cuda.runtime import KERNEL_DIR, PLAN_FILE

    check_options("cuda", options, OPTIONS)
    dtype = options.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise TargetError(f"target 'cuda': dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    module, entry = optimized_entry("cuda", module, options, DEFAULT_PIPELINE)
    plan = lower(module, entry)
    plan["dtype"] = dtype
    sources = plan.pop("kernels")
    for src in sources.values():  # a source that does not import is a compile error, not a run-time surprise
        kernel_cache.load(src)
    plan["kernels"] = sorted(sources)
    out_dir = Path(out_dir)
    if (out_dir / KERNEL_DIR).is_dir():
        shutil.rmtree(out_dir / KERNEL_DIR)  # kernels of an earlier compile must not linger
    extra = {f"{KERNEL_DIR}/{name}": src for name, src in sources.items()}
    extra[PLAN_FILE] = json.dumps(plan, indent=1) + "\n"
    art = write(out_dir, module, weights, "cuda", entry=entry, extra_files=extra)
    if options.get("dump_kernels"):
        dump = Path(options["dump_kernels"])
        dump.mkdir(parents=True, exist_ok=True)
        for name, src in sources.items():
            (dump / name).write_text(src)
    return art


def compile_program(
    module: "Module", weights: dict[str, np.ndarray], options: Mapping[str, Any], device_weights: Any = None
) -> Any:
    """Compile into a temporary directory and load the program (`device_weights`: see `Program`); the directory is
    gone once the program holds its plan and kernels. For plans built at run time (training steps, pipeline stages)
    whose artifact nobody keeps."""
    import tempfile

    from r1c.backends.cuda.runtime import Program

    with tempfile.TemporaryDirectory(prefix=f"r1c-{module.name}-") as out:
        return Program(compile_cuda(module, weights, Path(out), options), weights=device_weights)


def run_cuda(artifact: "Artifact", inputs: list[np.ndarray]) -> list[np.ndarray]:
    from r1c.backends.cuda.runtime import program

    return program(artifact).run(inputs)


register_target(
    "cuda", compile_cuda, "Triton kernels (generated and templated) launched on torch CUDA tensors", run_cuda
)
