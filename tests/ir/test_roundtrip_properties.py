"""Property tests: printing and parsing IR are inverse, and printing is stable."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from strategies import modules

from r1c.ir import parse_module, print_module, verify

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(modules())
def test_parse_print_roundtrip(m) -> None:
    text = print_module(m)
    parsed = parse_module(text)
    assert parsed == m
    assert print_module(parsed) == text
    verify(parsed)


@SETTINGS
@given(modules())
def test_printing_is_deterministic(m) -> None:
    assert print_module(m) == print_module(m)
    assert str(m) == print_module(m)
