"""The GEMM template of `linear` (x @ w^T) and `matmul` (batched a @ b), with a generated epilogue.

The epilogue is the group of elementwise ops that consume only the product (a residual add, an activation, a scale):
they run on the float32 accumulator tile before the single store, so their intermediate tensors never reach memory.
Epilogue operands are strided [M, N] views (a residual, a bias row broadcast with stride 0, ...). float32 products use
exact fp32 dots (`input_precision="ieee"`); f16/bf16 ones use the tensor cores with float32 accumulation.
"""

from __future__ import annotations

from typing import Any

from r1c.backends.cuda.codegen.elementwise import const_expr, emit_ops, header, kind, named
from r1c.ir.core import Op, Value


def source(
    uses: list[str], root: Op, epilogue: list[Op], inputs: list[Value], consts: list[Value], outputs: list[Value]
) -> str:
    """`inputs`: the epilogue's loaded operands; `outputs`: the values stored (the product only if it escapes)."""
    params = ["A", "B", "AD", "BD"] + [f"E{j}" for j in range(len(inputs))] + [f"O{j}" for j in range(len(outputs))]
    params += [f"C{j}" for j in range(len(consts))] + ["M", "N", "sab", "sam", "sak", "sbb", "sbk", "sbn"]
    params += [f"se{j}_b, se{j}_m, se{j}_n" for j in range(len(inputs))]
    params += [f"so{j}_b, so{j}_m, so{j}_n" for j in range(len(outputs))]
    body = [
        "    pid = tl.program_id(0)",
        "    bat = tl.program_id(1).to(tl.int64)",
        "    num_m = tl.cdiv(M, BM)",
        "    num_n = tl.cdiv(N, BN)",
        "    # grouped order: GROUP row-blocks share the same column blocks of B while they are in L2",
        "    first_m = (pid // (GROUP * num_n)) * GROUP",
        "    rows = tl.minimum(num_m - first_m, GROUP)",
        "    pid_m = first_m + (pid % (GROUP * num_n)) % rows",
        "    pid_n = (pid % (GROUP * num_n)) // rows",
        "    rm = pid_m * BM + tl.arange(0, BM)",
        "    rn = pid_n * BN + tl.arange(0, BN)",
        "    rk = tl.arange(0, BK)",
        "    # 64-bit row and column offsets: M x N outputs (logits of a large prefill) pass 2^31 elements",
        "    rm64 = rm.to(tl.int64)",
        "    rn64 = rn.to(tl.int64)",
        "    a_ptr = A + bat * sab + rm64[:, None] * sam + rk[None, :] * sak",
        "    b_ptr = B + bat * sbb + rk[:, None] * sbk + rn64[None, :] * sbn",
        "    acc = tl.zeros((BM, BN), dtype=tl.float32)",
        "    for k0 in range(0, K, BK):",
        "        if TMA:  # descriptors zero-fill the M, N and K tails",
        "            a = AD.load([pid_m * BM, k0])",
        "            b = BD.load([pid_n * BN, k0]).T",
        "        else:",
        "            a = tl.load(a_ptr, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)",
        "            b = tl.load(b_ptr, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)",
        "        acc = tl.dot(a, b, acc, input_precision=PRECISION)",
        "        a_ptr += BK * sak",
        "        b_ptr += BK * sbk",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
    ]
    names: dict[Value, str] = {root.result: "acc"}
    for j, v in enumerate(inputs):
        ptr = f"E{j} + bat * se{j}_b + rm64[:, None] * se{j}_m + rn64[None, :] * se{j}_n"
        load = f"tl.load({ptr}, mask=mask, other=0)"
        k = kind(v.type.dtype)
        body.append(f"    e{j} = {load}.to(tl.float32)" if k == "f" else f"    e{j} = {load}.to(tl.int32)")
        names[v] = f"e{j}" if k != "b" else f"(e{j} != 0)"
    for j, v in enumerate(consts):
        names[v] = const_expr(f"C{j}", kind(v.type.dtype), "(BM, BN)")
    body += emit_ops(epilogue, names, rank=2)
    for j, v in enumerate(outputs):
        ptr = f"O{j} + bat * so{j}_b + rm64[:, None] * so{j}_m + rn64[None, :] * so{j}_n"
        body.append(f"    tl.store({ptr}, ({names[v]}).to(O{j}.dtype.element_ty), mask=mask)")
    title = f"GEMM ({root.name})" + (f" with epilogue {', '.join(o.name for o in epilogue)}" if epilogue else "")
    # K is a compile-time constant: it is a weight dimension (few distinct values), the k-loop bound is then static,
    # and Triton's interpreter cannot iterate range() over a run-time scalar.
    consts_sig = ", ".join(f"{c}: tl.constexpr" for c in ("K", "BM", "BN", "BK", "GROUP", "PRECISION", "TMA"))
    src = (
        header(title, uses)
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({', '.join(params)}, {consts_sig}):\n"
        + "\n".join(body)
        + "\n"
    )
    return named(src, "_".join(["gemm", root.name] + [o.name for o in epilogue]))


# Tiles of A and B through tensor descriptors (Hopper's copy engine) where the operands allow it, for the GEMMs
# where that pays (`config`); None: as `config` says, False/True: always off/on (benchmarks, tests).
USE_TMA: bool | None = None
# A GEMM of at least this many multiply-adds loads through descriptors: measured on the H200 (bench/gemm_cuda.py,
# bench/results/gemm_cuda.json), descriptors win 10-25% on the large V2-Lite GEMMs (lm_head, dense MLP) but lose on
# small ones, where their per-launch host cost (~0.06 ms) is larger than the kernel.
TMA_MIN_MACS = 1 << 35


def config(m: int, n: int, k: int, dtype: Any, interpret: bool) -> dict[str, Any]:
    """Tile sizes (and TMA) by shape: small tiles under the interpreter (CPU time); for the tensor cores, measured on
    the H200 for every V2-Lite linear (bench/gemm_cuda.py): 64x64x128 for decode-shaped M <= 64 (stream the
    weight), 128x128x64 with 8 warps otherwise, 128x256 for K >= 8192 (down projections) where descriptors are on."""
    import torch

    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpret:
        return dict(BM=16, BN=32, BK=16, GROUP=4, PRECISION=precision, num_warps=4, num_stages=1, TMA=False)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, GROUP=8, PRECISION=precision, num_warps=4, num_stages=3, TMA=False)
    tma = m * n * k >= TMA_MIN_MACS
    if m <= 64:
        return dict(BM=64, BN=64, BK=128, GROUP=8, PRECISION=precision, num_warps=4, num_stages=4, TMA=tma)
    bn = 256 if tma and k >= 8192 else 128
    return dict(BM=128, BN=bn, BK=64, GROUP=8, PRECISION=precision, num_warps=8, num_stages=3, TMA=tma)


def tma_operands(a: Any, b: Any) -> tuple[Any, Any] | None:
    """2-d views for descriptors: A [M, K] with unit K stride and B^T [N, K] (a linear's weight), both with 16-byte
    row strides and bases; None where they do not qualify (batched, strided K, misaligned)."""
    if a.shape[0] != 1 or b.shape[0] != 1 or a.stride(2) != 1 or b.stride(1) != 1:
        return None
    a2, bt2 = a[0], b[0].t()
    es = a.element_size()
    ok = all(t.stride(0) * es % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a2, bt2)) and a.shape[2] * es >= 16
    return (a2, bt2) if ok else None


def launch(
    module: Any,
    a: Any,
    b: Any,
    inputs: list[Any],
    consts: list[Any],
    outputs: list[Any],
    interpret: bool,
    cfg: dict[str, Any] | None = None,
    tma: bool | None = None,
) -> None:
    """a [Bt, M, K], b [Bt, K, N] (strided views, batch stride 0 where broadcast); inputs/outputs [Bt, M, N].
    cfg overrides `config`; tma overrides the load path (None: USE_TMA, else what `config` chose, where the operands
    allow it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bt, m, k = a.shape
    n = b.shape[2]
    if a.dtype != b.dtype:
        raise TypeError(f"cuda GEMM: operand dtypes differ ({a.dtype} vs {b.dtype})")
    cfg = dict(cfg or config(m, n, k, a.dtype, interpret))
    by_shape = cfg.pop("TMA", False)
    wanted = next(x for x in (tma, USE_TMA, by_shape) if x is not None)  # the first that is set decides
    views = tma_operands(a, b) if wanted else None
    if tma and views is None:
        raise ValueError("cuda GEMM: tma=True needs an unbatched A with unit K stride, B^T rows, 16-byte alignment")
    ad = TensorDescriptor.from_tensor(views[0], [cfg["BM"], cfg["BK"]]) if views else None
    bd = TensorDescriptor.from_tensor(views[1], [cfg["BN"], cfg["BK"]]) if views else None
    grid = (-(-m // cfg["BM"]) * -(-n // cfg["BN"]), bt)
    strides = (
        [*a.stride(), *b.stride()] + [s for t in inputs for s in t.stride()] + [s for t in outputs for s in t.stride()]
    )
    module.kernel[grid](a, b, ad, bd, *inputs, *outputs, *consts, m, n, *strides, K=k, TMA=views is not None, **cfg)
