"""Symbolic dimensions: canonical form, products, exact division, unification, evaluation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.ir import dims
from r1c.ir.dims import DimError

SYMS = ["B", "S", "H", "T_kv", "d2"]

# A dim as a (coefficient, symbol list) pair, spelled in a random order with the coefficient anywhere.
dim_parts = st.tuples(st.integers(1, 12), st.lists(st.sampled_from(SYMS), max_size=3))


def spell(coeff: int, syms: list[str], data) -> str | int:
    if not syms:
        return coeff
    parts = list(syms) + ([str(coeff)] if coeff != 1 or data.draw(st.booleans()) else [])
    parts = data.draw(st.permutations(parts))
    return "*".join(parts)


envs = st.fixed_dictionaries({s: st.integers(1, 9) for s in SYMS})


def test_normalize_canonical_forms():
    assert dims.normalize("S*B") == "B*S"
    assert dims.normalize("2*B*3") == "B*6"
    assert dims.normalize("B*1") == "B"
    assert dims.normalize("6") == 6
    assert dims.normalize(" B * S ") == "B*S"
    assert dims.normalize("B*B") == "B*B"
    assert dims.normalize("0*B") == 0
    assert dims.normalize(7) == 7


@pytest.mark.parametrize("bad", [-1, True, "", "B+1", "2B", "B**2", "B*-1", "B*"])
def test_normalize_rejects(bad):
    with pytest.raises(DimError):
        dims.normalize(bad)


@settings(max_examples=100, deadline=None)
@given(p=dim_parts, env=envs, data=st.data())
def test_normalize_is_canonical_and_keeps_value(p, env, data):
    coeff, syms = p
    a, b = spell(coeff, syms, data), spell(coeff, syms, data)
    na = dims.normalize(a)
    assert na == dims.normalize(b)  # any spelling of the same product gives one canonical form
    assert dims.normalize(na) == na
    assert isinstance(na, int) or not na[0].isdigit()  # symbolic dims start with a letter in IR text
    value = coeff
    for s in syms:
        value *= env[s]
    assert dims.evaluate(a, env) == dims.evaluate(na, env) == value


@settings(max_examples=100, deadline=None)
@given(p=dim_parts, q=dim_parts, r=dim_parts, env=envs, data=st.data())
def test_mul_is_product(p, q, r, env, data):
    a, b, c = (spell(*x, data) for x in (p, q, r))
    ab = dims.mul(a, b)
    assert ab == dims.mul(b, a)
    assert dims.mul(ab, c) == dims.mul(a, dims.mul(b, c)) == dims.mul(a, b, c)
    assert dims.evaluate(ab, env) == dims.evaluate(a, env) * dims.evaluate(b, env)
    assert dims.mul(a, 1) == dims.normalize(a)
    assert dims.mul() == 1
    assert dims.mul(a, 0) == 0


@settings(max_examples=100, deadline=None)
@given(p=dim_parts, q=dim_parts, env=envs, data=st.data())
def test_div_inverts_mul(p, q, env, data):
    a, b = spell(*p, data), spell(*q, data)
    assert dims.div(dims.mul(a, b), b) == dims.normalize(a)
    assert dims.evaluate(dims.div(dims.mul(a, b), a), env) == dims.evaluate(b, env)


@pytest.mark.parametrize("a,b", [(6, 4), ("B", 2), ("B", "S"), ("B*S", "B*B"), ("B*4", 8), (5, 0)])
def test_div_not_exact(a, b):
    with pytest.raises(DimError, match="not divisible"):
        dims.div(a, b)


def test_div_examples():
    assert dims.div("B*S*64", "S*16") == "B*4"
    assert dims.div("B*S", "B*S") == 1
    assert dims.div(12, 4) == 3


def test_evaluate_unbound():
    with pytest.raises(DimError, match="'S'"):
        dims.evaluate("B*S", {"B": 2})


@settings(max_examples=100, deadline=None)
@given(p=dim_parts, env=envs, data=st.data())
def test_unify_binds_one_unknown(p, env, data):
    coeff, syms = p
    a = spell(coeff, syms, data)
    actual = dims.evaluate(a, env)
    # Bind all but (at most) one distinct symbol that appears exactly once; unify must recover it.
    once = [s for s in set(syms) if syms.count(s) == 1]
    free = data.draw(st.sampled_from(once)) if once else None
    partial = {s: v for s, v in env.items() if s != free}
    assert dims.unify(a, actual, partial)
    if free is not None:
        assert partial[free] == env[free]
    assert dims.evaluate(a, partial) == actual
    # One more than the true size never unifies with everything bound.
    assert not dims.unify(a, actual + 1, dict(env))


def test_unify_cases():
    env: dict[str, int] = {}
    assert dims.unify("B", 4, env) and env == {"B": 4}
    assert dims.unify("B*S", 12, env) and env == {"B": 4, "S": 3}
    assert not dims.unify("B*T", 10, env)  # 10 is not a multiple of B=4
    assert "T" not in env
    assert not dims.unify("X*Y", 6, {})  # two unknowns: ambiguous, refuse
    assert not dims.unify("X*X", 9, {})  # a square root is not a product rule
    assert dims.unify(5, 5, {}) and not dims.unify(5, 6, {})
    assert dims.unify("S*2", 6, env) and not dims.unify("S*2", 8, env)  # S is already 3
    k: dict[str, int] = {}
    assert not dims.unify("K*2", 7, k) and k == {}  # odd size: no integer K


def test_symbols_and_static():
    assert dims.symbols("B*S*2") == {"B", "S"}
    assert dims.symbols(4) == set()
    assert dims.is_static(4) and not dims.is_static("B")


@pytest.mark.parametrize(
    "d, block, expect, env, value",
    [
        (130, 64, 3, {}, 3),
        ("S*128", 64, "S*2", {"S": 3}, 6),
        ("S", 64, "S_cdiv64", {"S": 65}, 2),
        ("B*S", 64, "B__S_cdiv64", {"B": 3, "S": 50}, 3),
        ("S*3", 64, "S__3_cdiv64", {"S": 50}, 3),
    ],
)
def test_ceil_div_is_evaluated_from_its_symbols(d, block, expect, env, value):
    got = dims.ceil_div(d, block)
    assert got == expect
    assert dims.evaluate(got, env) == value


def test_ceil_div_of_an_unbound_symbol_names_it():
    with pytest.raises(dims.DimError, match="'S'"):
        dims.evaluate("S_cdiv64", {"B": 1})
