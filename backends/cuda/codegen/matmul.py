"""The GEMM template of `linear` (x @ w^T) and `matmul` (batched a @ b), with a generated epilogue.

The epilogue is the group of elementwise ops that consume only the product (a residual add, an activation, a scale):
they run on the float32 accumulator tile before the single store, so their intermediate tensors never reach memory.
Epilogue operands are strided [M, N] views (a residual, a bias row broadcast with stride 0, ...). float32 products use
exact fp32 dots (`input_precision="ieee"`); f16/bf16 ones use the tensor cores with float32 accumulation.
"""

from __future__ import annotations

from typing import Any

from r1c.backends.cuda.codegen.elementwise import const_expr, emit_ops, header, kind
from r1c.ir.core import Op, Value


def source(
    uses: list[str], root: Op, epilogue: list[Op], inputs: list[Value], consts: list[Value], outputs: list[Value]
) -> str:
    """`inputs`: the epilogue's loaded operands; `outputs`: the values stored (the product only if it escapes)."""
    params = ["A", "B"] + [f"E{j}" for j in range(len(inputs))] + [f"O{j}" for j in range(len(outputs))]
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
        "    a_ptr = A + bat * sab + rm[:, None] * sam + rk[None, :] * sak",
        "    b_ptr = B + bat * sbb + rk[:, None] * sbk + rn[None, :] * sbn",
        "    acc = tl.zeros((BM, BN), dtype=tl.float32)",
        "    for k0 in range(0, K, BK):",
        "        a = tl.load(a_ptr, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)",
        "        b = tl.load(b_ptr, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)",
        "        acc = tl.dot(a, b, acc, input_precision=PRECISION)",
        "        a_ptr += BK * sak",
        "        b_ptr += BK * sbk",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
    ]
    names: dict[Value, str] = {root.result: "acc"}
    for j, v in enumerate(inputs):
        ptr = f"E{j} + bat * se{j}_b + rm[:, None] * se{j}_m + rn[None, :] * se{j}_n"
        load = f"tl.load({ptr}, mask=mask, other=0)"
        k = kind(v.type.dtype)
        body.append(f"    e{j} = {load}.to(tl.float32)" if k == "f" else f"    e{j} = {load}.to(tl.int32)")
        names[v] = f"e{j}" if k != "b" else f"(e{j} != 0)"
    for j, v in enumerate(consts):
        names[v] = const_expr(f"C{j}", kind(v.type.dtype), "(BM, BN)")
    body += emit_ops(epilogue, names, rank=2)
    for j, v in enumerate(outputs):
        ptr = f"O{j} + bat * so{j}_b + rm[:, None] * so{j}_m + rn[None, :] * so{j}_n"
        body.append(f"    tl.store({ptr}, ({names[v]}).to(O{j}.dtype.element_ty), mask=mask)")
    title = f"GEMM ({root.name})" + (f" with epilogue {', '.join(o.name for o in epilogue)}" if epilogue else "")
    # K is a compile-time constant: it is a weight dimension (few distinct values), the k-loop bound is then static,
    # and Triton's interpreter cannot iterate range() over a run-time scalar.
    consts_sig = ", ".join(f"{c}: tl.constexpr" for c in ("K", "BM", "BN", "BK", "GROUP", "PRECISION"))
    return (
        header(title, uses)
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({', '.join(params)}, {consts_sig}):\n"
        + "\n".join(body)
        + "\n"
    )


def config(m: int, n: int, k: int, dtype: Any, interpret: bool) -> dict[str, Any]:
    """Tile sizes: small tiles under the interpreter (CPU time), larger ones for the tensor cores on the GPU."""
    import torch

    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpret:
        return dict(BM=16, BN=32, BK=16, GROUP=4, PRECISION=precision, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, GROUP=8, PRECISION=precision, num_warps=4, num_stages=3)
    if m <= 64:  # decode-shaped: few rows, stream the weight
        return dict(BM=64, BN=64, BK=128, GROUP=8, PRECISION=precision, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, BK=64, GROUP=8, PRECISION=precision, num_warps=8, num_stages=3)


def launch(
    module: Any, a: Any, b: Any, inputs: list[Any], consts: list[Any], outputs: list[Any], interpret: bool
) -> None:
    """a [Bt, M, K], b [Bt, K, N] (strided views, batch stride 0 where broadcast); inputs/outputs [Bt, M, N]."""
    bt, m, k = a.shape
    n = b.shape[2]
    if a.dtype != b.dtype:
        raise TypeError(f"cuda GEMM: operand dtypes differ ({a.dtype} vs {b.dtype})")
    cfg = config(m, n, k, a.dtype, interpret)
    grid = (-(-m // cfg["BM"]) * -(-n // cfg["BN"]), bt)
    strides = (
        [*a.stride(), *b.stride()] + [s for t in inputs for s in t.stride()] + [s for t in outputs for s in t.stride()]
    )
    module.kernel[grid](a, b, *inputs, *outputs, *consts, m, n, *strides, K=k, **cfg)
