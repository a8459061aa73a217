"""Where a pipeline stage's training functions (forward, VJP, update) run, and the few array operations the stage runner
needs between them, for each training target:

- `RefStageExec`: numpy arrays through the reference interpreter (expert parallelism hooks in here);
- `CudaStageExec`: each function compiled by the cuda backend into its own plan, the three sharing one dict of
  device tensors (the stage's parameters and optimizer state), so activations, cotangents and gradients stay on the
  GPU; only the scalars of the loss and the gradient norm come back to the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r1c.distributed.program import StagePlan
from r1c.ir.core import Function, Module, Value
from r1c.ir.interpreter import run_function


class RefStageExec:
    def __init__(self, module: Module, plan: StagePlan, state: dict[str, np.ndarray], overrides: Any) -> None:
        self.module, self.state, self.overrides = module, state, overrides

    def run(self, f: Function, args: list) -> list:
        return run_function(self.module, f, args, self.state, self.overrides)

    def set_state(self, new: dict[str, np.ndarray]) -> None:
        self.state.update(new)

    def sync(self) -> None:
        """Wait for the work launched so far (numpy: done already)."""

    def wire_dtype(self, value: Value) -> np.dtype:
        """The dtype `value` travels in between stages (the interpreter holds bf16 values as rounded float32)."""
        return np.dtype(value.type.dtype.numpy)

    def host_state(self) -> dict[str, np.ndarray]:
        return self.state

    def scalar(self, value: float | int, dtype: type) -> np.ndarray:
        return np.asarray(value, dtype)

    def sq_sum(self, xs: list[np.ndarray]) -> float:
        return sum(float(np.sum(np.square(x.astype(np.float64)))) for x in xs)

    def flat64(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([x.astype(np.float64).ravel() for x in xs])

    def split_like(self, flat: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
        out, at = [], 0
        for x in xs:
            out.append(flat[at : at + x.size].reshape(x.shape).astype(x.dtype))
            at += x.size
        return out


class CudaStageExec:
    def __init__(self, module: Module, plan: StagePlan, state: dict[str, np.ndarray]) -> None:
        import torch

        from r1c.backends.cuda.runtime import Program, pick_device

        self.device = pick_device()  # "cuda": the rank's current device (set when its process group starts)
        self.torch = torch
        self.weights = {n: torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for n, x in state.items()}
        self.programs: dict[str, Program] = {}
        for f in (plan.forward, plan.vjp, plan.update):
            if f is not None:
                self.programs[f.name] = stage_program(module, f, state, device_weights=self.weights)

    def run(self, f: Function, args: list) -> list:
        p = self.programs[f.name]
        return p.forward(p.to_device(args))

    def wire_dtype(self, value: Value) -> Any:
        """The torch dtype of `value` on the device (bf16 activations under mixed precision)."""
        return next(iter(self.programs.values())).dtype_of(value.type.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def set_state(self, new: dict[str, Any]) -> None:
        first, *rest = self.programs.values()
        first.set_weights(new)  # checks and replaces them in the dict every program shares
        for p in rest:
            p.refresh_static()

    def host_state(self) -> dict[str, np.ndarray]:
        return {n: t.cpu().numpy() for n, t in self.weights.items()}

    def scalar(self, value: float | int, dtype: type) -> Any:
        return self.torch.from_numpy(np.asarray(value, dtype)).to(self.device)

    def sq_sum(self, xs: list) -> float:
        if not xs:
            return 0.0
        return float(self.torch.stack([x.double().square().sum() for x in xs]).sum())

    def flat64(self, xs: list) -> Any:
        return self.torch.cat([x.double().reshape(-1) for x in xs])

    def split_like(self, flat: Any, xs: list) -> list:
        out, at = [], 0
        for x in xs:
            out.append(flat[at : at + x.numel()].view(x.shape).to(x.dtype))
            at += x.numel()
        return out


def stage_program(
    module: Module, f: Function, weights: dict[str, np.ndarray], dtype: str | None = None, device_weights: Any = None
) -> Any:
    """One stage function compiled for the cuda target with only the params it reads (already optimized: the
    stages come from a partition of the optimized module), loaded as a `Program`."""
    from r1c.backends.cuda.target import compile_program

    reads = {op.attrs["name"] for op in f.body if op.name == "param"}
    sub = Module(module.name, {n: p for n, p in module.params.items() if n in reads}, {f.name: f}, dict(module.attrs))
    options = {"entry": f.name, "passes": "canonicalize,cse,dce", "dtype": dtype}
    return compile_program(sub, {n: weights[n] for n in reads}, options, device_weights)


def stage_exec(target: str, module: Module, plan: StagePlan, state: dict[str, np.ndarray], overrides: Any) -> Any:
    """`target` as `PipelineConfig` checked it (which also refuses expert parallelism, the overrides, on cuda)."""
    return CudaStageExec(module, plan, state) if target == "cuda" else RefStageExec(module, plan, state, overrides)
