"""The exact partitioner against brute force, the cut-bytes difference array against a direct count, and the
GPipe/1F1B schedules: complete, dependency-respecting, ideal bubble on equal stages, 1F1B memory bound."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1c.frontends.dsl import load
from r1c.passes.pipeline_cost import H100, PartitionError, analyze, bind_env, value_bytes
from r1c.passes.pipeline_partitioner import MemoryCap, min_max_partition
from r1c.passes.pipeline_schedule import build_schedule, ideal_bubble, stage_orders

ROOT = Path(__file__).parents[2]
TIMES = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=8)


def _brute(times, send, stages, scale, grad_back, cap) -> float:
    n = len(times)
    prefix = np.concatenate([[0.0], np.cumsum(times)])
    best = np.inf
    for inner in itertools.combinations(range(1, n), stages - 1):
        cuts = [0, *inner, n]
        worst = 0.0
        for k in range(stages):
            i, j = cuts[k], cuts[k + 1]
            c = scale * (prefix[j] - prefix[i]) + send[j] + (send[i] if grad_back else 0.0)
            if cap is not None:
                mem = cap.param_prefix[j] - cap.param_prefix[i]
                mem += cap.in_flight(k) * (cap.act_prefix[j] - cap.act_prefix[i])
                if mem > cap.limit:
                    c = np.inf
            worst = max(worst, c)
        best = min(best, worst)
    return best


@settings(max_examples=200, deadline=None)
@given(times=TIMES, data=st.data())
def test_partition_is_exact(times, data) -> None:
    n = len(times)
    stages = data.draw(st.integers(1, n))
    send = np.array([0.0] + data.draw(st.lists(st.floats(0, 5), min_size=n - 1, max_size=n - 1)) + [0.0])
    scale = data.draw(st.sampled_from([1.0, 3.0]))
    grad_back = data.draw(st.booleans())
    cap = None
    if data.draw(st.booleans()):
        params = data.draw(st.lists(st.floats(0, 4), min_size=n, max_size=n))
        acts = data.draw(st.lists(st.floats(0, 2), min_size=n, max_size=n))
        cap = MemoryCap(
            data.draw(st.floats(1, 20)),
            np.concatenate([[0.0], np.cumsum(params)]),
            np.concatenate([[0.0], np.cumsum(acts)]),
            lambda k: stages - k,
        )
    want = _brute(np.array(times), send, stages, scale, grad_back, cap)
    if not np.isfinite(want):
        with pytest.raises(PartitionError, match="memory cap"):
            min_max_partition(np.array(times), send, stages, scale, grad_back, cap)
        return
    cuts, got = min_max_partition(np.array(times), send, stages, scale, grad_back, cap)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == stages + 1
    assert all(a < b for a, b in zip(cuts, cuts[1:]))  # every stage non-empty


def test_partition_needs_enough_units() -> None:
    with pytest.raises(PartitionError, match="cannot split 2 unit"):
        min_max_partition(np.ones(2), np.zeros(3), 3)


def test_cut_bytes_match_a_direct_count() -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 2})
    f = m.functions["loss"]
    env = bind_env(f, 2, 16)
    program = analyze(f, {n: p.type for n, p in m.params.items()}, env, H100, "op")
    fast = program.cut_bytes()
    for cut in range(1, len(program.units)):
        assert fast[cut] == sum(value_bytes(v, env) for v in program.crossing(cut))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["gpipe", "1f1b"]),
    stages=st.integers(1, 6),
    micro=st.integers(1, 9),
    training=st.booleans(),
    costs=st.lists(st.floats(0.1, 5.0), min_size=6, max_size=6),
)
def test_schedules_are_complete_and_respect_dependencies(name, stages, micro, training, costs) -> None:
    fwd = costs[:stages]
    bwd = [2 * c for c in fwd]
    sch = build_schedule(name, fwd, bwd, micro, training)
    kinds = ("F", "B") if training else ("F",)
    assert sorted((a.stage, a.micro_batch, a.kind) for a in sch.actions) == sorted(
        (k, m, kind) for k in range(stages) for m in range(micro) for kind in kinds
    )
    at = {(a.kind, a.stage, a.micro_batch): a for a in sch.actions}
    for a in sch.actions:
        dep = None
        if a.kind == "F" and a.stage > 0:
            dep = at[("F", a.stage - 1, a.micro_batch)]
        elif a.kind == "B":
            dep = at[("B", a.stage + 1, a.micro_batch)] if a.stage + 1 < stages else at[("F", a.stage, a.micro_batch)]
        if dep is not None:
            assert dep.end <= a.start + 1e-12 and dep.slot < a.slot
    for k in range(stages):  # a stage runs one action at a time
        mine = sorted((a for a in sch.actions if a.stage == k), key=lambda a: a.start)
        assert all(x.end <= y.start + 1e-12 for x, y in zip(mine, mine[1:]))
        assert len({a.slot for a in mine}) == len(mine)
    assert 0.0 <= sch.bubble < 1.0


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["gpipe", "1f1b"]),
    stages=st.integers(1, 8),
    micro=st.integers(1, 16),
    training=st.booleans(),
    f=st.floats(0.5, 4.0),
)
def test_equal_stages_give_the_ideal_bubble(name, stages, micro, training, f) -> None:
    sch = build_schedule(name, [f] * stages, [2 * f] * stages, micro, training)
    assert sch.bubble == pytest.approx(ideal_bubble(stages, micro), abs=1e-9)
    held = [min(stages - k, micro) for k in range(stages)] if name == "1f1b" else [micro] * stages
    assert list(sch.peak_in_flight) == (held if training else [1] * stages)


def test_one_f_one_b_order() -> None:
    orders = stage_orders("1f1b", 3, 4, training=True)
    text = [" ".join(f"{k}{m}" for k, m in o) for o in orders]
    assert text == ["F0 F1 F2 B0 F3 B1 B2 B3", "F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]
    assert stage_orders("gpipe", 2, 2, training=True)[0] == [("F", 0), ("F", 1), ("B", 1), ("B", 0)]
