"""Runs `@train_step` on a target (the reference interpreter or the cuda backend: `step_runner.py`), carrying the
state tensors between steps (the convention of `r1c.train.step`), and saves/resumes checkpoints bit-for-bit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r1c.ir import init_weights
from r1c.ir.core import Module
from r1c.ir.interpreter import init_weight
from r1c.train import checkpoint
from r1c.train.config import TrainConfig
from r1c.train.data import Batches
from r1c.train.step import STEP_FUNCTION, build_train_step, names_attr
from r1c.train.step_runner import loss_passes, step_runner


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int


def initial_state(base: Module, train_module: Module, seed: int) -> dict[str, np.ndarray]:
    """The base model's weights exactly as `init_weights(base, seed)` gives them (so other frameworks can start from
    the same init), then the params training added (adapters, optimizer state) from a second, derived stream."""
    state = init_weights(base, seed)
    rng = np.random.default_rng([seed, 1])
    for name, p in train_module.params.items():
        if name not in state:
            state[name] = init_weight(p.type, p.init, rng)
    return state


class Trainer:
    def __init__(
        self, module: Module, state: dict[str, np.ndarray], data: Batches, step: int = 0, target: str = "ref"
    ) -> None:
        if STEP_FUNCTION not in module.functions:
            raise ValueError(f"module @{module.name} has no @{STEP_FUNCTION}; build it with build_train_step")
        self.module, self.data, self.step, self.target = module, data, step, target
        self.runner = step_runner(module, state, target)
        self.state_names = names_attr(module, "state")
        self.history: list[StepResult] = []

    @classmethod
    def create(cls, base: Module, cfg: TrainConfig, tokens: np.ndarray, target: str = "ref") -> "Trainer":
        module = build_train_step(base, cfg, loss_passes=loss_passes(target))
        return cls(
            module, initial_state(base, module, cfg.seed), Batches(tokens, cfg.batch, cfg.seq, cfg.seed), 0, target
        )

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Every weight and optimizer tensor, on the host (a copy from the GPU on the cuda target)."""
        return self.runner.get_state()

    @state.setter
    def state(self, state: dict[str, np.ndarray]) -> None:
        self.runner.set_state(state)

    def run_step(self) -> StepResult:
        tokens, labels = self.data.next()
        loss, lr, norm = self.runner.run([tokens, labels, np.int32(self.step + 1)])
        self.step += 1
        result = StepResult(self.step, loss, lr, norm, int(tokens.size))
        self.history.append(result)
        return result

    def save(self, path: str | Path) -> Path:
        meta = {
            "step": self.step,
            "data": self.data.state(),
            "module": self.module.name,
            "state": self.state_names,
            "history": [[r.step, r.loss, r.lr, r.grad_norm, r.tokens] for r in self.history],
        }
        return checkpoint.save(path, self.state, meta)

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint of this same training setup (same module, config and data)."""
        state, meta = checkpoint.load(path)
        if meta.get("state") != self.state_names or set(state) != self.runner.tensor_names():
            raise checkpoint.CheckpointError(
                f"{path}: the checkpoint holds another training state (different model, optimizer or LoRA setup)"
            )
        self.state, self.step = state, int(meta["step"])
        self.history = [StepResult(int(s), loss, lr, norm, int(n)) for s, loss, lr, norm, n in meta["history"]]
        self.data.restore(meta["data"])
