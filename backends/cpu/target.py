"""The `cpu` and `cpu-arm` targets: verified IR -> Relax (lower.py) -> TVM's default Relax pipeline -> LLVM.

`cpu` builds a shared library for this machine's CPU (`-mcpu` from LLVM's host detection) and runs it through the
Relax VM. `cpu-arm` cross-compiles for aarch64 with NEON into object files to link on the device (no run here: this
machine has no aarch64 TVM runtime).

    OUT/cpu_lib.so | cpu_lib.tar   the compiled module (tvm.runtime.load_module) | its objects, unlinked (cpu-arm)
    OUT/cpu_lib.s                  with the `asm` option: the generated assembly
    OUT/cpu_plan.json              entry, weight order, target, the library's sha256 (the manifest hashes this file)

Options: `passes` (pipeline run before lowering; default DEFAULT_PIPELINE, "" for none), `entry` (the function;
default `forward`), `asm` (also write the assembly). Not yet: MetaSchedule tuning (`r1c tune`), schedules for the
generated loops, the fused MoE and tiled-attention ops as TensorIR kernels (docs/cpu.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from r1c.backends import TargetError, check_options, optimized_entry, register_target

if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Module

OPTIONS = ("passes", "entry", "asm")
DEFAULT_PIPELINE = "canonicalize,cse,dce"
LIB_FILE, ARM_LIB_FILE, ASM_FILE, PLAN_FILE = "cpu_lib.so", "cpu_lib.tar", "cpu_lib.s", "cpu_plan.json"
ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def host_target() -> dict[str, Any]:
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


def compile_cpu(
    module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any]
) -> "Artifact":
    return build(module, weights, out_dir, options, "cpu")


def compile_cpu_arm(
    module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any]
) -> "Artifact":
    return build(module, weights, out_dir, options, "cpu-arm")


def build(
    module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any], name: str
) -> "Artifact":
    import tvm
    from tvm import relax

    from r1c.artifact import write
    from r1c.backends.cpu.lower import lower

    check_options(name, options, OPTIONS)
    module, entry = optimized_entry(name, module, options, DEFAULT_PIPELINE)
    mod, order = lower(module, entry)
    target = host_target() if name == "cpu" else ARM_TARGET
    executable = tvm.compile(relax.transform.LegalizeOps()(mod), target=tvm.target.Target(target))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / (LIB_FILE if name == "cpu" else ARM_LIB_FILE)  # .tar: objects, no cross linker needed
    executable.export_library(str(lib))
    plan = {"entry": entry, "weights": order, "target": target, "lib": lib.name}
    plan["lib_sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    extra = {PLAN_FILE: json.dumps(plan, indent=1) + "\n"}
    if options.get("asm"):
        extra[ASM_FILE] = executable.mod.imports[0].inspect_source("s")
    return write(out_dir, module, weights, name, entry=entry, extra_files=extra)


class CpuProgram:
    """A loaded cpu artifact: the library in a Relax VM, with the weights converted once."""

    def __init__(self, artifact: "Artifact") -> None:
        import tvm
        from tvm import relax

        path = Path(artifact.path)
        self.plan = json.loads((path / PLAN_FILE).read_text())
        lib_path = path / LIB_FILE
        if hashlib.sha256(lib_path.read_bytes()).hexdigest() != self.plan["lib_sha256"]:
            raise TargetError(f"artifact {path}: {LIB_FILE} does not match the sha256 in {PLAN_FILE}; recompile")
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        self.fn = artifact.module.functions[self.plan["entry"]]
        self.weights = [tvm.runtime.tensor(np.ascontiguousarray(artifact.weights[n])) for n in self.plan["weights"]]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        from r1c.ir.interpreter import bind_dims, to_storage

        bind_dims(self.fn, inputs)  # a shape that does not fit the signature is an error here, not in TVM
        args = [tvm.runtime.tensor(np.ascontiguousarray(to_storage(np.asarray(x), a.type.dtype))) for a, x in
                zip(self.fn.args, inputs)]  # fmt: skip
        out = self.vm["main"](*args, *self.weights)
        outs = list(out) if len(self.fn.results) != 1 else [out]
        return [o.numpy() for o in outs]


_PROGRAMS: dict[str, CpuProgram] = {}


def run_cpu(artifact: "Artifact", inputs: list[np.ndarray]) -> list[np.ndarray]:
    key = str(Path(artifact.path).resolve()) + json.dumps(artifact.manifest["files"], sort_keys=True)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = CpuProgram(artifact)
    return _PROGRAMS[key].run(inputs)


register_target("cpu", compile_cpu, "TVM Relax, built by LLVM for this machine's CPU, run by the Relax VM", run_cpu)
register_target("cpu-arm", compile_cpu_arm, "TVM Relax cross-compiled for aarch64 with NEON (objects to link)")
