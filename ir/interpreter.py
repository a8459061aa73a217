"""The numpy reference interpreter: the meaning of every op.

Semantics of narrow types: each op computes in float32 and rounds its results to their declared
dtype (bf16/fp8 values are stored in float32 arrays after rounding, f16 in float16).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from r1c.ir import dims, registry
from r1c.ir.core import DimList, Function, Module, Value
from r1c.ir.types import DType, TensorType, round_to


class InterpreterError(RuntimeError):
    pass


def bind_dims(f: Function, inputs: list[np.ndarray]) -> dict[str, int]:
    """Bind the function's symbolic dims from the shapes of concrete inputs."""
    if len(inputs) != len(f.args):
        raise InterpreterError(
            f"@{f.name} takes {len(f.args)} inputs ({', '.join(str(a) for a in f.args)}), got {len(inputs)}"
        )
    env: dict[str, int] = {}
    # Bind plain symbols first so products like B*S can be checked afterwards.
    for pass_ in range(2):
        for a, x in zip(f.args, inputs):
            if len(a.type.shape) != x.ndim:
                raise InterpreterError(f"input %{a.name}: expected rank {a.type.rank} ({a.type}), got shape {x.shape}")
            for d, n in zip(a.type.shape, x.shape):
                if pass_ == 0 and isinstance(d, str) and "*" in d:
                    continue
                if not dims.unify(d, n, env):
                    raise InterpreterError(
                        f"input %{a.name}: dimension {d} does not match size {n} (shape {x.shape}, type {a.type})"
                    )
    return env


def to_storage(x: np.ndarray, dtype: DType) -> np.ndarray:
    return (
        round_to(x, dtype)
        if dtype in (DType.bf16, DType.f16, DType.fp8e4m3)
        else np.asarray(x).astype(dtype.numpy, copy=False)
    )


def _compute_view(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


def run_function(
    m: Module,
    f: Function,
    inputs: list[np.ndarray],
    weights: dict[str, np.ndarray],
    overrides: Mapping[str, registry.Reference] | None = None,
) -> list[np.ndarray]:
    """`overrides` replaces the reference of the ops it names for this run (same signature; its exceptions pass
    through unwrapped): how the distributed runtime runs an op whose data lives on several processes (expert
    parallelism's `moe_experts`)."""
    overrides = overrides or {}
    inputs = [np.asarray(x) for x in inputs]
    env = bind_dims(f, inputs)
    values: dict[Value, np.ndarray] = {}
    for a, x in zip(f.args, inputs):
        values[a] = to_storage(x, a.type.dtype)
    for op in f.body:
        if op.name == "param":
            name = op.attrs["name"]
            if name not in weights:
                raise InterpreterError(f"no weight given for parameter @{name}")
            w = np.asarray(weights[name])
            want = op.result.type.concrete({})
            if w.shape != want:
                raise InterpreterError(f"weight @{name} has shape {w.shape}, the module declares {want}")
            values[op.result] = to_storage(w, op.result.type.dtype)
            continue
        opdef = registry.get(op.name)
        args = [_compute_view(values[v]) for v in op.operands]
        # References see concrete shapes: symbolic dims in attributes (reshape targets, ...) are bound here.
        attrs = {
            k: DimList(dims.evaluate(d, env) for d in v) if isinstance(v, DimList) else v for k, v in op.attrs.items()
        }
        override = overrides.get(op.name)
        try:
            with np.errstate(all="ignore"):  # IEEE results (inf, nan) are the defined meaning, not a warning
                outs = (override or opdef.reference)(args, attrs)
        except Exception as e:  # name the op: a bare numpy error says nothing about where it came from
            if override is not None:
                raise  # the override's own errors (a failed transfer) are for its caller to handle
            raise InterpreterError(
                f"reference of '{op.name}' defining {', '.join(str(r) for r in op.results)} "
                f"failed: {type(e).__name__}: {e}"
            ) from e
        for r, x in zip(op.results, outs):
            want = r.type.concrete(env) if all(dims.symbols(d) <= env.keys() for d in r.type.shape) else None
            if want is not None and tuple(np.shape(x)) != want:
                raise InterpreterError(
                    f"reference of '{op.name}' gave %{r.name} shape {np.shape(x)}, its type {r.type} says {want}"
                )
            with np.errstate(over="ignore"):  # narrowing overflows to inf, as the hardware does
                values[r] = to_storage(np.asarray(x), r.type.dtype)
    return [values[r] for r in f.results]


def run(
    m: Module,
    inputs: list[np.ndarray],
    weights: dict[str, np.ndarray],
    function: str | None = None,
    overrides: Mapping[str, registry.Reference] | None = None,
) -> list[np.ndarray]:
    f = m.functions[function] if function else m.main
    return run_function(m, f, inputs, weights, overrides)


_INIT = re.compile(r"^(\w+)(?:\((.*)\))?$")


def init_weight(t: TensorType, init: str, rng: np.random.Generator) -> np.ndarray:
    match = _INIT.match(init)
    if not match:
        raise ValueError(f"bad initializer {init!r}")
    kind, args = match.group(1), [float(a) for a in match.group(2).split(",")] if match.group(2) else []
    shape = t.concrete({})
    if kind == "zeros":
        x = np.zeros(shape)
    elif kind == "ones":
        x = np.ones(shape)
    elif kind == "normal":
        x = rng.normal(0.0, args[0] if args else 1.0, shape)
    elif kind == "uniform":
        lo, hi = args if len(args) == 2 else (-1.0, 1.0)
        x = rng.uniform(lo, hi, shape)
    elif kind == "constant":
        x = np.full(shape, args[0])
    else:
        raise ValueError(
            f"unknown initializer {kind!r}; expected zeros, ones, normal(std), uniform(lo,hi), constant(v)"
        )
    return to_storage(x.astype(np.float32), t.dtype)


def init_weights(m: Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: init_weight(p.type, p.init, rng) for name, p in m.params.items()}


def random_inputs(m: Module, f: Function, env: dict[str, int], seed: int = 0) -> list[np.ndarray]:
    """Random (never all-zero) inputs. Integer inputs feeding an embedding stay below its vocabulary size."""
    rng = np.random.default_rng(seed)
    int_high: dict[Value, int] = {}
    for op in f.body:
        if op.name == "embedding":
            table, ids = op.operands
            int_high[ids] = int(table.type.shape[0])
    out = []
    for a in f.args:
        shape = a.type.concrete(env)
        if a.type.dtype.is_float:
            out.append(to_storage(rng.standard_normal(shape).astype(np.float32), a.type.dtype))
        elif a.type.dtype == DType.bool:
            out.append(rng.random(shape) < 0.5)
        else:
            out.append(rng.integers(0, int_high.get(a, 2), shape).astype(a.type.dtype.numpy))
    return out
