"""`scatter_add` (the transpose of gather) and `index_add` (the transpose of take and embedding). Deterministic: no
float atomics, so a training step gives the same bits on every run.

scatter_add: base, indices and updates are viewed as [P, N, Q] and [P, K, Q] (P = the axes before `axis`, Q = those
  after). One program per (p, block of n, block of q) compares the K indices of its columns with its n block and sums
  the matching updates: no write conflicts, cost P*N*K*Q compares. Meant for gather/topk transposes, where K (the
  gathered count, e.g. experts per token) is small.
index_add: base [P, N, Q], indices of any rank flattened to J, updates [P, J, Q]. The entries are grouped by target
  row first (a counting sort, all integer work), then each output row sums its own entries in a fixed order:
    1. _rank_kernel, one program per chunk of the indices: walking its chunk a block at a time, the rank of each
       entry among earlier equal ones of the chunk (in-block compares plus a running count row [N] kept in global
       memory), so the chunk's count row ends as its per-row entry counts;
    2. _chunk_prefix_kernel: per row, the entries in earlier chunks and the total; _offsets_kernel, one program:
       the exclusive prefix sum of the totals (each row's start in the grouped list);
    3. _place_kernel: entry j goes to slot start[v] + (v's entries in earlier chunks) + rank[j], v = idx[j]: a
       permutation (slots are unique) that lists each row's entries in index order;
    4. _gather_rows_kernel: one program per (output row, block of the P*Q columns) adds its row's entries, a chunk
       at a time. The embedding gradient ([V, D] table, ids [B, S]) is the case this is sized for.
Out-of-range indices (the references raise): a kernel cannot raise, so they are skipped (never written out of
bounds) and caught by tl.device_assert when Triton's debug mode is on (TRITON_DEBUG=1).
Loop bounds that the interpreter must iterate are compile-time constants (Triton's interpreter cannot iterate
range() over a run-time scalar); a row's entry loop is a `while`, which it can run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.backends.cuda.launchers import launcher

RANK_BLOCK = 128  # indices per step of a rank program ([BJ, BJ] compares a step)
RANK_CHUNK = 2048  # indices per rank program at least (each walks its chunk serially)
MAX_CHUNKS = 64  # rank programs at most (each has a count row of N ints)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _split(shape: tuple[int, ...], ax: int) -> tuple[int, int]:
    """(product of the axes before `ax`, product of those after)."""
    p = q = 1
    for d in shape[:ax]:
        p *= d
    for d in shape[ax + 1 :]:
        q *= d
    return p, q


def _check_contiguous(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()}")


@triton.jit
def _scatter_add_kernel(
    BASE, IDX, UPD, OUT, P, N, K, Q,
    NB: tl.constexpr, QB: tl.constexpr, KC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    p = pid // (NB * QB)
    n = (pid // QB) % NB * BN + tl.arange(0, BN)
    q = pid % QB * BQ + tl.arange(0, BQ)
    nm, qm = n < N, q < Q
    out_off = (p * N + n[:, None]) * Q + q[None, :]
    m2 = nm[:, None] & qm[None, :]
    acc = tl.load(BASE + out_off, mask=m2, other=0.0).to(tl.float32)
    kk = tl.arange(0, BK)
    for k0 in range(0, KC, BK):
        k = k0 + kk
        km = (k < K)[:, None] & qm[None, :]
        in_off = (p * K + k[:, None]) * Q + q[None, :]
        i = tl.load(IDX + in_off, mask=km, other=0).to(tl.int64)
        tl.device_assert((i >= 0) & (i < N), "scatter_add: index out of range")
        u = tl.load(UPD + in_off, mask=km, other=0.0).to(tl.float32)
        hit = (i[None, :, :] == n[:, None, None]) & km[None, :, :]  # [BN, BK, BQ]
        acc += tl.sum(tl.where(hit, u[None, :, :], 0.0), 1)
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=m2)


@launcher("scatter_add")
def scatter_add(base: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> torch.Tensor:
    """base with updates added at base[..indices[..i..]..] along `axis`; out-of-range indices are skipped."""
    _check_contiguous("scatter_add", base=base, indices=indices, updates=updates)
    ax = axis % base.dim()
    out = torch.empty_like(base)
    if base.numel() == 0:
        return out
    p, q = _split(tuple(base.shape), ax)
    n, k = base.shape[ax], indices.shape[ax]
    bq = min(_p2(q), 64)
    bn = min(_p2(n), max(1, 1024 // bq))
    bk = min(_p2(k), max(1, 8192 // (bn * bq)))
    nb, qb = triton.cdiv(n, bn), triton.cdiv(q, bq)
    _scatter_add_kernel[(p * nb * qb,)](
        base, indices, updates, out, p, n, k, q, NB=nb, QB=qb, KC=k, BN=bn, BK=bk, BQ=bq
    )  # fmt: skip
    return out


@triton.jit
def _rank_kernel(IDX, RANK, COUNT, N, J, L: tl.constexpr, BJ: tl.constexpr):
    # Program c walks its chunk [c L, (c+1) L) of the indices in order: rank = entries of the same row in earlier
    # blocks of the chunk (its count row COUNT[c], raised after each block) + earlier entries of this block. Barriers
    # order the count row's loads and updates within the program; the next block's indices are loaded ahead, so
    # each step waits on one global round trip, not two.
    c = tl.program_id(0).to(tl.int64)
    cnt = COUNT + c * N
    r = tl.arange(0, BJ)
    lo = c * L
    v_next = tl.load(IDX + lo + r, mask=(r < L) & (lo + r < J), other=0).to(tl.int64)
    for j0 in range(0, L, BJ):
        jm = (j0 + r < L) & (lo + j0 + r < J)
        v = v_next
        nxt = j0 + BJ + r
        v_next = tl.load(IDX + lo + nxt, mask=(nxt < L) & (lo + nxt < J), other=0).to(tl.int64)
        ok = jm & (v >= 0) & (v < N)
        tl.device_assert(ok | ~jm, "index_add: index out of range")
        v = tl.where(ok, v, -1)
        same = (v[:, None] == v[None, :]) & (r[None, :] < r[:, None])
        seen = tl.load(cnt + v, mask=ok, other=0, volatile=True)
        rank = seen + tl.sum(same.to(tl.int32), 1)
        tl.store(RANK + lo + j0 + r, rank, mask=jm)
        tl.debug_barrier()
        tl.atomic_max(cnt + v, rank + 1, mask=ok)  # the row's count so far: the max over its entries
        tl.debug_barrier()


@triton.jit
def _chunk_prefix_kernel(COUNT, TOTAL, N, C: tl.constexpr, BN: tl.constexpr):
    # Per row: COUNT[c, n] becomes the entries of row n in chunks before c; TOTAL[n] the row's entry count.
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = n < N
    acc = tl.zeros((BN,), tl.int32)
    for c in range(C):
        x = tl.load(COUNT + c * N + n, mask=m, other=0)
        tl.store(COUNT + c * N + n, acc, mask=m)
        acc += x
    tl.store(TOTAL + n, acc, mask=m)


@triton.jit
def _offsets_kernel(TOTAL, START, N: tl.constexpr, BN: tl.constexpr):
    r = tl.arange(0, BN)
    carry = tl.full((), 0, tl.int32)
    for n0 in range(0, N, BN):
        m = n0 + r < N
        c = tl.load(TOTAL + n0 + r, mask=m, other=0)
        tl.store(START + n0 + r, carry + tl.cumsum(c, 0) - c, mask=m)
        carry += tl.sum(c, 0)


@triton.jit
def _place_kernel(IDX, RANK, START, COUNT, PERM, N, J, L, BJ: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BJ + tl.arange(0, BJ)
    jm = j < J
    v = tl.load(IDX + j, mask=jm, other=0).to(tl.int64)
    ok = jm & (v >= 0) & (v < N)
    before = tl.load(COUNT + (j // L) * N + v, mask=ok, other=0)  # the row's entries in earlier chunks
    slot = tl.load(START + v, mask=ok, other=0) + before + tl.load(RANK + j, mask=ok, other=0)
    tl.store(PERM + slot, j.to(tl.int32), mask=ok)


@triton.jit
def _gather_rows_kernel(
    BASE, UPD, PERM, START, COUNT, OUT, N, J, Q, PQ, CB: tl.constexpr, BC: tl.constexpr, BE: tl.constexpr
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n = pid // CB
    c = pid % CB * BC + tl.arange(0, BC)  # columns (p, q) of row n, flattened
    cm = c < PQ
    p, q = c // Q, c % Q
    out_off = (p * N + n) * Q + q
    acc = tl.load(BASE + out_off, mask=cm, other=0.0).to(tl.float32)
    s = tl.load(START + n)
    end = s + tl.load(COUNT + n)
    e = tl.arange(0, BE)
    while s < end:  # a chunk of BE entries at a time, in slot order (= index order): a fixed summation order
        em = s + e < end
        j = tl.load(PERM + s + e, mask=em, other=0).to(tl.int64)
        u = tl.load(UPD + (p[None, :] * J + j[:, None]) * Q + q[None, :], mask=em[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(u.to(tl.float32), 0)
        s += BE
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=cm)


@launcher("index_add")
def index_add(base: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> torch.Tensor:
    """base with the slices of updates added at base[.., indices[j..], ..] along `axis`; out-of-range indices are
    skipped."""
    _check_contiguous("index_add", base=base, indices=indices, updates=updates)
    ax = axis % base.dim()
    out = torch.empty_like(base)
    if base.numel() == 0:
        return out
    p, q = _split(tuple(base.shape), ax)
    n, j = base.shape[ax], indices.numel()
    dev = base.device
    total = (torch.empty if j else torch.zeros)(n, device=dev, dtype=torch.int32)
    start = (torch.empty if j else torch.zeros)(n, device=dev, dtype=torch.int32)
    perm = torch.empty(max(j, 1), device=dev, dtype=torch.int32)
    if j:
        # Chunks of RANK_CHUNK indices or more are ranked in parallel, one count row [N] each.
        chunks = max(1, min(MAX_CHUNKS, j // RANK_CHUNK))
        bj = min(_p2(j), RANK_BLOCK)
        per = triton.cdiv(triton.cdiv(j, chunks), bj) * bj
        chunks = triton.cdiv(j, per)
        count = torch.zeros((chunks, n), device=dev, dtype=torch.int32)
        rank = torch.empty(j, device=dev, dtype=torch.int32)
        # num_stages=1: no software pipelining of the count row's loads (they depend on the previous updates).
        _rank_kernel[(chunks,)](indices, rank, count, n, j, L=per, BJ=bj, num_stages=1)
        _chunk_prefix_kernel[(triton.cdiv(n, 1024),)](count, total, n, C=chunks, BN=1024)
        _offsets_kernel[(1,)](total, start, N=n, BN=min(_p2(n), 1024))
        bp = min(_p2(j), 1024)
        _place_kernel[(triton.cdiv(j, bp),)](indices, rank, start, count, perm, n, j, per, BJ=bp)
    bc = min(_p2(p * q), 1024)
    cb = triton.cdiv(p * q, bc)
    _gather_rows_kernel[(n * cb,)](base, updates, perm, start, total, out, n, j, q, p * q, CB=cb, BC=bc, BE=8)
    return out
