"""Index kernels, generated per rank and axis: `gather` (numpy take_along_axis: out[..i..] = x[.. idx[..i..] ..])
and `take` (numpy take: out[pre, j.., post] = x[pre, idx[j..], post]).

The output is walked flat like an elementwise kernel; the indexed axis' coordinate of x is the loaded index.
"""

from __future__ import annotations

import math
from typing import Any

from r1c.backends.cuda.codegen.elementwise import BLOCK, header, named, offset, unravel


def gather_source(rank: int, axis: int, uses: list[str]) -> str:
    params = ["X", "I", "O", "N"] + [f"D{d}" for d in range(rank)]
    params += [f"SX{d}" for d in range(rank)] + [f"SI{d}" for d in range(rank)]
    src_off = " + ".join(f"i{d} * SX{d}" if d != axis else f"j * SX{d}" for d in range(rank))
    body = [
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < N",
        *unravel(rank),
        f"    j = tl.load(I + {offset('SI', rank)}, mask=mask, other=0).to(tl.int64)",
        f"    tl.store(O + offs, tl.load(X + {src_off}, mask=mask), mask=mask)",
    ]
    return named(
        header(f"gather along axis {axis} (rank {rank})", uses)
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({', '.join(params)}, BLOCK: tl.constexpr):\n"
        + "\n".join(body)
        + "\n",
        f"gather_r{rank}_axis{axis}",
    )


def take_source(x_rank: int, idx_rank: int, axis: int, uses: list[str]) -> str:
    rank = x_rank - 1 + idx_rank  # output rank
    params = ["X", "I", "O", "N"] + [f"D{d}" for d in range(rank)]
    params += [f"SX{d}" for d in range(x_rank)] + [f"SI{d}" for d in range(idx_rank)]
    # `0 * offs` keeps a scalar index's address a block (a block mask needs a block pointer)
    idx_off = " + ".join(f"i{axis + d} * SI{d}" for d in range(idx_rank)) or "0 * offs"
    x_coord = [f"i{d}" for d in range(axis)] + ["j"] + [f"i{d + idx_rank - 1}" for d in range(axis + 1, x_rank)]
    body = [
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < N",
        *unravel(rank),
        f"    j = tl.load(I + {idx_off}, mask=mask, other=0).to(tl.int64)",
        f"    tl.store(O + offs, tl.load(X + {' + '.join(f'{c} * SX{d}' for d, c in enumerate(x_coord))}, mask=mask), "
        "mask=mask)",
    ]
    return named(
        header(f"take along axis {axis} (x rank {x_rank}, index rank {idx_rank})", uses)
        + "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        + f"def kernel({', '.join(params)}, BLOCK: tl.constexpr):\n"
        + "\n".join(body)
        + "\n",
        f"take_r{x_rank}_i{idx_rank}_axis{axis}",
    )


def gather(module: Any, x: Any, idx: Any, out: Any) -> None:
    n = math.prod(out.shape)
    if n:
        grid = (-(-n // BLOCK),)
        module.kernel[grid](x, idx, out, n, *out.shape, *x.stride(), *idx.stride(), BLOCK=BLOCK)


def take(module: Any, x: Any, idx: Any, out: Any) -> None:
    n = math.prod(out.shape)
    if n:
        shape = tuple(out.shape) or (1,)
        grid = (-(-n // BLOCK),)
        module.kernel[grid](x, idx, out, n, *shape, *x.stride(), *idx.stride(), BLOCK=BLOCK)
