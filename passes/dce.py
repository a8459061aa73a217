"""Dead-code elimination: drop pure ops whose results are neither used nor returned."""

from __future__ import annotations

from r1c.ir.core import Module
from r1c.passes.registry import register_pass
from r1c.passes.rewrite import erase_dead


@register_pass("dce", "Remove ops whose results are unused (returned values and impure ops stay).")
def dce(module: Module) -> Module:
    for f in module.functions.values():
        erase_dead(f)
    return module
