"""Runs one paged step of a compiled model, whatever the target: the engine's only door to the backends.

A paged step function takes (tokens int[B, S], *pools [L, P, T, D], block_table int[B, M], start int[B]) and returns
(logits [B, S, V], *pools) with the pools in the argument order: one f32 pool, or codes and scales after the kv-quant
pass. Executors allocate the pools from the function's argument types (binding P pages of T tokens) and keep them
where the target wants them: numpy arrays on `ref`, TVM tensors on `cpu` (fed back to the VM without a host round
trip), torch CUDA tensors on `cuda`. The engine never looks inside a pool; it passes back what `step` returned.

Targets register a factory with `register_executor`; `_BUILTIN` names the modules that register one on import
(loaded on first use), so a backend's executor lives next to its own code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from r1c.artifact import Artifact, ArtifactError
from r1c.ir.core import Function, Module
from r1c.ir.types import DType, TensorType

EXPECTED = (
    "a paged step function (tokens: int32[B, S], *pools [L, P, T, D], block_table: int32[B, M], start: int32[B]) "
    "-> (logits [B, S, V], *pools)"
)


@dataclass(frozen=True)
class PagedSignature:
    """What the engine needs to know of a paged step function: its pools' types and the symbols of B, S, P, T, M."""

    fn: Function
    pools: tuple[TensorType, ...]
    vocab_size: int
    dims: Mapping[str, int | str]  # role (batch, steps, pages, page_size, table) -> its dim in the signature


def paged_signature(fn: Function) -> PagedSignature:
    """The signature of a paged step function, or an ArtifactError naming what is expected and what was found."""
    args, results = [a.type for a in fn.args], [r.type for r in fn.results]
    got = f"got @{fn.name}({', '.join(f'%{a.name}: {a.type}' for a in fn.args)}) -> ({', '.join(map(str, results))})"

    def fail(why: str) -> ArtifactError:
        return ArtifactError(f"@{fn.name} is not a paged step function ({why}): expected {EXPECTED}; {got}")

    if len(args) < 4:
        raise fail(f"{len(args)} arguments")
    tokens, pools, table, start = args[0], tuple(args[1:-2]), args[-2], args[-1]
    ints = (tokens, table, start)
    if any(t.dtype.is_float or t.dtype == DType.bool for t in ints) or [t.rank for t in ints] != [2, 2, 1]:
        raise fail("tokens, block_table and start must be integer tensors of rank 2, 2 and 1")
    if any(p.rank != 4 for p in pools):
        raise fail("every pool must have rank 4")
    if len(results) != 1 + len(pools) or [str(r) for r in results[1:]] != [str(p) for p in pools]:
        raise fail("the results must be the logits followed by the pools, with the pools' types")
    logits = results[0]
    if logits.rank != 3 or not logits.dtype.is_float or not isinstance(logits.shape[2], int):
        raise fail("the logits must be a float [B, S, V] with a fixed vocabulary V")
    dims = {
        "batch": tokens.shape[0],
        "steps": tokens.shape[1],
        "pages": pools[0].shape[1],
        "page_size": pools[0].shape[2],
        "table": table.shape[1],
    }
    return PagedSignature(fn, pools, int(logits.shape[2]), dims)


def compiled_signature(artifact: Artifact) -> PagedSignature:
    """The paged signature of a compiled artifact's entry; a compiled target runs only the function it was built for."""
    try:
        return paged_signature(artifact.module.functions[artifact.entry])
    except ArtifactError as e:
        raise ArtifactError(f"{e} (artifact {artifact.path}: compile it with --entry paged_step)") from None


def fixed_dims(sig: PagedSignature, shapes: Mapping[str, int]) -> dict[str, int]:
    """The roles a compiled step fixes: concrete in the signature, or symbols bound by a static-shape build."""
    out = {}
    for role, d in sig.dims.items():
        if isinstance(d, int):
            out[role] = d
        elif d in shapes:
            out[role] = int(shapes[d])
    return out


def pool_shapes(sig: PagedSignature, num_pages: int, page_size: int) -> list[tuple[tuple[int, ...], DType]]:
    """Each pool's concrete shape and dtype for a pool of num_pages pages of page_size tokens."""
    out = []
    for t in sig.pools:
        shape = []
        for i, d in enumerate(t.shape):
            want = num_pages if i == 1 else page_size if i == 2 else None
            if isinstance(d, int):
                if want is not None and d != want:
                    raise ArtifactError(f"@{sig.fn.name} is compiled for pools of type {t}, asked for {want} at {i}")
                shape.append(d)
            elif want is None:
                raise ArtifactError(f"@{sig.fn.name}: pool dimension {d} of {t} is not the page count or size")
            else:
                shape.append(want)
        out.append((tuple(shape), t.dtype))
    return out


# What a step hands back to the host (executors of device targets reduce on the device before the copy):
# "all": float32 logits [B, S, V] (speculative verification reads every position); "last": [B, 1, V], the last
# position (prefill and plain decode sample from it); "argmax": int64 [B], the last position's argmax (the first
# index of the maximum, as np.argmax), for batches of greedy requests.
OUTPUTS = ("all", "last", "argmax")


class Executor(Protocol):
    """One paged step of one compiled model; `step` returns what `out` asks for (OUTPUTS) and the updated pools."""

    target: str
    signature: PagedSignature
    fixed: dict[str, int]  # roles the compiled step fixes (fixed_dims)

    def new_pools(self, num_pages: int, page_size: int) -> list[Any]: ...

    def step(
        self, tokens: np.ndarray, pools: list[Any], block_table: np.ndarray, start: np.ndarray, out: str = "all"
    ) -> tuple[np.ndarray, list[Any]]: ...


def host_output(logits: np.ndarray, out: str) -> np.ndarray:
    """`out` of a step's host logits [B, S, V]."""
    if out == "all":
        return np.asarray(logits, np.float32)
    if out == "last":
        return np.asarray(logits[:, -1:], np.float32)
    if out == "argmax":
        return np.asarray(logits[:, -1]).argmax(axis=-1)
    raise ValueError(f"step output must be one of {', '.join(OUTPUTS)}, got {out!r}")


class RefExecutor:
    """The reference interpreter running the paged step function of a module (the oracle; numpy pools)."""

    target = "ref"

    def __init__(self, module: Module, weights: Mapping[str, np.ndarray], entry: str) -> None:
        if entry not in module.functions:
            have = ", ".join(f"@{n}" for n in module.functions)
            raise ArtifactError(f"module @{module.name} has no paged step function @{entry} (it has {have}): "
                                f"expected {EXPECTED}")  # fmt: skip
        self.module, self.weights = module, dict(weights)
        self.signature = paged_signature(module.functions[entry])
        self.fixed = fixed_dims(self.signature, {})

    def new_pools(self, num_pages: int, page_size: int) -> list[np.ndarray]:
        from r1c.ir.interpreter import to_storage

        # Stored as the interpreter holds the dtype (fp8 codes widened to float32, exactly).
        return [to_storage(np.zeros(s, np.float32), d) for s, d in pool_shapes(self.signature, num_pages, page_size)]

    def step(self, tokens, pools, block_table, start, out="all"):
        from r1c.ir.interpreter import run_function

        outs = run_function(self.module, self.signature.fn, [tokens, *pools, block_table, start], self.weights)
        return host_output(outs[0], out), outs[1:]


def _ref_executor(artifact: Artifact, entry: str | None) -> RefExecutor:
    """A ref artifact holds its whole verified module: its entry if that is a paged step, else @paged_step."""
    if entry is None:
        try:
            paged_signature(artifact.module.functions[artifact.entry])
            entry = artifact.entry
        except ArtifactError:
            entry = "paged_step"
    return RefExecutor(artifact.module, artifact.weights, entry)


class CpuExecutor:
    """A cpu artifact compiled with `--entry paged_step`, run by its Relax VM. The pools are TVM tensors that the
    step writes in place (the cpu runner passes a Tensor argument through as it is), so no pool is copied per step;
    should a build return a pool in a buffer of its own instead (fp8 results come back copied), that one is kept."""

    target = "cpu"

    def __init__(self, artifact: Artifact, entry: str | None) -> None:
        from r1c.backends.cpu.target import program

        if entry not in (None, artifact.entry):
            raise ArtifactError(f"cpu artifact {artifact.path} is compiled for @{artifact.entry}, not @{entry}")
        self.signature = compiled_signature(artifact)
        self.program = program(artifact)
        self.fixed = fixed_dims(self.signature, self.program.plan.get("shapes") or {})

    def new_pools(self, num_pages: int, page_size: int) -> list[Any]:
        from r1c.backends.cpu.target import vm_storage

        return [
            self._tensor(vm_storage(np.zeros(s, np.float32), d))
            for s, d in pool_shapes(self.signature, num_pages, page_size)
        ]

    def step(self, tokens, pools, block_table, start, out="all"):
        outs = self.program.run([tokens, *pools, block_table, start])
        kept = [held if _same_buffer(held, res) else self._tensor(res) for held, res in zip(pools, outs[1:])]
        return host_output(outs[0], out), kept

    @staticmethod
    def _tensor(x: np.ndarray) -> Any:
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x))


def _same_buffer(held: Any, out: np.ndarray) -> bool:
    """Whether the runner's result `out` is a view of the tensor `held` (False for fp8, which DLPack cannot carry:
    the runner hands those back copied)."""
    try:
        return np.from_dlpack(held).ctypes.data == out.ctypes.data
    except (BufferError, TypeError, RuntimeError):
        return False


ExecutorFactory = Callable[[Artifact, "str | None"], Executor]
_EXECUTORS: dict[str, ExecutorFactory] = {"ref": _ref_executor, "cpu": CpuExecutor}
# Targets whose executor lives in a module of its own that calls register_executor on import (loaded on first use).
_BUILTIN = {"cuda": "r1c.inference.executor_cuda"}


def register_executor(target: str, factory: ExecutorFactory) -> None:
    """Make `executor_for` run artifacts of `target` with factory(artifact, entry)."""
    if target in _EXECUTORS:
        raise ValueError(f"an executor for target '{target}' is registered twice")
    _EXECUTORS[target] = factory


def executor_for(
    source: Artifact | Module | str | Path,
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    entry: str | None = None,
) -> Executor:
    """The executor of an artifact (or its directory), or of a module with `weights` on the reference interpreter.

    `entry` picks the paged step function: for ref, default the artifact's entry when it is one, else @paged_step;
    compiled targets run the function they were compiled for (`r1c compile --entry paged_step`)."""
    if isinstance(source, Module):
        if weights is None:
            raise ValueError("running a module needs its weights")
        return RefExecutor(source, weights, entry or "paged_step")
    if weights is not None:
        raise ValueError("an artifact carries its own weights")
    if not isinstance(source, Artifact):
        from r1c.artifact import load

        source = load(source)
    target = source.target
    if target not in _EXECUTORS and target in _BUILTIN:
        importlib.import_module(_BUILTIN[target])
    if target not in _EXECUTORS:
        have = ", ".join(sorted(set(_EXECUTORS) | set(_BUILTIN)))
        raise ArtifactError(f"no inference executor for target '{target}' (artifact {source.path}); have {have}")
    return _EXECUTORS[target](source, entry)
