"""The inference runtime (docs/inference.md): sampling, a paged KV pool, per-target step executors, and an engine
with continuous batching and speculative decoding, driven by `r1c generate` and `r1c serve`."""

from r1c.inference.engine import Engine, EngineStats, TokenEvent
from r1c.inference.executor import Executor, executor_for, register_executor
from r1c.inference.sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "Executor", "SamplingParams", "TokenEvent", "executor_for", "register_executor"]
