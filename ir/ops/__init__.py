"""Importing this package registers every op (one module per family)."""

from r1c.ir.ops import (  # noqa: F401
    attention,
    attention_tiled,
    backward,
    cache,
    dsa,
    elementwise,
    linalg,
    moe,
    moe_fused,
    nn,
    optim,
    paged,
    quant,
    reduce,
    shape,
    structure,
)
