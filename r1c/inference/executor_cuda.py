"""The cuda target's paged-step executor: the pools are torch tensors on the GPU, written in place by the compiled
step (the lowering donates them: backends/cuda/lower.py), so they never leave the device between steps; each step
uploads only tokens, block table and start, and brings back logits.

Decode steps (S = 1) replay a CUDA graph captured once per (batch, table width) bucket: the graph holds the pool
tensors themselves and static copies of tokens, table and start, so a replay costs three small copies and one
launch. Steps of several tokens (prefill, speculative verify) run eagerly (their shapes vary). `step_device` is the
same step on device tensors with device logits, for callers that sample on the GPU (bench/decode_paged_cuda.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from r1c.artifact import Artifact, ArtifactError
from r1c.inference.executor import OUTPUTS, fixed_dims, paged_signature, pool_shapes, register_executor


class CudaExecutor:
    """A cuda artifact compiled with `--entry paged_step` (optionally after `kv-quant`), run on torch tensors."""

    target = "cuda"

    def __init__(self, artifact: Artifact, entry: str | None = None, *, cuda_graph: bool = True) -> None:
        from r1c.backends.cuda.runtime import program

        if entry not in (None, artifact.entry):
            raise ArtifactError(f"cuda artifact {artifact.path} is compiled for @{artifact.entry}, not @{entry}")
        self.signature = paged_signature(artifact.module.functions[artifact.entry])
        self.program = program(artifact)
        self.fixed = fixed_dims(self.signature, {})
        self.device = self.program.device
        self.cuda_graph = cuda_graph and self.device.type == "cuda"  # the interpreter runs eagerly

    def new_pools(self, num_pages: int, page_size: int) -> list[torch.Tensor]:
        # A graph captured over other pools would copy them in on every replay: start over with these.
        self.program.graphs.clear()
        args = self.signature.fn.args[1:-2]
        return [
            torch.zeros(shape, dtype=self.program.value_dtype(a.name), device=self.device)  # scales stay f32
            for a, (shape, _) in zip(args, pool_shapes(self.signature, num_pages, page_size))
        ]

    def step_device(
        self, tokens: torch.Tensor, pools: list[torch.Tensor], block_table: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step on device tensors: (logits [B, S, V] on the device, pools). The logits of a graph replay are the
        graph's own buffer: read them before the next step."""
        if len(pools) != len(self.signature.pools):
            raise ArtifactError(f"paged step @{self.signature.fn.name} takes {len(self.signature.pools)} pool(s), "
                                f"got {len(pools)}")  # fmt: skip
        graph = self.cuda_graph and tokens.shape[1] == 1
        outs = self.program.forward([tokens, *pools, block_table, start], cuda_graph=graph)
        return outs[0], list(outs[1:])

    def step(
        self,
        tokens: np.ndarray,
        pools: list[torch.Tensor],
        block_table: np.ndarray,
        start: np.ndarray,
        out: str = "all",
    ) -> tuple[np.ndarray, list[Any]]:
        """The executor protocol's step (executor.OUTPUTS), reduced on the GPU before the copy to the host: a greedy
        batch moves B token ids instead of B x V logits, a prefill the last position instead of all S."""
        up = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.int32)).to(self.device)  # noqa: E731
        logits, pools = self.step_device(up(tokens), pools, up(block_table), up(start))
        if out == "argmax":
            return logits[:, -1].argmax(dim=-1).cpu().numpy(), pools
        if out not in OUTPUTS:
            raise ValueError(f"step output must be one of {', '.join(OUTPUTS)}, got {out!r}")
        return (logits[:, -1:] if out == "last" else logits).float().cpu().numpy(), pools


register_executor("cuda", CudaExecutor)
