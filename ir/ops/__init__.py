"""Importing this package registers every op (one module per family)."""

from r1c.ir.ops import attention, elementwise, linalg, moe, nn, reduce, shape, structure  # noqa: F401
