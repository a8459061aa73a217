"""Where `@train_step` runs: the reference interpreter (numpy state on the host) or the cuda backend (Triton
kernels; the state tensors stay on the GPU between steps and come back to the host only for checkpoints).

Both follow `r1c.train.step`'s convention: feed (tokens, labels, step) plus the state as weights, get the metrics
and the new value of every state tensor, which replaces the old one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from r1c.ir import run
from r1c.ir.core import Module
from r1c.train.step import METRICS, STEP_FUNCTION, names_attr

TARGETS = ("ref", "cuda")
# The cuda target compiles the train step as built (expert fusion runs on the loss before the grad pass:
# `loss_passes`); these only clean it up.
CUDA_STEP_PASSES = "canonicalize,cse,dce"
# Run on the loss before differentiation: the fused MoE form (permute + grouped GEMMs) has GEMM-shaped gradients.
CUDA_LOSS_PASSES = "canonicalize,cse,expert-fusion,dce"


class TrainTargetError(ValueError):
    """A training target r1c does not have, or one that cannot run here."""


class StepRunner(Protocol):
    def run(self, inputs: list[np.ndarray]) -> list[float]:
        """One step: the metrics (loss, lr, grad_norm); the state is updated in place."""
        ...

    def get_state(self) -> dict[str, np.ndarray]: ...

    def tensor_names(self) -> set[str]:
        """The names `get_state` returns, without copying the tensors."""
        ...

    def set_state(self, state: dict[str, np.ndarray]) -> None: ...


def loss_passes(target: str) -> str:
    """What `build_train_step` runs on the loss before differentiating it for `target`."""
    if target not in TARGETS:
        raise TrainTargetError(f"training target must be one of {', '.join(TARGETS)}, got {target!r}")
    return CUDA_LOSS_PASSES if target == "cuda" else ""


def step_runner(module: Module, state: dict[str, np.ndarray], target: str) -> StepRunner:
    if target == "ref":
        return RefStepRunner(module, state)
    if target == "cuda":
        return CudaStepRunner(module, state)
    raise TrainTargetError(f"training target must be one of {', '.join(TARGETS)}, got {target!r}")


class RefStepRunner:
    def __init__(self, module: Module, state: dict[str, np.ndarray]) -> None:
        self.module, self.state = module, state
        self.state_names = names_attr(module, "state")

    def run(self, inputs: list[np.ndarray]) -> list[float]:
        outs = run(self.module, inputs, self.state, function=STEP_FUNCTION)
        self.state.update(zip(self.state_names, outs[len(METRICS) :]))
        return [float(x) for x in outs[: len(METRICS)]]

    def get_state(self) -> dict[str, np.ndarray]:
        return self.state

    def tensor_names(self) -> set[str]:
        return set(self.state)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = state


class CudaStepRunner:
    """The train step compiled for the cuda target; its weights are the state, replaced by each step's results."""

    def __init__(self, module: Module, state: dict[str, np.ndarray]) -> None:
        from r1c.backends.cuda.target import compile_program

        self.state_names = names_attr(module, "state")
        self.program = compile_program(module, state, {"entry": STEP_FUNCTION, "passes": CUDA_STEP_PASSES})

    def run(self, inputs: list[np.ndarray]) -> list[float]:
        import torch

        p = self.program
        outs = p.forward(p.to_device(inputs))
        p.set_weights(dict(zip(self.state_names, outs[len(METRICS) :])))
        return [float(x) for x in torch.stack(outs[: len(METRICS)]).cpu()]  # one device sync per step

    def get_state(self) -> dict[str, np.ndarray]:
        return {n: t.cpu().numpy() for n, t in self.program.weights.items()}

    def tensor_names(self) -> set[str]:
        return set(self.program.weights)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        import torch

        p = self.program
        p.set_weights({n: torch.from_numpy(np.require(x, requirements="C")).to(p.weights[n]) for n, x in state.items()})
