"""Grouped GEMMs over the contiguous row groups of the fused MoE form (`r1c.ir.ops.moe_fused`):
`grouped_matmul`, its SwiGLU-epilogue fusion `grouped_matmul+swiglu`, and the weight gradient
`grouped_matmul_wgrad`.

Tile scheduling happens on the device, so no launch reads group_offsets on the host: the grid is an upper bound
on the m-tiles (cdiv(R, BLOCK_M) + groups + 2) times the n-tiles, and each program recomputes, from the few
offsets of its dispatch, which group its m-tile falls in (a cumsum over tiles per group). Besides the experts
there are two zero groups, the rows before and after this dispatch's experts, whose tiles only store zeros:
that is the op's "rows outside this dispatch's groups are 0". Tiles of one group never cover another group's
rows in the store (row mask), but their A loads may read them (clamped to the tensor), which is harmless and
keeps the K loop free of masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from r1c.backends.cuda.launchers import launcher

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class MoeKernelError(ValueError):
    """An input the MoE kernels do not handle (dtype, rank, device, size)."""


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # tiles through tensor descriptors (Hopper's copy engine) instead of pointer loads


def default_config(rows: int, groups: int, swiglu: bool, tma: bool, elem_bytes: int = 2) -> GemmConfig:
    """Few rows per group: the GEMM streams weights, so small M tiles and many N tiles keep every SM loading.
    Many rows: large tiles for the tensor cores (the SwiGLU form holds two accumulators, so half the N). Tiles
    come through TMA where the rows allow it: Triton 3.6 software-pipelines those loads (cp.async.bulk.tensor
    into 3-4 stages) but, for this kernel, not the pointer loads of w (the PTX has no cp.async). f32 operands take
    half the K of a tile, so a stage holds the same bytes (the bf16 tiles at f32 need up to 360 KB of shared
    memory: bench/sm90_aot.py)."""
    per_group = rows / max(groups, 1)
    if per_group <= 16:
        m, n, k, warps, stages = 16, 64, 256 if swiglu else 128, 4, 3 if swiglu else 4
    elif per_group <= 96:
        m, n, k, warps, stages = 64, 64 if swiglu else 128, 64, 4, 4
    else:
        m, n, k, warps, stages = (128, 128, 64, 8, 4) if swiglu else (128, 256, 64, 8, 3)
    return GemmConfig(m, n, k * 2 // elem_bytes, warps, stages, tma)


def check_device(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
            raise MoeKernelError(f"{name}: tensors must be on a CUDA device (CPU only under TRITON_INTERPRET=1)")


def check_float(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in FLOATS:
            raise MoeKernelError(f"{name}: float operands must be f16, bf16 or f32, got {t.dtype}")
    if len({t.dtype for t in ts}) > 1:
        raise MoeKernelError(f"{name}: float operands must share one dtype, got {[t.dtype for t in ts]}")


def check_offsets(name: str, offsets: torch.Tensor, first: int, groups: int) -> None:
    if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise MoeKernelError(f"{name}: group_offsets must be a 1-d int32/int64 tensor, got {offsets.dtype}")
    if first < 0 or first + groups + 1 > offsets.shape[0]:
        raise MoeKernelError(f"{name}: experts {first}..{first + groups} are not all in {offsets.shape[0]} offsets")


@triton.jit
def _find_tile(OFF, mt, R, first, G: tl.constexpr, G_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Group of m-tile `mt` among [zero rows before] + G experts + [zero rows after], and its row range.
    Returns (group: -1 for the zero groups else the expert index, row_lo, row_hi, valid)."""
    j = tl.arange(0, G_P2)  # bounds b[j] = 0, offsets[first..first+G], R; group j spans b[j] .. b[j+1]
    lo = tl.where(j == 0, 0, tl.load(OFF + first + j - 1, mask=(j >= 1) & (j <= G + 1), other=R)).to(tl.int32)
    hi = tl.load(OFF + first + j, mask=j <= G, other=R).to(tl.int32)
    tiles = tl.where(j <= G + 1, tl.cdiv(hi - lo, BLOCK_M), 0)
    ends = tl.cumsum(tiles, 0)
    g = tl.sum((ends <= mt).to(tl.int32), 0)
    sel = j == g
    row_lo = tl.sum(tl.where(sel, lo + (mt - (ends - tiles)) * BLOCK_M, 0), 0)
    row_hi = tl.sum(tl.where(sel, hi, 0), 0)
    expert = tl.where((g >= 1) & (g <= G), g - 1, -1)
    return expert, row_lo, row_hi, g <= G + 1


@triton.jit
def _load_k(ptr, k_ok, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    # one return at the end: the compiler keeps generating the statements after a constexpr-true `if ...: return`
    if EVEN_K:
        t = tl.load(ptr)
    elif K_AXIS == 0:
        t = tl.load(ptr, mask=k_ok[:, None], other=0.0)
    else:
        t = tl.load(ptr, mask=k_ok[None, :], other=0.0)
    return t


@triton.jit
def _gmm_kernel(
    X, XD, A_IDX, W, WD, OFF, OUT, R, N, first, N_W, F_UP,
    D: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
    TMA: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """TMA: A (unless gathered) and w tiles come through tensor descriptors XD [R, D] and WD [G*N_W, D], whose
    out-of-range rows and K tail read as zeros; otherwise through pointers with the K tail masked."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    mt, nt = pid // n_tiles, pid % n_tiles  # all n-tiles of an m-tile run together: A and the expert stay in L2
    expert, row_lo, row_hi, valid = _find_tile(OFF, mt, R, first, G, G_P2, BLOCK_M)
    if not valid:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptr = OUT + rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = (rows[:, None] < row_hi) & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if expert >= 0:
        ks = tl.arange(0, BLOCK_K)
        if GATHER:  # row r of the sorted operand is row A_IDX[r] of X (the permutation's gather, fused)
            a_rows = tl.load(A_IDX + rows, mask=rows < row_hi, other=0).to(tl.int64)
        else:
            a_rows = tl.minimum(rows, R - 1).to(tl.int64)
        a_ptr = X + a_rows[:, None] * D + ks[None, :]
        w_row = expert * N_W + nt * BLOCK_N
        b_ptr = W + (expert.to(tl.int64) * N_W + tl.minimum(cols, N - 1))[None, :] * D + ks[:, None]  # w[e]^T tile
        for k0 in range(0, D, BLOCK_K):
            k_ok = ks + k0 < D
            if TMA and not GATHER:
                a = XD.load([row_lo, k0])
            else:
                a = _load_k(a_ptr + k0, k_ok, 1, EVEN_K)
            if TMA:
                b = WD.load([w_row, k0]).T
            else:
                b = _load_k(b_ptr + k0, k_ok, 0, EVEN_K)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            if SWIGLU:
                if TMA:
                    u = WD.load([w_row + F_UP, k0]).T
                else:
                    u = _load_k(b_ptr + F_UP * D + k0, k_ok, 0, EVEN_K)
                acc_up = tl.dot(a, u, acc_up, input_precision=PREC)
        if SWIGLU:  # silu(gate) * up on the fp32 accumulators: the [R, 2F] gate_up never reaches memory
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=out_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # f32 operands: exact fp32 products, as the reference


def launch_gmm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    first_expert: int,
    *,
    n_out: int,
    rows: int,
    swiglu: bool,
    a_idx: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """out[rows, n_out] of the grouped GEMM (optionally SwiGLU over w's two halves, optionally gathering A's rows
    through a_idx). Operands are checked by the callers."""
    groups, _, d = w.shape
    x, w = x.contiguous(), w.contiguous()
    tma_ok = d * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    cfg = config or default_config(rows, offsets.shape[0] - 1, swiglu, tma_ok, x.element_size())
    out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    if rows == 0 or n_out == 0:
        return out
    xd = wd = None
    if cfg.tma:
        if not tma_ok:
            raise MoeKernelError(f"grouped GEMM: TMA tiles need 16-byte aligned rows and bases (D={d}, {x.dtype})")
        xd = None if a_idx is not None else TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        wd = TensorDescriptor.from_tensor(w.view(-1, d), [cfg.block_n, cfg.block_k])
    m_tiles = triton.cdiv(rows, cfg.block_m) + groups + 2
    grid = (m_tiles * triton.cdiv(n_out, cfg.block_n),)
    _gmm_kernel[grid](
        x, xd, x if a_idx is None else a_idx, w, wd, offsets, out, rows, n_out, first_expert, w.shape[1], n_out,
        D=d, G=groups, TMA=cfg.tma, G_P2=triton.next_power_of_2(groups + 2), GATHER=a_idx is not None, SWIGLU=swiglu,
        EVEN_K=d % cfg.block_k == 0, PREC=_dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _check_gmm(name: str, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, first: int) -> None:
    check_device(name, x, w, offsets)
    check_float(name, x, w)
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise MoeKernelError(f"{name}: needs x [R, D] and w [E, N, D], got {tuple(x.shape)}, {tuple(w.shape)}")
    check_offsets(name, offsets, first, w.shape[0])


@launcher("grouped_matmul")
def grouped_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    group_offsets: torch.Tensor,
    *,
    first_expert: int,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    _check_gmm("grouped_matmul", x, w, group_offsets, first_expert)
    rows, n = x.shape[0], w.shape[1]
    return launch_gmm(x, w, group_offsets, first_expert, n_out=n, rows=rows, swiglu=False, config=config)


@launcher("grouped_matmul+swiglu")
def grouped_matmul_swiglu(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    group_offsets: torch.Tensor,
    *,
    first_expert: int,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """act[R, F] = swiglu(gate_up[:, :F], gate_up[:, F:]) with gate_up = grouped_matmul(x, w_gate_up)."""
    _check_gmm("grouped_matmul+swiglu", x, w_gate_up, group_offsets, first_expert)
    if w_gate_up.shape[1] % 2:
        raise MoeKernelError(f"grouped_matmul+swiglu: w_gate_up needs an even 2F rows, got {w_gate_up.shape[1]}")
    f = w_gate_up.shape[1] // 2
    return launch_gmm(x, w_gate_up, group_offsets, first_expert, n_out=f, rows=x.shape[0], swiglu=True, config=config)


@triton.jit
def _wgrad_kernel(
    DY, X, OFF, OUT, N, D, first, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    e, nt, dt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo = tl.load(OFF + first + e).to(tl.int32)
    hi = tl.load(OFF + first + e + 1).to(tl.int32)
    ns = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    r0 = lo
    while r0 < hi:  # a group's row count is data: a while loop (the interpreter cannot range() over it)
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < hi
        dy = tl.load(DY + rs[None, :].to(tl.int64) * N + ns[:, None], mask=r_ok[None, :] & (ns[:, None] < N), other=0.0)
        x = tl.load(X + rs[:, None].to(tl.int64) * D + ds[None, :], mask=r_ok[:, None] & (ds[None, :] < D), other=0.0)
        acc = tl.dot(dy, x, acc, input_precision=PREC)
        r0 += BLOCK_R
    out_ptr = OUT + e.to(tl.int64) * N * D + ns[:, None] * D + ds[None, :]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=(ns[:, None] < N) & (ds[None, :] < D))


@launcher("grouped_matmul_wgrad")
def grouped_matmul_wgrad(
    dy: torch.Tensor, x: torch.Tensor, group_offsets: torch.Tensor, *, first_expert: int, num_experts: int
) -> torch.Tensor:
    """out[i] = dy[rows of group first_expert+i]^T @ x[those rows]: [num_experts, N, D]."""
    check_device("grouped_matmul_wgrad", dy, x, group_offsets)
    check_float("grouped_matmul_wgrad", dy, x)
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise MoeKernelError(
            f"grouped_matmul_wgrad: needs dy [R, N], x [R, D], got {tuple(dy.shape)}, {tuple(x.shape)}"
        )
    check_offsets("grouped_matmul_wgrad", group_offsets, first_expert, num_experts)
    n, d = dy.shape[1], x.shape[1]
    out = torch.empty(num_experts, n, d, device=x.device, dtype=x.dtype)
    bn, bd, br = 64, 64, 32
    grid = (num_experts, triton.cdiv(n, bn), triton.cdiv(d, bd))
    if out.numel():
        dy, x = dy.contiguous(), x.contiguous()
        _wgrad_kernel[grid](
            dy, x, group_offsets, out, n, d, first_expert, PREC=_dot_precision(x.dtype),
            BLOCK_N=bn, BLOCK_D=bd, BLOCK_R=br, num_warps=4, num_stages=3,
        )  # fmt: skip
    return out
