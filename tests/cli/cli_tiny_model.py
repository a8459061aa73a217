"""A tiny MoE language model built with r1c.build: embedding, causal attention, routed experts, lm_head.

Sizes are chosen so the parameter counts are easy to check by hand (see `expected_counts`).
"""

from __future__ import annotations

from r1c import build
from r1c.ir.core import DimList, Module

V, D, H, E, K, F, LAYERS = 50, 16, 2, 4, 2, 8, 2


def tiny_lm(layers: int = LAYERS) -> Module:
    mb = build.ModuleBuilder("tiny_lm", attrs={"vocab_size": V, "hidden_size": D, "num_layers": layers})
    f = mb.function("forward", tokens=build.tensor("int32", ["B", "S"]))
    with f.scope("model.embed_tokens"):
        x = f.embedding(f.param("model.embed_tokens.weight", build.tensor("f32", [V, D]), "normal(0.5)"), f.args[0])
    for i in range(layers):
        p = f"model.layers.{i}"
        with f.scope(p), f.scope("self_attn"):
            qkv = []
            for name in ("q", "k", "v"):
                w = f.param(f"{p}.self_attn.{name}_proj.weight", build.tensor("f32", [D, D]), "normal(0.3)")
                t = f.reshape(f.linear(x, w), shape=DimList(["B", "S", H, D // H]))
                qkv.append(f.transpose(t, perm=[0, 2, 1, 3]))
            a = f.attention(*qkv, scale=(D // H) ** -0.5, causal=True)
            a = f.reshape(f.transpose(a, perm=[0, 2, 1, 3]), shape=DimList(["B", "S", D]))
            x = f.add(
                x, f.linear(a, f.param(f"{p}.self_attn.o_proj.weight", build.tensor("f32", [D, D]), "normal(0.3)"))
            )
        with f.scope(p), f.scope("mlp"):
            h = f.rmsnorm(x, f.param(f"{p}.post_attention_layernorm.weight", build.tensor("f32", [D]), "ones"))
            h2 = f.reshape(h, shape=DimList(["B*S", D]))
            gate = f.param(f"{p}.mlp.gate.weight", build.tensor("f32", [E, D]), "normal(0.3)")
            vals, ids = f.topk(f.softmax(f.linear(h2, gate)), k=K)
            experts = [
                f.param(f"{p}.mlp.experts.{n}", build.tensor("f32", s), "normal(0.3)")
                for n, s in (("gate_proj", [E, F, D]), ("up_proj", [E, F, D]), ("down_proj", [E, D, F]))
            ]
            y = f.moe_experts(h2, ids, vals, *experts)
            x = f.add(x, f.reshape(y, shape=DimList(["B", "S", D])))
    with f.scope("lm_head"):
        f.ret(f.linear(x, f.param("lm_head.weight", build.tensor("f32", [V, D]), "normal(0.3)")))
    return mb.build()


def expected_counts(layers: int = LAYERS) -> tuple[int, int, int]:
    """(total, activated incl. embedding, embedding) parameters, by hand."""
    embed, head = V * D, V * D
    attn = 4 * D * D
    norm, gate = D, E * D
    experts = 3 * E * F * D
    total = embed + head + layers * (attn + norm + gate + experts)
    activated = embed + head + layers * (attn + norm + gate + experts * K // E)
    return total, activated, embed
