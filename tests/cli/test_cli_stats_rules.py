"""r1c.model_stats.compute: the counting rules behind `r1c stats`."""

from __future__ import annotations

import pytest
from cli_tiny_model import D, E, F, K, V, expected_counts, tiny_lm

from r1c.build import ModuleBuilder, tensor
from r1c.model_stats import StatsError, compute, layer_of


def test_tiny_counts_by_hand():
    total, activated, embed = expected_counts()
    s = compute(tiny_lm(), seq=16)
    assert (s.total_params, s.activated_params, s.embedding_params) == (total, activated, embed)
    layer = next(r for r in s.by_layer if r.layer == "model.layers.0")
    assert layer.params - layer.activated_params == 3 * E * F * D * (E - K) // E


def test_flops_scale_with_sequence():
    # everything but attention is linear in S; causal attention adds (S+1)/2 visible keys per query
    a, b = compute(tiny_lm(), seq=8), compute(tiny_lm(), seq=64)
    attn = {s.seq: next(r.flops for r in s.by_op if r.op == "attention") for s in (a, b)}
    assert attn[64] / 64 / (attn[8] / 8) == pytest.approx((64 + 1) / (8 + 1))
    assert (a.flops - attn[8]) / 8 == (b.flops - attn[64]) / 64


def test_long_sequence_is_fast():
    import time

    start = time.perf_counter()
    compute(tiny_lm(), seq=1 << 17)
    assert time.perf_counter() - start < 2.0


def test_tied_embedding_is_compute():
    mb = ModuleBuilder("tied")
    f = mb.function("forward", tokens=tensor("int32", ["B", "S"]))
    table = f.param("embed", tensor("f32", [V, D]), "normal(1.0)")
    f.ret(f.linear(f.embedding(table, f.args[0]), table))
    s = compute(mb.build(), seq=4)
    assert s.total_params == s.activated_params == s.activated_params_excl_embedding == V * D


def test_unknown_symbol_is_an_error():
    mb = ModuleBuilder("t")
    f = mb.function("forward", x=tensor("f32", ["N", D]))
    f.ret(f.silu(f.args[0]))
    with pytest.raises(StatsError, match="symbolic dims N"):
        compute(mb.build())


@pytest.mark.parametrize(
    "loc, layer",
    [
        ("model.layers.12.self_attn.q_proj", "model.layers.12"),
        ("lm_head", "lm_head"),
        (None, "(no loc)"),
        ("model.norm", "model.norm"),
    ],
)
def test_layer_of(loc, layer):
    assert layer_of(loc) == layer
