"""The `cpu` and `cpu-arm` targets: verified IR -> Relax (lower.py) -> fusion, schedules -> LLVM (docs/cpu.md).

`cpu` builds a shared library for this machine's CPU (`-mcpu` from LLVM's host detection) and runs it through the
Relax VM. `cpu-arm` cross-compiles for aarch64 with NEON into object files to link on the device (no run here: this
machine has no aarch64 TVM runtime).

    OUT/cpu_lib.so | cpu_lib.tar   the compiled module (tvm.runtime.load_module) | its objects, unlinked (cpu-arm)
    OUT/cpu_lib.s                  with the `asm` option: the generated assembly
    OUT/cpu_plan.json              entry, weight order, packed weights and panel widths, target, shapes, the
                                   kernels taken from the tuning database, the library's sha256 (hashed by the
                                   manifest)

The TVM side: LegalizeOps and TVM's operator fusion, then the tuning database's schedules (tune.py) where it
has records for a function, then the default schedules (schedule.py) for the rest. Weights that only GEMMs read are
packed in panels once, when the artifact is loaded (kernels.pack_panels); the plan names them.

Options: `passes` (pipeline run before lowering; default DEFAULT_PIPELINE, "" for none), `entry` (the function;
default `forward`), `asm` (also write the assembly), `shapes` ({symbol: value}: a static-shape build, what
tuning needs), `tuning` (the tuning database directory; default tune.default_dir(); "" for none).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from r1c.backends import TargetError, check_options, optimized_entry, register_target

if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Module
    from r1c.ir.types import DType

OPTIONS = ("passes", "entry", "asm", "shapes", "tuning")
DEFAULT_PIPELINE = "canonicalize,cse,dce"
LIB_FILE, ARM_LIB_FILE, ASM_FILE, PLAN_FILE = "cpu_lib.so", "cpu_lib.tar", "cpu_lib.s", "cpu_plan.json"
ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def host_target() -> dict[str, Any]:
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


def target_for(name: str) -> dict[str, Any]:
    return host_target() if name == "cpu" else ARM_TARGET


def build_relax(module: "Module", options: Mapping[str, Any], name: str) -> tuple[Any, dict[str, Any], "Module"]:
    """IR -> fused, unscheduled Relax/TIR module (what tuning and compile share), its plan, the optimized IR."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from r1c.backends.cpu.lower import lower

    check_options(name, options, OPTIONS)
    module, entry = optimized_entry(name, module, options, DEFAULT_PIPELINE)
    shapes = dict(options.get("shapes") or {})
    mod, order, packed = lower(module, entry, shapes)
    target = target_for(name)
    with tvm.target.Target(target) as t:  # TVM's dispatch, legalization and operator fusion
        mod = tvm.transform.Sequential(cpu_pipeline.library_dispatch_passes(t) + cpu_pipeline.legalize_passes(t))(mod)
    plan = {"entry": entry, "weights": order, "packed": packed, "target": target, "shapes": shapes}
    return mod, plan, module


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
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from r1c.artifact import write
    from r1c.backends.cpu import tune
    from r1c.backends.cpu.schedule import apply_default_schedules

    mod, plan, module = build_relax(module, options, name)
    target = tvm.target.Target(plan["target"])
    tuning = options.get("tuning", tune.default_dir(plan["target"]))
    mod, plan["tuned"] = tune.apply_database(mod, target, tuning) if tuning else (mod, [])
    mod = apply_default_schedules(mod, target)
    lowering = tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(target) + finalize_passes(target))
    executable = tvm.compile(mod, target=target, relax_pipeline=lowering)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / (LIB_FILE if name == "cpu" else ARM_LIB_FILE)  # .tar: objects, no cross linker needed
    executable.export_library(str(lib))
    plan["lib"] = lib.name
    plan["lib_sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    extra = {PLAN_FILE: json.dumps(plan, indent=1) + "\n"}
    if options.get("asm"):
        extra[ASM_FILE] = executable.mod.imports[0].inspect_source("s")
    return write(out_dir, module, weights, name, entry=plan["entry"], extra_files=extra)


def finalize_passes(target: Any) -> list:
    """TVM's cpu finalization without KillAfterLastUse: that pass drops each tensor after its last use with a VM
    call of its own (about a third of r1-tiny's VM instructions), while the storage those tensors live in is
    already shared by StaticPlanBlockMemory and freed when the call returns."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    return [p for p in cpu_pipeline.finalize_passes(target) if p.info.name != "KillAfterLastUse"]


class CpuProgram:
    """A loaded cpu artifact: the library in a Relax VM, with the weights converted once."""

    def __init__(self, artifact: "Artifact") -> None:
        import tvm
        from tvm import relax

        from r1c.backends.cpu.kernels import pack_panels  # imports tvm: loading the target registry must not

        path = Path(artifact.path)
        self.plan = json.loads((path / PLAN_FILE).read_text())
        lib_path = path / LIB_FILE
        if hashlib.sha256(lib_path.read_bytes()).hexdigest() != self.plan["lib_sha256"]:
            raise TargetError(f"artifact {path}: {LIB_FILE} does not match the sha256 in {PLAN_FILE}; recompile")
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
        self.fn = artifact.module.functions[self.plan["entry"]]
        packed = self.plan["packed"]
        w = artifact.weights
        self.weights = [
            tvm.runtime.tensor(pack_panels(w[n], packed[n]) if n in packed else np.ascontiguousarray(w[n]))
            for n in self.plan["weights"]
        ]

    def run(self, inputs: list[Any]) -> list[np.ndarray]:
        """Inputs are copied into the VM's tensors (the function may overwrite its arguments: an in-place cache
        write), except a tvm.runtime.Tensor, which is passed as it is: a caller that keeps a paged step's pools as
        Tensors gets them updated in place, with no copy of the pool per step."""
        import tvm

        from r1c.ir.interpreter import bind_dims

        bind_dims(self.fn, inputs)  # a shape that does not fit the signature is an error here, not in TVM
        args = [x if isinstance(x, tvm.runtime.Tensor) else
                tvm.runtime.tensor(np.ascontiguousarray(vm_storage(np.asarray(x), a.type.dtype)))
                for a, x in zip(self.fn.args, inputs)]  # fmt: skip
        out = self.vm["main"](*args, *self.weights)
        outs = list(out) if len(self.fn.results) != 1 else [out]
        # Views of the VM's result tensors, which they keep alive (no copy); DLPack has no fp8, so those are copied.
        return [o.numpy() if "float8" in str(o.dtype) else np.from_dlpack(o) for o in outs]


def vm_storage(x: np.ndarray, dtype: "DType") -> np.ndarray:
    """x as the VM takes it: the interpreter's storage, fp8e4m3 (float32 values on the e4m3 grid there) as
    ml_dtypes' float8_e4m3fn, converted exactly on the host (TVM's own fp8 casts are wrong in 0.27)."""
    import ml_dtypes

    from r1c.ir.interpreter import to_storage
    from r1c.ir.types import DType

    if dtype == DType.fp8e4m3:
        return to_storage(x, dtype).astype(ml_dtypes.float8_e4m3fn)
    return to_storage(x, dtype)


_PROGRAMS: dict[str, CpuProgram] = {}


def _key(artifact: "Artifact") -> str:
    return str(Path(artifact.path).resolve()) + json.dumps(artifact.manifest["files"], sort_keys=True)


def unload(artifact: "Artifact") -> None:
    """Drop the loaded library and converted weights of an artifact (they are kept for the next run)."""
    _PROGRAMS.pop(_key(artifact), None)


def program(artifact: "Artifact") -> CpuProgram:
    """The artifact's loaded program (loaded once, then kept): its run also takes tvm.runtime.Tensor inputs."""
    key = _key(artifact)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = CpuProgram(artifact)
    return _PROGRAMS[key]


def run_cpu(artifact: "Artifact", inputs: list[np.ndarray]) -> list[np.ndarray]:
    return program(artifact).run(inputs)


register_target("cpu", compile_cpu, "TVM Relax, built by LLVM for this machine's CPU, run by the Relax VM", run_cpu)
register_target("cpu-arm", compile_cpu_arm, "TVM Relax cross-compiled for aarch64 with NEON (objects to link)")
