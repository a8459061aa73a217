"""moe-aux-loss: add DeepSeek's expert balance loss to a training loss function.

For every MoE layer (a `moe_experts` op) of the loss function, with E routed experts, K slots per token and the
router's affinity scores s [T, E] (found as the `gather(scores, ids)` that produced the routing weights):

    s'_t = s_t / sum_j s_tj                       (affinities normalized per token)
    f_i  = E / (K * S) * #{t : i in ids_t}        (load: 1 for every expert when perfectly balanced)
    P_i  = 1/S * sum_t s'_ti                      (mean normalized affinity)
    L    = sum_i f_i * P_i

over the S tokens of each sequence and averaged over the B sequences — DeepSeek-V3's complementary
sequence-wise balance loss (report eqs. 17-20); `per_sequence=false` takes the whole batch as one sequence,
which is DeepSeek-V2's expert-level balance loss. The function then returns `loss + alpha * sum over layers L`.
f is a count (no gradient), so the gradient reaches the router weights through P only, as in both reports.
B and S are the first two dims of the function's first argument (the tokens [B, S]).
"""

from __future__ import annotations

from r1c.build import FunctionBuilder, ModuleBuilder
from r1c.ir.core import DimList, Function, Module, Op, Value
from r1c.ir.dims import mul
from r1c.passes.registry import PipelineError, register_pass


class AuxLossError(PipelineError):
    pass


def router_scores(f: Function, moe: Op) -> Value:
    """The affinities the routing weights of `moe` were gathered from (through scaling / normalizing ops)."""
    producers = {r: op for op in f.body for r in op.results}
    ids, weights = moe.operands[1], moe.operands[2]
    frontier, seen = [weights], set()
    while frontier:
        v = frontier.pop()
        op = producers.get(v)
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if op.name == "gather" and op.operands[1] is ids:
            return op.operands[0]
        frontier += [o for o in op.operands if o.type.dtype.is_float]
    raise AuxLossError(
        f"moe-aux-loss: cannot find the router scores of moe_experts at loc({moe.loc}): its weights do not come "
        "from gather(scores, ids) of its expert ids"
    )


def _layer_loss(fb: FunctionBuilder, scores: Value, ids: Value, batch: tuple) -> Value:
    e, k = scores.type.shape[1], ids.type.shape[1]
    per_seq = DimList((*batch, e))
    normalized = fb.div(scores, fb.reduce_sum(scores, axes=(-1,), keepdims=True))
    mean_affinity = fb.reduce_mean(fb.reshape(normalized, shape=per_seq), axes=(1,))  # P [B, E]
    chosen = fb.reduce_sum(fb.one_hot(ids, depth=e, dtype=scores.type.dtype), axes=(1,))  # [T, E]: 1 where routed
    # f = E / (K S) * count = E / K * (mean over the sequence of `chosen`): no need to know S as a number.
    load = fb.mul(fb.reduce_mean(fb.reshape(chosen, shape=per_seq), axes=(1,)), _scalar(fb, e / k, scores))
    return fb.reduce_mean(fb.reduce_sum(fb.mul(load, mean_affinity), axes=(1,)), axes=(0,))


def _scalar(fb: FunctionBuilder, value: float, like: Value) -> Value:
    return fb.constant(value=float(value), dtype=like.type.dtype)


@register_pass(
    "moe-aux-loss",
    "Add DeepSeek's expert balance loss (alpha * sum_i f_i P_i per MoE layer; per sequence as in V3, or over the "
    "batch as in V2) to a loss function's result.",
)
def moe_aux_loss(module: Module, *, alpha: float = 1e-4, function: str = "loss", per_sequence: bool = True) -> Module:
    if alpha <= 0:
        raise AuxLossError(f"moe-aux-loss: alpha must be > 0, got {alpha}")
    if function not in module.functions:
        raise AuxLossError(f"moe-aux-loss: module @{module.name} has no function @{function}")
    f = module.functions[function]
    if len(f.results) != 1 or f.results[0].type.rank != 0:
        raise AuxLossError(f"moe-aux-loss: @{function} must return one scalar loss")
    layers = [op for op in f.body if op.name == "moe_experts"]
    if not layers:
        raise AuxLossError(f"moe-aux-loss: @{function} has no MoE layer (moe_experts op; run it before expert-fusion)")
    if not f.args or f.args[0].type.rank < 2:
        raise AuxLossError(f"moe-aux-loss: the first argument of @{function} must be the tokens [B, S]")
    b, s = f.args[0].type.shape[:2]
    mb = ModuleBuilder(module.name)
    mb.module = module
    fb = FunctionBuilder.appending_to(mb, f)
    total = None
    for moe in layers:
        scores, ids = router_scores(f, moe), moe.operands[1]
        if mul(b, s) != scores.type.shape[0]:
            raise AuxLossError(
                f"moe-aux-loss: the router at loc({moe.loc}) scores {scores.type.shape[0]} tokens, not B*S"
            )
        with fb.scope(f"{moe.loc or 'moe'}.aux_loss"):
            term = _layer_loss(fb, scores, ids, (b, s) if per_sequence else (1, mul(b, s)))
        total = term if total is None else fb.add(total, term)
    weighted = fb.mul(total, _scalar(fb, alpha, total))
    fb.ret(fb.add(f.results[0], weighted))
    return module
