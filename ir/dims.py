"""Symbolic dimensions.

A dimension is an ``int`` or a ``str``. A string is a product of symbols with an optional integer
coefficient in canonical form ("B", "B*S", "S*2"). Products and exact divisions are all that model
shapes need (reshape of [B, S, H*D] to [B*S, H, D]); anything else is an error, not a guess.
"""

from __future__ import annotations

import re
from collections import Counter

Dim = int | str

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DimError(ValueError):
    pass


def _factor(d: Dim) -> tuple[int, Counter]:
    if isinstance(d, int):
        return d, Counter()
    coeff, syms = 1, Counter()
    for part in d.split("*"):
        part = part.strip()
        if part.isdigit():
            coeff *= int(part)
        elif _SYMBOL.fullmatch(part):
            syms[part] += 1
        else:
            raise DimError(f"bad symbolic dimension {d!r}: expected a product of symbols and integers")
    return coeff, syms


def _build(coeff: int, syms: Counter) -> Dim:
    names = sorted(s for s, n in syms.items() for _ in range(n))
    if not names:
        return coeff
    if coeff == 0:
        return 0
    # The coefficient goes last ("S*2") so a symbolic dim always starts with a letter in IR text.
    return "*".join(names + ([str(coeff)] if coeff != 1 else []))


def normalize(d: Dim) -> Dim:
    if isinstance(d, bool):
        raise DimError(f"bad dimension {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise DimError(f"negative dimension {d}")
        return d
    return _build(*_factor(d))


def mul(*dims: Dim) -> Dim:
    coeff, syms = 1, Counter()
    for d in dims:
        c, s = _factor(d)
        coeff *= c
        syms.update(s)
    return _build(coeff, syms)


def div(a: Dim, b: Dim) -> Dim:
    """Exact division; raises DimError when b does not divide a."""
    ca, sa = _factor(a)
    cb, sb = _factor(b)
    if cb == 0 or ca % cb != 0 or any(sa[s] < n for s, n in sb.items()):
        raise DimError(f"dimension {a} is not divisible by {b}")
    return _build(ca // cb, sa - sb)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def symbols(d: Dim) -> set[str]:
    return set(_factor(d)[1]) if isinstance(d, str) else set()


_CEIL_DIV = re.compile(r"(?P<base>[A-Za-z0-9_]+?)_cdiv(?P<block>[0-9]+)")


def ceil_div(d: Dim, block: int) -> Dim:
    """ceil(d / block). A symbolic d gives its exact quotient when `block` divides it (S*128 / 64 = S*2), else
    the derived symbol `S_cdiv64` (`B__S_cdiv64` for B*S): a function of the symbols in its name, so
    `evaluate` computes it from them and two types of the same sequence agree."""
    if isinstance(d, int):
        return -(-d // block)
    try:
        return div(d, block)
    except DimError:
        return f"{d.replace('*', '__')}_cdiv{block}"


def _symbol_value(s: str, env: dict[str, int]) -> int:
    if s in env:
        return env[s]
    derived = _CEIL_DIV.fullmatch(s)
    if derived:
        base = 1
        for part in derived["base"].split("__"):
            base *= int(part) if part.isdigit() else _symbol_value(part, env)
        return -(-base // int(derived["block"]))
    raise DimError(f"no value bound for symbolic dimension {s!r}")


def evaluate(d: Dim, env: dict[str, int]) -> int:
    coeff, syms = _factor(d)
    for s, n in syms.items():
        coeff *= _symbol_value(s, env) ** n
    return coeff


def unify(pattern: Dim, actual: int, env: dict[str, int]) -> bool:
    """Bind single symbols in `pattern` against a concrete size; False on mismatch."""
    if isinstance(pattern, int):
        return pattern == actual
    coeff, syms = _factor(pattern)
    unbound = [s for s in syms if s not in env]
    if not unbound:
        return evaluate(pattern, env) == actual
    if len(unbound) == 1 and syms[unbound[0]] == 1:
        known = coeff
        for s, n in syms.items():
            if s != unbound[0]:
                known *= env[s] ** n
        if known == 0 or actual % known:
            return False
        env[unbound[0]] = actual // known
        return True
    return False
