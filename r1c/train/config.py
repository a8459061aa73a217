"""Training hyperparameters: the keys a `train { }` block may set (module attrs `train.<key>`) and their defaults.

This file is the single list of keys: the DSL checks `train { }` entries against it and the runtime reads the
module attrs through it, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any

ATTR_PREFIX = "train."


class TrainConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    min_lr: float = 0.0  # where the decay ends
    warmup: int = 0  # linear warmup updates
    schedule: str = "cosine"  # constant | cosine | linear decay after warmup, to min_lr at `steps`
    steps: int = 50
    batch: int = 4
    seq: int = 32
    clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    bias_gamma: float = 0.0  # aux-loss-free balancing: e_score_correction_bias step per update; 0 = off
    aux_loss_alpha: float = 0.0  # weight of the sequence-wise expert balance loss (moe-aux-loss pass); 0 = off
    seed: int = 0  # weight init and batch sampling
    precision: str = "f32"  # f32 | bf16 (bf16 compute, f32 master weights and optimizer state)
    recompute: str = "none"  # gradient checkpointing of the grad pass: none | layer
    lora_rank: int = 0  # 0: full fine-tuning; > 0: train only LoRA adapters
    lora_alpha: float = 16.0
    lora_targets: str = "q_b_proj,kv_b_proj,o_proj"  # comma-separated projection names
    save_every: int = 0  # checkpoint period in steps (0: only at the end)

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("adamw", "sgd"),
            "schedule": ("constant", "cosine", "linear"),
            "precision": ("f32", "bf16"),
            "recompute": ("none", "layer"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TrainConfigError(f"train.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        for key in ("steps", "batch", "seq"):
            if getattr(self, key) < 1:
                raise TrainConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "lora_rank", "save_every"):
            if getattr(self, key) < 0:
                raise TrainConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.aux_loss_alpha < 0:
            raise TrainConfigError(f"train.aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
        if self.lr <= 0 or self.clip < 0:
            raise TrainConfigError(f"train.lr must be > 0 and train.clip >= 0, got lr={self.lr}, clip={self.clip}")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **check_values(changes))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """The config a module's `train.<key>` attrs give, then `overrides` (e.g. command-line flags)."""
        given = {k[len(ATTR_PREFIX) :]: v for k, v in attrs.items() if k.startswith(ATTR_PREFIX)}
        return cls(**check_values({**given, **{k: v for k, v in overrides.items() if v is not None}}))

    def to_attrs(self) -> dict[str, Any]:
        return {ATTR_PREFIX + f.name: getattr(self, f.name) for f in fields(self)}


KEYS: dict[str, type] = {f.name: type(f.default) for f in fields(TrainConfig)}


def suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEYS), n=2, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "keys: " + ", ".join(KEYS)


def check_value(key: str, value: Any) -> Any:
    """`value` converted to the key's kind (an int is accepted for a float); a clear error otherwise."""
    if key not in KEYS:
        raise TrainConfigError(f"unknown train key '{key}'; {suggest(key)}")
    kind = KEYS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TrainConfigError(f"train.{key} must be {kind.__name__}, got {value!r}")
    return value


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    return {k: check_value(k, v) for k, v in values.items()}
