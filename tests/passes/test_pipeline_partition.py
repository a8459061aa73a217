"""pipeline-partition: the stages, run in sequence on the reference interpreter, reproduce the function exactly
(random graphs and random r1-tiny configs); the IR verifies and round-trips; errors are clear; DeepSeek-V3
balances to max/mean < 1.1 for 4, 8 and 16 stages; `r1c partition` prints and writes the plan."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from r1c.cli import main
from r1c.frontends.dsl import load
from r1c.ir import parse_module, print_module, verify
from r1c.ir.interpreter import init_weights, random_inputs, run
from r1c.passes import PassManager, get_pass
from r1c.passes.pipeline_cost import H100, PartitionError, analyze, bind_env
from r1c.passes.pipeline_partition import run_stages, stage_functions
from r1c.passes.pipeline_plan import plan_partition

ROOT = Path(__file__).parents[2]
_path = ROOT / "tests" / "ir" / "strategies.py"
_spec = importlib.util.spec_from_file_location("r1c_test_strategies", _path)
strategies = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = strategies
    _spec.loader.exec_module(strategies)

PASS = get_pass("pipeline-partition")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _units(m, function: str = "forward", granularity: str = "op") -> int:
    f = m.functions[function]
    params = {n: p.type for n, p in m.params.items()}
    return len(analyze(f, params, bind_env(f, 2, 3), H100, granularity).units)


def _check_stages(m, out, function: str, env: dict[str, int], seed: int) -> None:
    verify(out)
    assert parse_module(print_module(out)) == out
    assert out.functions[function] == m.functions[function]  # the unpartitioned program is kept as is
    weights = init_weights(m, seed)
    inputs = random_inputs(m, m.functions[function], env, seed)
    want = run(m, inputs, weights, function)
    got = run_stages(out, function, inputs, weights)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)  # same ops on the same values: bit-identical


@SETTINGS
@given(m=strategies.modules(max_ops=14), data=st.data())
def test_stages_reproduce_random_graphs(m, data) -> None:
    n = _units(m)
    assume(n >= 1)
    stages = data.draw(st.integers(1, min(n, 6)), label="stages")
    out = PASS(m, stages=stages, granularity="op", batch=2, seq=3, micro_batches=data.draw(st.integers(1, 5)))
    assert len(stage_functions(out, "forward")) == stages
    _check_stages(m, out, "forward", strategies.ENV, seed=data.draw(st.integers(0, 3)))


@settings(SETTINGS, max_examples=12)
@given(
    layers=st.integers(1, 3),
    function=st.sampled_from(["forward", "loss"]),
    granularity=st.sampled_from(["op", "sublayer", "layer"]),
    data=st.data(),
)
def test_stages_reproduce_tiny_model(layers, function, granularity, data) -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": layers})
    n = _units(m, function, granularity)
    stages = data.draw(st.integers(1, min(n, 5)), label="stages")
    out = PASS(m, stages=stages, function=function, granularity=granularity, seq=data.draw(st.sampled_from([8, 4096])))
    _check_stages(m, out, function, {"B": 2, "S": 5}, seed=1)
    fns = stage_functions(out, function)
    for prev, nxt in zip(fns, fns[1:]):  # neighbours only: what k sends is exactly what k+1 receives after inputs
        original = set(m.functions[function].args)
        assert [a for a in nxt.args if a not in original] == prev.results


def test_send_bytes_match_the_stage_signatures() -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 3})
    plan, _ = plan_partition(m, stages=3, function="loss", batch=2, seq=16, micro_batches=4)
    out = PASS(m, stages=3, function="loss", batch=2, seq=16, micro_batches=4)
    env = {"B": 2, "S": 16}
    for s, f in zip(plan.stages, stage_functions(out, "loss")):
        sent = sum(int(np.prod(v.type.concrete(env))) * v.type.dtype.itemsize for v in f.results)
        assert s.send_bytes == (0 if s.index == len(plan.stages) - 1 else sent)
    assert list(out.attrs["pipeline_loss_send_bytes"]) == [s.send_bytes for s in plan.stages[:-1]]
    assert plan.training and plan.backward_ratio == 2.0
    assert all(s.bwd_time > s.fwd_time for s in plan.stages[:-1])
    assert [s.peak_in_flight for s in plan.stages] == [3, 2, 1]  # 1F1B keeps S-k micro-batches


def test_check_numerics_through_the_pass_manager() -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 2})
    out = PassManager("pipeline-partition{stages=3, seq=8}", verify_each=True, check_numerics=True).run(m)
    assert len(stage_functions(out, "forward")) == 3


def test_memory_cap_is_respected_and_infeasible_cap_is_an_error() -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 3})
    free, _ = plan_partition(m, stages=3, function="loss", seq=64)
    biggest = max(s.memory for s in free.stages)
    cap = 0.98 * biggest / 1e9
    capped, _ = plan_partition(m, stages=3, function="loss", seq=64, memory_cap_gb=cap)
    assert max(s.memory for s in capped.stages) <= cap * 1e9
    assert capped.imbalance >= free.imbalance - 1e-12  # the cap can only cost balance
    with pytest.raises(PartitionError, match="memory cap"):
        plan_partition(m, stages=3, function="loss", seq=64, memory_cap_gb=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": 40}, "too few for 40 stages; try granularity=op"),
        ({"stages": 0}, "stages must be >= 1"),
        ({"stages": 2, "function": "nope"}, "has no function @nope"),
        ({"stages": 2, "granularity": "block"}, "granularity must be one of"),
        ({"stages": 2, "schedule": "zb"}, "schedule must be one of"),
        ({"stages": 2, "micro_batches": 0}, "micro_batches must be >= 1"),
        ({"stages": 2, "backward_ratio": 2.0}, "not a training function"),
        ({"stages": 2, "seq": 0}, "batch and seq must be >= 1"),
    ],
)
def test_clear_errors(kwargs, message) -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 1})
    with pytest.raises(PartitionError, match=message):
        PASS(m, **kwargs)


def test_partitioning_twice_is_an_error() -> None:
    m = load(ROOT / "examples" / "r1-tiny.r1", overrides={"num_layers": 1})
    once = PASS(m, stages=2)
    with pytest.raises(PartitionError, match="already partitioned"):
        PASS(once, stages=2)
    both = PASS(once, stages=2, function="loss")  # another function is fine
    assert len(stage_functions(both, "loss")) == 2


@pytest.fixture(scope="module")
def v3():
    return load(ROOT / "examples" / "deepseek-v3.r1")


@pytest.mark.parametrize("stages", [4, 8, 16])
def test_deepseek_v3_balances_within_10_percent(v3, stages) -> None:
    plan, program = plan_partition(v3, stages=stages)
    assert plan.imbalance < 1.1
    assert sum(s.ops for s in plan.stages) == sum(len(u.ops) for u in program.units)
    assert plan.stages[0].first == "model.embed_tokens" and plan.stages[-1].last == "lm_head"
    assert sum(s.flops for s in plan.stages) == sum(u.flops for u in program.units)


def test_deepseek_v3_training_step_balances(v3) -> None:
    plan, _ = plan_partition(v3, stages=16, function="loss", micro_batches=32)
    assert plan.training and plan.imbalance < 1.1
    ideal = plan.schedules["1f1b"].ideal_bubble
    assert ideal <= plan.schedules["1f1b"].bubble < ideal + 0.05


def test_cli_partition(capsys, tmp_path) -> None:
    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    out_json, out_ir = tmp_path / "plan.json", tmp_path / "p.ir"
    model = str(ROOT / "examples" / "r1-tiny.r1")
    code, out, err = cli(
        "partition", model, "--stages", "3", "--function", "loss", "--micro-batches", "4", "--seq", "64"
    )
    assert code == 0, err
    assert "imbalance (max/mean stage cost)" in out and "1f1b" in out and "gpipe" in out
    code, out, err = cli(
        "partition", model, "--stages", "2", "--json", str(out_json), "-o", str(out_ir), "--set", "num_layers=2"
    )
    assert code == 0, err
    plan = json.loads(out_json.read_text())
    assert len(plan["stages"]) == 2 and plan["imbalance"] >= 1.0
    assert len(plan["schedules"]["gpipe"]["actions"]) == 2 * 8  # forward only: S x M forwards
    assert len(stage_functions(verify(parse_module(out_ir.read_text())), "forward")) == 2
    code, out, err = cli("partition", model, "--stages", "300")
    assert code == 1 and "too few for 300 stages" in err and "Traceback" not in err
