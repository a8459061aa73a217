"""Launchers: the functions that run one IR op on torch tensors with a Triton kernel, keyed by op name.

A launcher is called as `fn(*operands, **attrs)` with the op's operands as torch tensors (on the CUDA device, or
on the CPU under TRITON_INTERPRET=1) and its complete attributes, and returns one tensor or a tuple (one per op
result). Kernel-template modules register theirs with `@launcher("op_name")`; the backend looks them up with
`get_launcher` and a missing one is a compile error naming the op, never a fallback.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

Launcher = Callable[..., Any]

_LAUNCHERS: dict[str, Launcher] = {}

# Modules whose import registers launchers; imported on first lookup (they import torch and triton).
_TEMPLATE_MODULES: list[str] = [
    "r1c.backends.cuda.kernels.moe",
    "r1c.backends.cuda.kernels.moe_experts",
    "r1c.backends.cuda.kernels.flash_attention",
    "r1c.backends.cuda.kernels.decode_attention",
    "r1c.backends.cuda.kernels.kv_cache",
    "r1c.backends.cuda.kernels.paged",
    "r1c.backends.cuda.kernels.cross_entropy",
    "r1c.backends.cuda.kernels.moe_experts_grad",
    "r1c.backends.cuda.kernels.norm_grad",
    "r1c.backends.cuda.kernels.optim",
    "r1c.backends.cuda.kernels.scatter",
]


class NoLauncherError(LookupError):
    pass


def launcher(op_name: str) -> Callable[[Launcher], Launcher]:
    def register(fn: Launcher) -> Launcher:
        if op_name in _LAUNCHERS:
            first = _LAUNCHERS[op_name].__module__
            raise ValueError(f"op '{op_name}' has two CUDA launchers: {first} and {fn.__module__}")
        _LAUNCHERS[op_name] = fn
        return fn

    return register


def _ensure_loaded() -> None:
    for mod in _TEMPLATE_MODULES:
        importlib.import_module(mod)


def get_launcher(op_name: str) -> Launcher:
    _ensure_loaded()
    try:
        return _LAUNCHERS[op_name]
    except KeyError:
        raise NoLauncherError(f"op '{op_name}' has no CUDA kernel template") from None


def has_launcher(op_name: str) -> bool:
    _ensure_loaded()
    return op_name in _LAUNCHERS
