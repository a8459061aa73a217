"""The expert-parallel layout: which parameters are routed experts' weights, and the module every expert-parallel
rank runs, in which they are declared as one row block.

Routed experts' weights are stacked [E, F, D] / [E, D, F] parameters read by `moe_experts` (stdlib
`routed_experts`). Over `ways` ranks, rank r holds rows r*E/ways .. (r+1)*E/ways - 1 of each. Declaring the block
shape [E/ways, ...] in the module (the same module on every rank; which block a rank holds is the runtime's
`ExpertDispatch` index) gives the gradients `moe_experts_grad` returns, the optimizer state and the update the
block's shape by construction; the ops' type rules hold, since they do not tie the expert count to the ids.
"""

from __future__ import annotations

import numpy as np

from r1c.distributed.program import DistributedError
from r1c.ir.core import Module, Value
from r1c.ir.types import TensorType
from r1c.ir.verifier import verify
from r1c.passes.rewrite import clone_module, replace_all_uses

MOE = "moe_experts"


def expert_params(module: Module, function: str, ways: int) -> list[str]:
    """The parameters `function`'s `moe_experts` ops read as expert weights (w_gate, w_up, w_down), checked to
    split into `ways` row blocks."""
    if function not in module.functions:
        raise DistributedError(f"@{module.name} has no function @{function}: it has {sorted(module.functions)}")
    f = module.functions[function]
    producers = f.producers()
    names: dict[str, None] = {}
    for op in f.body:
        if op.name != MOE:
            continue
        for v in op.operands[3:]:
            p = producers.get(v)
            if p is None or p.name != "param":
                # A weight computed in the function (a cast, an adapter) has no row block a rank could own.
                raise DistributedError(
                    f"expert parallelism needs {MOE} to read its expert weights as parameters; in @{function} "
                    f"%{v.name} is computed by {p.name if p else 'an argument'}"
                )
            names[p.attrs["name"]] = None
    if not names:
        raise DistributedError(
            f"--expert-parallel {ways}: @{module.name}'s @{function} has no routed experts (no {MOE} op)"
        )
    for n in names:
        if module.params[n].type.shape[0] % ways:
            raise DistributedError(
                f"--expert-parallel {ways} must divide the number of routed experts: @{n} holds "
                f"{module.params[n].type.shape[0]}"
            )
    return list(names)


def shard_module(module: Module, function: str, ways: int) -> tuple[Module, list[str]]:
    """A copy of `module` whose expert weights (those `function` reads) are declared as one block of rows of
    `ways`, and their names."""
    names = expert_params(module, function, ways)
    out = clone_module(module)
    for n in names:
        t = module.params[n].type
        out.params[n].type = TensorType(t.dtype, (t.shape[0] // ways, *t.shape[1:]))
    for f in out.functions.values():
        mapping: dict[Value, Value] = {}
        for op in f.body:
            if op.name == "param" and op.attrs["name"] in names:
                mapping[op.result] = Value(op.result.name, out.params[op.attrs["name"]].type)
                op.results = (mapping[op.result],)
        replace_all_uses(f, mapping)
    return verify(out), names


def take_blocks(
    state: dict[str, np.ndarray], module: Module, names: tuple[str, ...], index: int, ways: int
) -> dict[str, np.ndarray]:
    """`state` with each of `names` cut to row block `index`: the base model's weights and checkpoints hold every
    expert's rows; a tensor that already has the block's rows (optimizer state the sharded module declared) stays."""
    out = dict(state)
    for n in names:
        rows = module.params[n].type.shape[0]
        x = state[n]
        if x.shape[0] == rows * ways:
            out[n] = x[index * rows : (index + 1) * rows]
        elif x.shape[0] != rows:
            raise DistributedError(f"@{n} has {x.shape[0]} rows; expert block {index} of {ways} needs {rows * ways}")
    return out
