"""The `tpu` targets (`tpu` = `tpu:v5e`, `tpu:v5p`, `tpu:v6e`): verified IR -> JAX (lower.py, jax_ops.py) -> StableHLO
-> XLA:TPU, compiled ahead of time for a TPU topology by libtpu on this machine (docs/tpu.md).

    OUT/stablehlo.mlir    the StableHLO module of the entry function lowered for the TPU (Pallas kernels as
                          `tpu_custom_call`s), taking the inputs then the weights (tpu_plan.json names their order)
    OUT/tpu_hlo.txt       the optimized HLO after libtpu's compile (where libtpu is installed)
    OUT/tpu_plan.json     entry, shapes, chip, topology, mesh and shardings, kernels, weight order, the Pallas
                          custom calls of the compiled program by kernel, collectives, XLA's cost and memory analysis

A tpu artifact runs where it is loaded: on a TPU when JAX has one, else on XLA:CPU with the Pallas kernels in
interpret mode (the runner says so with a RuntimeWarning; it never falls back to the reference interpreter).

Options: `passes` (pipeline run before lowering; default DEFAULT_PIPELINE, "" for none), `entry` (default the
module's main), `shapes` ({symbol: value}; required for every symbolic dim of the entry's arguments: XLA compiles
static shapes), `kernels` ("pallas" default, or "xla": ragged_dot and masked softmax, no custom calls), `mesh`
({axis: size} over the axes `data` (batch) and `expert` (stacked expert weights), e.g. {"data": 2, "expert": 2}),
`topology` (default the chip's 2x2 host), `precision` ("highest": f32 matmuls as f32, the default; "default":
XLA:TPU's bf16 passes), `aot` (compile for the topology with libtpu; default True).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from r1c.backends import TargetError, check_options, optimized_entry, register_target
from r1c.ir import dims

if TYPE_CHECKING:
    from r1c.artifact import Artifact
    from r1c.ir.core import Function, Module

OPTIONS = ("passes", "entry", "shapes", "kernels", "mesh", "topology", "precision", "aot")
DEFAULT_PIPELINE = "canonicalize,cse,dce,expert-fusion,sparse-attention-tiling,cse,dce"
MLIR_FILE, HLO_FILE, PLAN_FILE = "stablehlo.mlir", "tpu_hlo.txt", "tpu_plan.json"
CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}  # one host of 4 chips: the smallest topology
MESH_AXES = ("data", "expert")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def chip_of(name: str) -> str:
    return name.split(":", 1)[1] if ":" in name else "v5e"


def parse_mesh(mesh: Any) -> dict[str, int]:
    """{axis: size} from a dict or "data=2,expert=2"; axes must be data/expert, sizes >= 1."""
    if not mesh:
        return {}
    if isinstance(mesh, str):
        try:
            mesh = {k.strip(): int(v) for k, v in (item.split("=") for item in mesh.split(",") if item.strip())}
        except ValueError:
            raise TargetError(f"tpu target: mesh {mesh!r} must read like data=2,expert=2") from None
    bad = sorted(set(mesh) - set(MESH_AXES))
    if bad or any(int(v) < 1 for v in mesh.values()):
        raise TargetError(f"tpu target: mesh axes are {', '.join(MESH_AXES)} with sizes >= 1, got {dict(mesh)}")
    return {a: int(mesh[a]) for a in MESH_AXES if a in mesh}


def input_shapes(f: "Function", shapes: Mapping[str, int]) -> list[tuple[int, ...]]:
    missing = sorted({s for a in f.args for d in a.type.shape for s in dims.symbols(d)} - set(shapes))
    if missing:
        raise TargetError(
            f"tpu target: XLA compiles static shapes; give a value for {', '.join(missing)} of @{f.name} "
            f"(--shapes {','.join(f'{s}=N' for s in missing)})"
        )
    return [a.type.concrete(dict(shapes)) for a in f.args]


def _batch_symbol(f: "Function") -> Any:
    """The batch dim: the first dim of the first argument (tokens [B, S] in every bundled entry)."""
    return f.args[0].type.shape[0] if f.args and f.args[0].type.rank else None


def make_mesh(mesh: dict[str, int], devices: list) -> Any:
    """The jax Mesh of the first prod(sizes) devices of the topology, or None without a mesh."""
    from jax.sharding import Mesh

    if not mesh:
        return None
    size = int(np.prod(list(mesh.values())))
    if size > len(devices):
        raise TargetError(f"tpu target: mesh {mesh} needs {size} devices, the topology has {len(devices)}")
    return Mesh(np.array(devices[:size]).reshape(tuple(mesh.values())), tuple(mesh))


def shardings(module: "Module", f: "Function", weights: list[str], shapes: list, grid: Any, devices: list) -> tuple:
    """Shardings of the inputs and weights: the batch axis of each input over `data`, the expert axis (0) of every
    rank-3 parameter (the stacked expert weights) over `expert`, everything else replicated. The partitioner
    propagates them through the program; the Pallas kernels run under shard_map (jax_ops)."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    wshapes = [module.params[n].type.concrete({}) for n in weights]
    if grid is None:
        one = SingleDeviceSharding(devices[0])
        return [one] * len(f.args), [one] * len(weights)

    def spec(shape: tuple, axis: int | None, name: str) -> Any:
        if axis is None or name not in grid.shape:
            return NamedSharding(grid, PartitionSpec())
        if shape[axis] % grid.shape[name]:
            raise TargetError(f"tpu target: dim {shape[axis]} does not split over mesh axis {name}={grid.shape[name]}")
        parts: list[Any] = [None] * len(shape)
        parts[axis] = name
        return NamedSharding(grid, PartitionSpec(*parts))

    batch = _batch_symbol(f)
    ins = [
        spec(s, next((i for i, d in enumerate(a.type.shape) if d == batch), None), "data")
        for a, s in zip(f.args, shapes)
    ]
    ws = [spec(s, 0 if len(s) == 3 else None, "expert") for s in wshapes]
    return ins, ws


def _specs(module: "Module", f: "Function", lowered: Any, shapes: list, grid: Any, devices: list) -> tuple:
    import jax

    from r1c.backends.tpu.jax_ops import jdtype

    in_sh, w_sh = shardings(module, f, lowered.weights, shapes, grid, devices)
    wshapes = [module.params[n].type.concrete({}) for n in lowered.weights]
    args = [jax.ShapeDtypeStruct(s, jdtype(a.type.dtype), sharding=sh) for a, s, sh in zip(f.args, shapes, in_sh)]
    ws = [
        jax.ShapeDtypeStruct(s, jdtype(module.params[n].type.dtype), sharding=sh)
        for n, s, sh in zip(lowered.weights, wshapes, w_sh)
    ]
    # Per dim, the mesh axis it is split over (None: replicated); [] for a single device.
    layout = [
        [s.spec[i] if i < len(s.spec) else None for i in range(len(shape))] if hasattr(s, "spec") else []
        for s, shape in zip(in_sh + w_sh, list(shapes) + wshapes)
    ]
    return args, ws, layout


def custom_calls(hlo: str) -> dict[str, int]:
    """Pallas (Mosaic) custom calls of an HLO module, counted by kernel name (the instruction's name)."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            m = re.match(r"\s*(?:ROOT\s+)?%?([A-Za-z_][\w.-]*?)(?:\.\d+)?\s*=", line)
            name = m.group(1) if m else "?"
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def collectives(hlo: str) -> dict[str, int]:
    counts = {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
    return {c: n for c, n in counts.items() if n}


def _precision(name: str) -> Any:
    from jax import lax

    choices = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}
    if name not in choices:
        raise TargetError(f"tpu target: precision must be one of {', '.join(choices)}, got {name!r}")
    return choices[name]


def require_jax() -> None:
    """The target needs JAX and libtpu (the `tpu` extra); without them it is a clear error, not a fallback."""
    try:
        import jax  # noqa: F401
    except ImportError as e:
        raise TargetError(f'the tpu target needs JAX and libtpu: pip install -e ".[tpu]" ({e})') from None


def lower_for_tpu(module: "Module", options: Mapping[str, Any], name: str) -> tuple[Any, dict[str, Any], "Module"]:
    """(jax Lowered for the TPU topology, the plan, the optimized module)."""
    check_options(name, options, OPTIONS)
    require_jax()
    import jax
    from jax.experimental import topologies

    from r1c.backends.tpu.lower import lower

    chip = chip_of(name)
    if chip not in CHIPS:
        raise TargetError(f"tpu target: unknown chip {chip!r}; choose tpu:{', tpu:'.join(CHIPS)}")
    module, entry = optimized_entry(name, module, options, DEFAULT_PIPELINE)
    f = module.functions[entry]
    shapes = dict(options.get("shapes") or {})
    arg_shapes = input_shapes(f, shapes)
    kernels = options.get("kernels", "pallas")
    mesh = parse_mesh(options.get("mesh"))
    topology = options.get("topology") or CHIPS[chip]
    precision = options.get("precision", "highest")
    try:
        devices = list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu missing or a bad topology name: the AOT part is impossible, say why
        raise TargetError(f"tpu target: no TPU topology {topology!r} from libtpu ({type(e).__name__}: {e})") from e
    grid = make_mesh(mesh, devices)
    lowered_fn = lower(module, entry, kernels=kernels, interpret=False, precision=_precision(precision), mesh=grid)
    args, ws, specs = _specs(module, f, lowered_fn, arg_shapes, grid, devices)
    traced = jax.jit(lowered_fn.fn).lower(*args, *ws)
    plan = {
        "entry": entry,
        "chip": chip,
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "mesh": mesh,
        "shapes": shapes,
        "input_shapes": [list(s) for s in arg_shapes],
        "kernels": kernels,
        "precision": precision,
        "weights": lowered_fn.weights,
        "shardings": specs,
        "jax_version": jax.__version__,
    }
    return traced, plan, module


def compile_tpu(
    module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any], name: str = "tpu"
) -> "Artifact":
    from r1c.artifact import write

    traced, plan, module = lower_for_tpu(module, options, name)
    extra = {MLIR_FILE: traced.as_text()}
    plan["stablehlo_custom_calls"] = extra[MLIR_FILE].count("@tpu_custom_call")
    if options.get("aot", True):
        compiled = traced.compile()
        hlo = compiled.as_text()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        plan["compiled"] = {
            "pallas_custom_calls": custom_calls(hlo),
            "collectives": collectives(hlo),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0)),
            "memory": {
                k: int(getattr(mem, k))
                for k in (
                    "argument_size_in_bytes",
                    "output_size_in_bytes",
                    "temp_size_in_bytes",
                    "generated_code_size_in_bytes",
                )
            },  # fmt: skip
        }
        extra[HLO_FILE] = hlo
    else:
        plan["compiled"] = None  # asked not to: only the StableHLO
    extra[PLAN_FILE] = json.dumps(plan, indent=1) + "\n"
    return write(out_dir, module, weights, name, entry=plan["entry"], extra_files=extra)


class TpuProgram:
    """A loaded tpu artifact, jitted for the device JAX has: a TPU (Pallas compiled by Mosaic), else XLA:CPU with
    Pallas in interpret mode. It retraces per input shape from the artifact's IR with the plan's options."""

    def __init__(self, artifact: "Artifact") -> None:
        require_jax()
        import jax

        from r1c.backends.tpu.lower import lower, to_device_dtype

        self.plan = json.loads((Path(artifact.path) / PLAN_FILE).read_text())
        try:
            self.device = jax.devices("tpu")[0]
        except (RuntimeError, ValueError):  # no TPU backend: libtpu found no chip
            self.device = jax.devices("cpu")[0]
        self.platform = self.device.platform
        if self.platform != "tpu":
            warnings.warn(
                f"tpu artifact {artifact.path}: no TPU here; running its JAX program on XLA:CPU with the Pallas "
                "kernels in interpret mode (unsharded)",
                RuntimeWarning,
                stacklevel=3,
            )
        lowered = lower(
            artifact.module,
            self.plan["entry"],
            kernels=self.plan["kernels"],
            interpret=self.platform != "tpu",
            precision=_precision(self.plan["precision"]),
        )
        self.fn = lowered.function
        self.jitted = jax.jit(lowered.fn)
        params = {op.attrs["name"]: op.result.type.dtype for op in self.fn.body if op.name == "param"}
        self.weights = [
            jax.device_put(to_device_dtype(artifact.weights[n], params[n]), self.device) for n in lowered.weights
        ]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import jax

        from r1c.backends.tpu.lower import to_device_dtype, to_reference_dtype
        from r1c.ir.interpreter import bind_dims

        bind_dims(self.fn, inputs)  # a shape that does not fit the signature is an error here, not in JAX
        args = [jax.device_put(to_device_dtype(x, a.type.dtype), self.device) for a, x in zip(self.fn.args, inputs)]
        outs = self.jitted(*args, *self.weights)
        return [to_reference_dtype(o, r.type.dtype) for o, r in zip(outs, self.fn.results)]


_PROGRAMS: dict[str, TpuProgram] = {}


def _key(artifact: "Artifact") -> str:
    return str(Path(artifact.path).resolve()) + json.dumps(artifact.manifest["files"], sort_keys=True)


def run_tpu(artifact: "Artifact", inputs: list[np.ndarray]) -> list[np.ndarray]:
    key = _key(artifact)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = TpuProgram(artifact)
    return _PROGRAMS[key].run(inputs)


def _compile_for(name: str) -> Any:
    def fn(module: "Module", weights: dict[str, np.ndarray], out_dir: Path, options: Mapping[str, Any]) -> "Artifact":
        return compile_tpu(module, weights, out_dir, options, name)

    return fn


register_target(
    "tpu", _compile_for("tpu"), "StableHLO via JAX, Pallas kernels, AOT-compiled for TPU v5e by libtpu", run_tpu
)
for _chip in CHIPS:
    register_target(
        f"tpu:{_chip}",
        _compile_for(f"tpu:{_chip}"),
        f"StableHLO via JAX, Pallas kernels, AOT-compiled for TPU {_chip} by libtpu",
        run_tpu,
    )
