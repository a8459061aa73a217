"""Training: the train-step builder (grad + clipping + optimizer as IR), its runtime, data, checkpoints, LoRA,
mixed precision and the loss-curve plot."""

from r1c.train.config import TrainConfig, TrainConfigError
from r1c.train.step import build_train_step

__all__ = ["TrainConfig", "TrainConfigError", "build_train_step"]
