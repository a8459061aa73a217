"""Token permutation kernels of the fused MoE form (`r1c.ir.ops.moe_fused`): `moe_permute` (a stable counting
sort on the device), `moe_unpermute` (weighted combine), `moe_gather_rows`, `moe_scatter_rows`, and the fused
`moe_permute+grouped_matmul+swiglu`. Importing this module registers every MoE launcher, the grouped GEMMs too.

The counting sort: pairs p = t*K + k are cut into chunks; one launch counts each chunk's pairs per expert, a
second scans those counts over the chunks (one program per expert), a third turns them into each pair's rank
within its expert (pairs of earlier chunks, then earlier pairs of its own chunk: stable) and writes row_of, the
inverse map src_of_row and group_offsets. (A first version redid the scan over all chunks in every program of
the last launch instead: 0.6-1 ms at T=4096-16384 on an H100, as every program read all chunk counts.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.kernels.grouped_gemm import (
    GemmConfig,
    MoeKernelError,
    check_device,
    check_float,
    launch_gmm,
)
from r1c.backends.cuda.launchers import launcher
from r1c.ir.ops.moe_fused import capacity

_MAX_CHUNKS = 1 << 16  # chunks one scan program covers in registers


@triton.jit
def _count_kernel(IDS, COUNTS, P, BLOCK: tl.constexpr, E_P2: tl.constexpr):
    c = tl.program_id(0)
    p = c * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(IDS + p, mask=p < P, other=E_P2).to(tl.int32)  # padding matches no expert
    onehot = (ids[:, None] == tl.arange(0, E_P2)[None, :]).to(tl.int32)
    tl.store(COUNTS + c * E_P2 + tl.arange(0, E_P2), tl.sum(onehot, 0))


@triton.jit
def _scan_kernel(COUNTS, BASE, TOTALS, C, E_P2: tl.constexpr, C_P2: tl.constexpr):
    """Program e: exclusive prefix sum of expert e's counts over the chunks, and its total."""
    e = tl.program_id(0)
    cs = tl.arange(0, C_P2)
    counts = tl.load(COUNTS + cs * E_P2 + e, mask=cs < C, other=0)
    tl.store(BASE + cs * E_P2 + e, tl.cumsum(counts, 0) - counts, mask=cs < C)
    tl.store(TOTALS + e, tl.sum(counts, 0))


@triton.jit
def _place_kernel(
    IDS, BASE, TOTALS, OFFSETS, ROW_OF, SRC, P, K, E, ROUTED, CAP, BLOCK: tl.constexpr, E_P2: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    es = tl.arange(0, E_P2)
    limit = tl.where(es < ROUTED, CAP, P)  # shared experts (the last ones) never drop
    kept = tl.minimum(tl.load(TOTALS + es, mask=es < E, other=0), limit)
    ends = tl.cumsum(kept, 0)
    starts = ends - kept
    p = c * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(IDS + p, mask=p < P, other=E_P2).to(tl.int32)
    onehot = ids[:, None] == es[None, :]
    ranks = tl.cumsum(onehot.to(tl.int32), 0) - 1 + tl.load(BASE + c * E_P2 + es)[None, :]
    rank = tl.sum(tl.where(onehot, ranks, 0), 1)  # pairs of this expert before p: earlier chunks, then this one
    row = tl.sum(tl.where(onehot, starts[None, :], 0), 1) + rank
    keep = rank < tl.sum(tl.where(onehot, limit[None, :], 0), 1)
    tl.store(ROW_OF + p, tl.where(keep, row, -1), mask=p < P)
    tl.store(SRC + row, p // K, mask=keep & (p < P))
    if c == 0:
        tl.store(OFFSETS + 1 + es, ends, mask=es < E)
        tl.store(OFFSETS, 0)


@triton.jit
def _gather_sorted_kernel(X, SRC, OFFSETS, OUT, R, D, E, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    total = tl.load(OFFSETS + E)  # rows past the kept pairs are padding: zeros
    ok = rows < total
    src = tl.load(SRC + rows, mask=ok, other=0).to(tl.int64)
    vals = tl.load(X + src[:, None] * D + cols[None, :], mask=ok[:, None] & (cols[None, :] < D), other=0.0)
    tl.store(OUT + rows[:, None].to(tl.int64) * D + cols[None, :], vals, mask=(rows[:, None] < R) & (cols[None, :] < D))


def _check_ids(name: str, ids: torch.Tensor, tokens: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != tokens or ids.dtype not in (torch.int32, torch.int64):
        raise MoeKernelError(f"{name}: ids must be int32/int64 [T={tokens}, K], got {ids.dtype} {tuple(ids.shape)}")


def sort_pairs(
    ids: torch.Tensor, num_experts: int, num_shared: int, capacity_factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group_offsets [E+1] int32, row_of [T, K] int32, src_of_row [T*K] int32: the token of each kept row;
    entries past group_offsets[E] are unwritten). Expert ids must lie in [0, num_experts): they are not checked
    here, as that would read them back to the host (the IR reference checks them)."""
    if num_experts < 1 or not 0 <= num_shared < num_experts:
        raise MoeKernelError(
            f"moe_permute: needs num_experts >= 1, 0 <= num_shared < num_experts: {num_experts}, {num_shared}"
        )
    if capacity_factor < 0 or not math.isfinite(capacity_factor):
        raise MoeKernelError(f"moe_permute: capacity_factor must be finite and >= 0, got {capacity_factor}")
    t, k = ids.shape
    p, dev = t * k, ids.device
    e_p2 = triton.next_power_of_2(num_experts)
    block = max(16, 16384 // e_p2)  # a chunk's one-hot [block, experts] stays in registers
    chunks = triton.cdiv(p, block)
    if chunks > _MAX_CHUNKS:
        raise MoeKernelError(
            f"moe_permute: {p} pairs over {num_experts} experts exceed one scan's {_MAX_CHUNKS} chunks"
        )
    routed = num_experts - num_shared
    cap = capacity(capacity_factor, t, k - num_shared, routed) if capacity_factor > 0 and t else p
    offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    row_of = torch.empty(t, k, device=dev, dtype=torch.int32)
    src = torch.empty(p, device=dev, dtype=torch.int32)
    if p == 0:
        offsets.fill_(0)
        return offsets, row_of, src
    counts = torch.empty(chunks, e_p2, device=dev, dtype=torch.int32)
    base = torch.empty(chunks, e_p2, device=dev, dtype=torch.int32)
    totals = torch.empty(num_experts, device=dev, dtype=torch.int32)
    ids = ids.contiguous()
    _count_kernel[(chunks,)](ids, counts, p, BLOCK=block, E_P2=e_p2, num_warps=8)
    _scan_kernel[(num_experts,)](counts, base, totals, chunks, E_P2=e_p2, C_P2=triton.next_power_of_2(chunks))
    _place_kernel[(chunks,)](
        ids, base, totals, offsets, row_of, src, p, k, num_experts, routed, min(cap, p),
        BLOCK=block, E_P2=e_p2, num_warps=8,
    )  # fmt: skip
    return offsets, row_of, src


@launcher("moe_permute")
def moe_permute(
    x: torch.Tensor, ids: torch.Tensor, *, num_experts: int, num_shared: int, capacity_factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("moe_permute", x, ids)
    check_float("moe_permute", x)
    if x.dim() != 2:
        raise MoeKernelError(f"moe_permute: x must be [T, D], got {tuple(x.shape)}")
    _check_ids("moe_permute", ids, x.shape[0])
    offsets, row_of, src = sort_pairs(ids, num_experts, num_shared, capacity_factor)
    rows, d = ids.numel(), x.shape[1]
    x_sorted = torch.empty(rows, d, device=x.device, dtype=x.dtype)
    if x_sorted.numel():
        grid = (triton.cdiv(rows, 32), triton.cdiv(d, 128))
        _gather_sorted_kernel[grid](
            x.contiguous(), src, offsets, x_sorted, rows, d, num_experts, BLOCK_R=32, BLOCK_D=128
        )
    return x_sorted, offsets, row_of


@launcher("moe_permute+grouped_matmul+swiglu")
def moe_permute_grouped_matmul_swiglu(
    x: torch.Tensor,
    ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    *,
    num_experts: int,
    num_shared: int,
    capacity_factor: float,
    first_expert: int = 0,
    config: GemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(act, group_offsets, row_of) where (x_sorted, group_offsets, row_of) = moe_permute(x, ids) and
    act = grouped_matmul+swiglu(x_sorted, w_gate_up, group_offsets, first_expert): the GEMM loads each row of A
    straight from x through the sort's inverse map, so x_sorted [T*K, D] is never written nor read."""
    name = "moe_permute+grouped_matmul+swiglu"
    check_device(name, x, ids, w_gate_up)
    check_float(name, x, w_gate_up)
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_gate_up.shape[2] != x.shape[1] or w_gate_up.shape[1] % 2:
        raise MoeKernelError(
            f"{name}: needs x [T, D], w_gate_up [E, 2F, D]: {tuple(x.shape)}, {tuple(w_gate_up.shape)}"
        )
    _check_ids(name, ids, x.shape[0])
    if first_expert < 0 or first_expert + w_gate_up.shape[0] > num_experts:
        raise MoeKernelError(f"{name}: experts {first_expert}..+{w_gate_up.shape[0]} exceed num_experts={num_experts}")
    offsets, row_of, src = sort_pairs(ids, num_experts, num_shared, capacity_factor)
    f, rows = w_gate_up.shape[1] // 2, ids.numel()
    act = launch_gmm(
        x, w_gate_up, offsets, first_expert, n_out=f, rows=rows, swiglu=True, a_idx=src, config=config
    )  # fmt: skip
    return act, offsets, row_of


@triton.jit
def _unpermute_kernel(Y, ROW_OF, WTS, OUT, T, D, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < T
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        row = tl.load(ROW_OF + ts * K + k, mask=t_ok, other=-1)
        w = tl.load(WTS + ts * K + k, mask=t_ok, other=0.0).to(tl.float32)
        ok = (row >= 0)[:, None] & (cols[None, :] < D)
        y = tl.load(Y + row[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0)
        acc += w[:, None] * y.to(tl.float32)
    tl.store(
        OUT + ts[:, None].to(tl.int64) * D + cols[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=t_ok[:, None] & (cols[None, :] < D),
    )


def _check_rows(name: str, rows: torch.Tensor, row_of: torch.Tensor) -> None:
    if row_of.dim() != 2 or row_of.dtype not in (torch.int32, torch.int64):
        raise MoeKernelError(f"{name}: row_of must be int32/int64 [T, K], got {row_of.dtype} {tuple(row_of.shape)}")
    if rows.shape[0] != row_of.numel():
        raise MoeKernelError(f"{name}: {rows.shape[0]} rows, but row_of {tuple(row_of.shape)} needs T*K")


@launcher("moe_unpermute")
def moe_unpermute(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * y[row_of[t, k]], in fp32 and rounded once. row_of entries must be -1 or
    rows of y (not checked on the device)."""
    check_device("moe_unpermute", y, row_of, weights)
    check_float("moe_unpermute", y, weights)
    if y.dim() != 2:
        raise MoeKernelError(f"moe_unpermute: y must be [T*K, D], got {tuple(y.shape)}")
    _check_rows("moe_unpermute", y, row_of)
    if weights.shape != row_of.shape:
        raise MoeKernelError(f"moe_unpermute: weights {tuple(weights.shape)} must match row_of {tuple(row_of.shape)}")
    (t, k), d = row_of.shape, y.shape[1]
    out = torch.empty(t, d, device=y.device, dtype=y.dtype)
    if out.numel():
        grid = (triton.cdiv(t, 16), triton.cdiv(d, 256))
        _unpermute_kernel[grid](
            y.contiguous(), row_of.contiguous(), weights.contiguous(), out, t, d, K=k, BLOCK_T=16, BLOCK_D=256
        )
    return out


@launcher("moe_gather_rows")
def moe_gather_rows(y: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """out[t, k] = y[row_of[t, k]] (0 where row_of is -1): the combine with K one-hot weights, one slot per row."""
    check_device("moe_gather_rows", y, row_of)
    check_float("moe_gather_rows", y)
    if y.dim() != 2:
        raise MoeKernelError(f"moe_gather_rows: y must be [T*K, D], got {tuple(y.shape)}")
    _check_rows("moe_gather_rows", y, row_of)
    (t, k), d = row_of.shape, y.shape[1]
    out = torch.empty(t * k, d, device=y.device, dtype=y.dtype)
    if out.numel():
        ones = torch.ones(t * k, 1, device=y.device, dtype=y.dtype)  # weight 1 for the single slot of each row
        grid = (triton.cdiv(t * k, 16), triton.cdiv(d, 256))
        _unpermute_kernel[grid](
            y.contiguous(), row_of.contiguous().view(t * k, 1), ones, out, t * k, d, K=1, BLOCK_T=16, BLOCK_D=256
        )
    return out.view(t, k, d)


@triton.jit
def _scatter_add_kernel(Z, ROW_OF, ACC, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(ROW_OF + ps, mask=ps < P, other=-1)
    ok = (row >= 0)[:, None] & (cols[None, :] < D)
    z = tl.load(Z + ps[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(ACC + row[:, None].to(tl.int64) * D + cols[None, :], z, mask=ok)  # rows may repeat: add


@triton.jit
def _cast_kernel(SRC, DST, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(DST + i, tl.load(SRC + i, mask=i < N).to(DST.dtype.element_ty), mask=i < N)


@launcher("moe_scatter_rows")
def moe_scatter_rows(z: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """out[row_of[t, k]] += z[t, k] into T*K zero rows (fp32 atomics, then one rounding to z's dtype)."""
    check_device("moe_scatter_rows", z, row_of)
    check_float("moe_scatter_rows", z)
    if z.dim() != 3 or row_of.shape != z.shape[:2] or row_of.dtype not in (torch.int32, torch.int64):
        raise MoeKernelError(
            f"moe_scatter_rows: needs z [T, K, D], int row_of [T, K]: {tuple(z.shape)}, {row_of.dtype}"
        )
    t, k, d = z.shape
    acc = torch.zeros(t * k, d, device=z.device, dtype=torch.float32)
    if acc.numel():
        grid = (triton.cdiv(t * k, 16), triton.cdiv(d, 128))
        _scatter_add_kernel[grid](z.contiguous(), row_of.contiguous(), acc, t * k, d, BLOCK_P=16, BLOCK_D=128)
    if z.dtype == torch.float32:
        return acc
    out = torch.empty(t * k, d, device=z.device, dtype=z.dtype)
    if out.numel():
        _cast_kernel[(triton.cdiv(out.numel(), 1024),)](acc, out, out.numel(), BLOCK=1024)
    return out
