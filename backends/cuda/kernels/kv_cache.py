"""Launchers of the KV-cache ops (ir/ops/cache.py): `cache_write` and `cached_attention`.

`cache_write` writes the step's rows into the cache tensor it is given and returns that tensor: the lowering
(backends/cuda/lower.py) marks the step in place when nothing reads the old cache afterwards, and otherwise the
runtime hands the launcher a copy. `cached_attention` runs decode_attention's kernel over layer `layer` of the
cache with the per-row fill levels read on the device, so a CUDA graph captured once serves every step.

Bounds: a step that does not fit in the cache is a DecodeKernelError in eager runs (one host read of `start`).
Inside a CUDA graph capture `start` cannot be read; the kernels then drop writes past the cache and attend to at
most C slots, so a caller replaying a graph keeps start + S <= C (the eager warm-up run checks the first step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels import decode_attention as da
from r1c.backends.cuda.launchers import launcher

FLOAT_CACHES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kernel(
    CACHE, NEW, START, H, S, C,
    scb, sch, scs, snb, snh, sns,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """cache[b, h, start[b] + s, :] = new[b, h, s, :] for one (b, h) and BLOCK_S steps; slots >= C are dropped."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(START + b) + s
    ok = ((s < S) & (slot < C))[:, None] & (d < D)[None, :]
    x = tl.load(NEW + b * snb + h * snh + s[:, None] * sns + d[None, :], mask=ok)
    tl.store(CACHE + b * scb + h * sch + slot[:, None].to(tl.int64) * scs + d[None, :], x, mask=ok)


def check_start(op: str, start: torch.Tensor, batch: int, steps: int, slots: int) -> None:
    if start.dtype != torch.int32 or tuple(start.shape) != (batch,):
        raise da.DecodeKernelError(f"{op}: start must be int32 [{batch}], got {start.dtype} {tuple(start.shape)}")
    if start.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host reads inside a capture (see the module docstring)
    lo, hi = int(start.min()), int(start.max())
    if lo < 0 or hi + steps > slots:
        raise da.DecodeKernelError(
            f"{op}: rows start at {lo}..{hi} with {steps} new token(s), outside the cache's {slots} slots"
        )


def check_cache(op: str, cache: torch.Tensor, layer: int) -> None:
    if cache.dtype not in FLOAT_CACHES or cache.dim() != 5:
        raise da.DecodeKernelError(f"{op}: the cache must be a float [L, B, H, C, D] tensor, got {cache.dtype} "
                                   f"{tuple(cache.shape)}")  # fmt: skip
    if not 0 <= layer < cache.shape[0]:
        raise da.DecodeKernelError(f"{op}: layer {layer} is out of range for {cache.shape[0]} layers")


@launcher("cache_write")
def cache_write(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor, *, layer: int) -> torch.Tensor:
    """Writes `new` into `cache` (in place) and returns it; see the module docstring."""
    check_cache("cache_write", cache, layer)
    _, bsz, h, slots, d = cache.shape
    if new.dtype != cache.dtype or tuple(new.shape) != (bsz, h, new.shape[2], d):
        raise da.DecodeKernelError(f"cache_write: new must be {cache.dtype} [{bsz}, {h}, S, {d}], got {new.dtype} "
                                   f"{tuple(new.shape)}")  # fmt: skip
    steps = new.shape[2]
    check_start("cache_write", start, bsz, steps, slots)
    dst = cache[layer]
    new = new if new.stride(-1) == 1 else new.contiguous()
    block_s = min(64, triton.next_power_of_2(max(steps, 1)))
    _write_kernel[(bsz * h, triton.cdiv(steps, block_s))](
        dst, new, start, h, steps, slots, dst.stride(0), dst.stride(1), dst.stride(2),
        new.stride(0), new.stride(1), new.stride(2), D=d, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return cache


@launcher("cached_attention")
def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor, *,
                     layer: int, scale: float) -> torch.Tensor:  # fmt: skip
    """Causal attention of q over each row's first start + S slots of layer `layer` (decode_attention's kernel)."""
    op = "cached_attention"
    check_cache(op, k_cache, layer)
    check_cache(op, v_cache, layer)
    k, v = k_cache[layer], v_cache[layer]
    da.check_shapes(op, q, k, v)
    if k.dtype != q.dtype:
        raise da.DecodeKernelError(f"{op}: the cache must have q's dtype {q.dtype}, got {k.dtype}")
    check_start(op, start, q.shape[0], q.shape[2], k.shape[2])
    one = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=q.device)  # per-channel scales of 1: no dequantization
    return da.launch(q, k, one.expand(k.shape), v, one.expand(v.shape), (False,) * 4, start, scale=scale,
                     causal=True, window=0, sinks=0)  # fmt: skip
