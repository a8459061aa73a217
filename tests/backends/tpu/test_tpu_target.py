"""The `tpu` target end to end (backends/tpu/target.py): r1-tiny's forward, training step and decode step compiled
ahead of time for a TPU v5e topology by libtpu (no TPU here), with the Pallas custom calls (megablox gmm for the
MoE, splash attention) in the compiled TPU HLO; the same programs run on XLA:CPU (Pallas in interpret mode) against
the reference interpreter; a 2x2 mesh sharding experts and batch, compiled for the topology and run on four
virtual CPU devices; the CLI (`--target tpu`, `--shapes`, `--mesh`, `--emit stablehlo`) and its errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")

import r1c  # noqa: E402
from r1c.artifact import load  # noqa: E402
from r1c.backends import TargetError  # noqa: E402
from r1c.cli import main  # noqa: E402
from r1c.ir.interpreter import init_weights, random_inputs, run_function  # noqa: E402
from r1c.train.config import TrainConfig  # noqa: E402
from r1c.train.step import build_train_step, names_attr  # noqa: E402

ROOT = Path(__file__).parents[3]
TINY = ROOT / "examples" / "r1-tiny.r1"


def rel(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def plan(art: r1c.artifact.Artifact) -> dict:
    return json.loads((Path(art.path) / "tpu_plan.json").read_text())


def quiet_compile(m, out: Path, **options) -> r1c.artifact.Artifact:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert-fusion's note on shared experts
        return r1c.compile(m, target="tpu", out_dir=out, options=options)


@pytest.fixture(scope="module")
def forward(tmp_path_factory):
    m = r1c.load(str(TINY))
    return m, quiet_compile(m, tmp_path_factory.mktemp("fwd"), shapes={"B": 2, "S": 128})


def test_forward_aot_for_tpu_has_the_pallas_calls(forward):
    _, art = forward
    p = plan(art)
    assert p["device_kind"].startswith("TPU v5") and p["topology"] == "v5e:2x2"
    calls = p["compiled"]["pallas_custom_calls"]
    # 3 layers of attention (splash) and 2 MoE layers x (gate+up, down) grouped GEMMs (megablox gmm).
    assert calls.get("gmm") == 4 and sum(n for k, n in calls.items() if k.startswith("splash_mha_fwd")) == 3
    hlo = (Path(art.path) / "tpu_hlo.txt").read_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 7
    mlir = (Path(art.path) / "stablehlo.mlir").read_text()
    assert "stablehlo.custom_call @tpu_custom_call" in mlir and "func.func public @main" in mlir
    assert p["compiled"]["flops"] > 0 and p["compiled"]["memory"]["argument_size_in_bytes"] > 0


def test_forward_on_xla_cpu_matches_the_reference(forward):
    """f32 logits within 1e-4 of the reference interpreter, at a shape other than the compiled one; the runner
    says it is not on a TPU."""
    m, art = forward
    tokens = np.random.default_rng(0).integers(0, 512, (2, 11)).astype(np.int32)
    want = run_function(art.module, art.module.functions["forward"], [tokens], art.weights)[0]
    with pytest.warns(RuntimeWarning, match="XLA:CPU with the Pallas kernels in interpret mode"):
        got = load(art.path).run([tokens])[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_decode_step_aot_and_on_cpu(tmp_path):
    m = r1c.load(str(TINY))
    art = quiet_compile(m, tmp_path, entry="decode", shapes={"B": 2, "S": 1, "C": 16})
    assert plan(art)["compiled"]["pallas_custom_calls"] == {"gmm": 4}  # cached attention stays XLA (docs/tpu.md)
    f = art.module.functions["decode"]
    inputs = random_inputs(art.module, f, {"B": 2, "S": 3, "C": 16}, 1)
    inputs[-1] = np.array([0, 9], np.int32)
    want = run_function(art.module, f, inputs, art.weights)
    with pytest.warns(RuntimeWarning):
        got = art.run(inputs)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


def test_train_step_aot_for_tpu_and_on_cpu(tmp_path):
    """The training step (forward, backward through the kernels' own VJPs: splash dq/dkv, gmm/tgmm; AdamW) compiles
    for the TPU, and on XLA:CPU gives the reference's loss, grad norm and updated weights."""
    m = build_train_step(r1c.load(str(TINY), overrides={"num_layers": 2}), TrainConfig())
    w = init_weights(m, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = r1c.compile(m, target="tpu", weights=w, out_dir=tmp_path, options={"entry": "train_step",
                          "shapes": {"B": 2, "S": 16}})  # fmt: skip
    calls = plan(art)["compiled"]["pallas_custom_calls"]
    assert any(k.startswith("splash_mha_dq") for k in calls) and any(k.startswith("splash_mha_dkv") for k in calls)
    assert any("tgmm" in k for k in calls) and any("gmm" in k and "tgmm" not in k for k in calls)
    f = art.module.functions["train_step"]
    inputs = random_inputs(art.module, f, {"B": 2, "S": 16}, 2)
    inputs[-1] = np.array(1, np.int32)
    want = run_function(art.module, f, inputs, art.weights)
    with pytest.warns(RuntimeWarning):
        got = art.run(inputs)
    loss, lr, norm = (float(x) for x in got[:3])
    assert abs(loss - float(want[0])) < 1e-5 and abs(norm - float(want[2])) < 1e-4 * float(want[2])
    assert lr == pytest.approx(float(want[1]))
    for name, g, r in zip(names_attr(art.module, "state"), got[3:], want[3:]):
        if name.startswith("adamw."):  # the moments are the gradients, scaled
            assert rel(g, r) < 1e-5, name
        else:  # AdamW's first step moves by lr * g / (|g| + eps): ill-conditioned where |g| ~ eps (a 1e-6
            # gradient difference moves such an element by a few % of lr), bounded by lr itself
            assert np.abs(g - r).max() < 0.1 * lr, name


def test_mesh_shards_experts_and_batch_for_a_2x2_topology(tmp_path):
    m = r1c.load(str(TINY))
    art = quiet_compile(m, tmp_path, shapes={"B": 4, "S": 128}, mesh="data=2,expert=2")
    p = plan(art)
    assert p["mesh"] == {"data": 2, "expert": 2}
    assert p["shardings"][0] == ["data", None]  # tokens [B, S]
    experts = [s for n, s in zip(p["weights"], p["shardings"][1:]) if ".experts." in n]
    assert len(experts) == 6 and all(s == ["expert", None, None] for s in experts)
    assert all(s == [None] * len(s) for n, s in zip(p["weights"], p["shardings"][1:]) if ".experts." not in n)
    hlo = (Path(art.path) / "tpu_hlo.txt").read_text()
    assert "num_partitions=4" in hlo
    # Each device's grouped GEMM holds half of the experts: the kernel's weight operand is [E/2 (padded), ...].
    assert p["compiled"]["pallas_custom_calls"]["gmm"] == 4 and p["compiled"]["collectives"].get("all-reduce")


def test_mesh_program_on_four_cpu_devices_matches_the_reference():
    """The expert-parallel shard_map (each device its experts' rows, summed over the expert axis) and the
    batch-sharded attention give the reference's logits."""
    code = f"""
import os, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax, r1c
from jax.sharding import Mesh
from r1c.ir.interpreter import init_weights, random_inputs, run_function
from r1c.backends.tpu.lower import lower
from r1c.passes import PassManager
warnings.simplefilter("ignore")
m = PassManager("canonicalize,cse,dce,expert-fusion,sparse-attention-tiling,cse,dce").run(r1c.load({str(TINY)!r}))
w, f = init_weights(m, 0), m.functions["forward"]
x = random_inputs(m, f, {{"B": 4, "S": 8}}, 1)
mesh = Mesh(np.array(jax.devices("cpu")[:4]).reshape(2, 2), ("data", "expert"))
low = lower(m, "forward", mesh=mesh)
got = np.asarray(jax.jit(low.fn)(*x, *[w[n] for n in low.weights])[0])
want = run_function(m, f, x, w)[0]
print("ERR", float(np.abs(got - want).max()))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(out.stdout.split("ERR")[-1])
    assert err < 1e-5


def test_xla_kernels_have_no_pallas_calls(tmp_path):
    m = r1c.load(str(TINY), overrides={"num_layers": 2})
    art = quiet_compile(m, tmp_path, shapes={"B": 1, "S": 8}, kernels="xla")
    # XLA:TPU's own Mosaic kernels for ragged_dot remain; none of r1c's Pallas kernels.
    calls = plan(art)["compiled"]["pallas_custom_calls"]
    assert calls and all(k.startswith("ragged-dot") for k in calls), calls


def test_option_errors(tmp_path):
    m = r1c.load(str(TINY), overrides={"num_layers": 1})
    with pytest.raises(TargetError, match=r"static shapes; give a value for B, S of @forward \(--shapes B=N,S=N\)"):
        quiet_compile(m, tmp_path)
    with pytest.raises(TargetError, match="has no option.*fast"):
        quiet_compile(m, tmp_path, shapes={"B": 1, "S": 8}, fast=True)
    with pytest.raises(TargetError, match="mesh axes are data, expert"):
        quiet_compile(m, tmp_path, shapes={"B": 1, "S": 8}, mesh="model=2")
    with pytest.raises(TargetError, match="needs 8 devices, the topology has 4"):
        quiet_compile(m, tmp_path, shapes={"B": 4, "S": 8}, mesh="data=4,expert=2")
    with pytest.raises(TargetError, match="dim 3 does not split over mesh axis data=2"):
        quiet_compile(m, tmp_path, shapes={"B": 3, "S": 8}, mesh="data=2")
    assert not (tmp_path / "manifest.json").exists()


def test_cli_compile_emit_stablehlo_and_errors(tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["compile", str(TINY), "--set", "num_layers=1", "--target", "tpu:v6e", "--shapes", "B=1,S=8", "-o", str(out)]
    assert main([*argv, "--emit", "stablehlo", "--mesh", "data=1,expert=2"]) == 0
    text = capsys.readouterr().out
    assert "module @jit_fn" in text and "stablehlo.custom_call @tpu_custom_call" in text
    assert "compiled @r1_tiny for target 'tpu:v6e'" in text
    assert json.loads((out / "tpu_plan.json").read_text())["device_kind"].startswith("TPU v6")
    assert main(["compile", str(TINY), "--target", "ref", "--mesh", "data=2", "-o", str(tmp_path / "b")]) == 1
    assert "--mesh and --emit apply to --target tpu" in capsys.readouterr().err
    assert main(["compile", str(TINY), "--target", "tpu", "-o", str(tmp_path / "c")]) == 1
    assert "--shapes B=N,S=N" in capsys.readouterr().err
    assert main(["compile", str(TINY), "--target", "tpu:v4", "-o", str(tmp_path / "d")]) == 1
    assert "unknown target 'tpu:v4'" in capsys.readouterr().err
