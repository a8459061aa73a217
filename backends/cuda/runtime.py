"""The cuda runtime: load a compiled artifact (plan + kernel sources + weights), move the weights to the GPU once,
and execute the plan on torch tensors, freeing each buffer after its last use. `Program.run(..., cuda_graph=True)`
captures the whole plan once per input shape and replays it after.

Without a GPU the same code runs on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter: how CI tests it).
torch is used only for allocation, views, and moving inputs/outputs/weights between host and device.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1c.artifact import Artifact, ArtifactError
from r1c.backends.cuda import kernel_cache
from r1c.backends.cuda.codegen import elementwise as ew
from r1c.backends.cuda.codegen import indexing, matmul, rows
from r1c.backends.cuda.launchers import get_launcher
from r1c.backends.cuda.lower import IN_PLACE
from r1c.ir import dims, registry
from r1c.ir.core import DimList
from r1c.ir.interpreter import bind_dims
from r1c.ir.ops.nn import rope_inv_freq
from r1c.ir.types import DType

PLAN_FILE = "plan.json"
KERNEL_DIR = "kernels"
_TORCH = {
    DType.f32: torch.float32,
    DType.f16: torch.float16,
    DType.bf16: torch.bfloat16,
    DType.int32: torch.int32,
    DType.int8: torch.int8,
    DType.fp8e4m3: torch.float8_e4m3fn,  # quantized KV pools (codes); numpy holds their values as float32
    DType.bool: torch.bool,
}
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class CudaRuntimeError(ArtifactError):
    """The artifact cannot run here (no GPU, unsupported dtype): reported by the CLI as one line."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_device() -> torch.device:
    if interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise CudaRuntimeError(
        "running a cuda artifact needs an NVIDIA GPU (torch.cuda.is_available() is False here); "
        "set TRITON_INTERPRET=1 to run its Triton kernels in the interpreter on the CPU"
    )


def bcast(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` broadcast to `shape` as a view (numpy rules: leading unit axes, then stride 0)."""
    return t[(None,) * (len(shape) - t.dim())].expand(shape)


class Program:
    """A loaded cuda artifact, ready to run."""

    def __init__(self, artifact: Artifact, weights: dict[str, torch.Tensor] | None = None) -> None:
        """`weights`: device tensors to read instead of the artifact's (shared, not copied: programs of one
        training stage read and update the same ones)."""
        self.artifact = artifact
        self.device = pick_device()
        path = Path(artifact.path)
        self.plan = json.loads((path / PLAN_FILE).read_text())
        self.kernels = {
            name: kernel_cache.load((path / KERNEL_DIR / name).read_text()) for name in self.plan["kernels"]
        }
        self.fn = artifact.module.functions[self.plan["entry"]]
        self.values = {v.name: v for v in self.fn.values()}
        self.float_dtype = FLOAT_DTYPES.get(self.plan.get("dtype") or "")
        self.keep_f32 = set(self.plan.get("f32", ()))
        params = artifact.module.params
        self.weights = (
            weights
            if weights is not None
            else {  # moved (and cast for `dtype=`) once
                name: torch.from_numpy(np.require(w, requirements="C")).to(
                    self.device, self.dtype_of(params[name].type.dtype)
                )
                for name, w in artifact.weights.items()
            }
        )
        if missing := sorted(set(params) - set(self.weights)):
            raise CudaRuntimeError(f"cuda runtime: no weight for params {', '.join(missing[:5])}")
        self.last_use = self._last_uses()
        self.rope_tables: dict[int, tuple[torch.Tensor, float]] = {}
        self.graphs: dict[Any, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.poison = False  # tests: fill every buffer r1c allocates with NaN / -1 so unwritten elements show
        self.profile: dict[str, float] | None = None  # set to {} to accumulate seconds per step label (syncs!)
        self.static: dict[str, torch.Tensor] = {}
        self.refresh_static()

    def refresh_static(self) -> None:
        """Weight-only work (expert fusion's concats, ...): once at load, and again when the weights change."""
        self.static = {}
        for step in self.plan["steps"]:
            if step["static"]:
                self._step(step, self.static, {})

    def set_weights(self, new: dict[str, torch.Tensor]) -> None:
        """Replace weights by device tensors of the same shapes and dtypes (a training step's new state)."""
        for name, t in new.items():
            old = self.weights[name]
            if t.shape != old.shape or t.dtype != old.dtype or t.device != old.device:
                raise CudaRuntimeError(
                    f"weight {name}: got {tuple(t.shape)} {t.dtype} on {t.device}, "
                    f"expected {tuple(old.shape)} {old.dtype} on {old.device}"
                )
        self.weights.update(new)
        self.refresh_static()

    def dtype_of(self, dtype: DType) -> torch.dtype:
        if dtype.is_float and dtype != DType.fp8e4m3 and self.float_dtype is not None:  # codes keep their dtype
            return self.float_dtype
        if dtype not in _TORCH:
            raise CudaRuntimeError(f"cuda runtime: dtype {dtype.value} is not supported")
        return _TORCH[dtype]

    def _last_uses(self) -> dict[int, list[str]]:
        last: dict[str, int] = {}
        for i, step in enumerate(self.plan["steps"]):
            for name in step["inputs"]:
                last[name] = i
        keep = {r.name for r in self.fn.results}
        out: dict[int, list[str]] = {}
        for name, i in last.items():
            if name not in keep:
                out.setdefault(i, []).append(name)
        return out

    # -- helpers over buffers ------------------------------------------------------------------------------------

    def copy_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst[...] = src (broadcast), by the generated strided copy kernel."""
        shape = tuple(dst.shape) or (1,)
        src = bcast(src, tuple(dst.shape)).reshape(shape) if not dst.shape else bcast(src, shape)
        dst = dst.reshape(1) if not dst.shape else dst
        if math.prod(shape):
            grid, blocks, rows = ew.tile_grid(shape, [src, dst])
            k = self.kernels[f"copy_r{len(shape)}.py"]
            k.kernel[grid](src, dst, rows, *shape, *src.stride(), *dst.stride(), **blocks)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        out = self._alloc(tuple(t.shape), t.dtype)  # row-major, unlike empty_like of a view
        self.copy_into(t, out)
        return out

    def contiguous(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.is_contiguous() else self.copy_of(t)

    def as_shape(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of `t` with `shape`, through a copy when the strides do not allow one."""
        try:
            return t.view(shape)
        except RuntimeError:
            return self.contiguous(t).view(shape)

    def rows2d(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """`t` as [rows, n] with a unit column stride (what the row kernels read)."""
        t2 = self.as_shape(t, (-1, n)) if t.numel() else t.reshape(-1, n)
        return t2 if t2.stride(1) == 1 or n == 1 else self.contiguous(t2)

    def value_dtype(self, value_name: str) -> torch.dtype:
        """The torch dtype of a value: its IR dtype under `dtype=`, except KV-pool scales, which stay float32."""
        if value_name in self.keep_f32:
            return torch.float32
        return self.dtype_of(self.values[value_name].type.dtype)

    def empty(self, shape: tuple[int, ...], value_name: str) -> torch.Tensor:
        return self._alloc(shape, self.value_dtype(value_name))

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        return out.fill_(float("nan") if dtype.is_floating_point else -1) if self.poison else out

    # -- steps -----------------------------------------------------------------------------------------------------

    def _ew(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        shape = tuple(dims.evaluate(d, env) for d in step["shape"])
        ins = []
        for name, unsq in zip(step["inputs"], step["unsqueeze"]):
            t = buf[name]
            ins.append(bcast(t[..., None] if unsq else t, shape))
        outs = [self.empty(shape, n) for n in step["outputs"]]
        ew.launch(self.kernels[step["kernel"]], ins, step["consts"], outs, shape)
        buf.update(zip(step["outputs"], outs))

    def _gemm(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        x, w = buf[step["inputs"][0]], buf[step["inputs"][1]]
        if step["gemm"] == "linear":
            k = x.shape[-1]
            lead = tuple(x.shape[:-1])
            m = math.prod(lead)
            a = self.as_shape(x, (1, m, k))
            b = w.t()[None]
            out_shape, bmn = lead + (w.shape[0],), (1, m, w.shape[0])
        else:
            batch = tuple(torch.broadcast_shapes(x.shape[:-2], w.shape[:-2]))
            bt, m, k, n = math.prod(batch), x.shape[-2], x.shape[-1], w.shape[-1]
            a = self.as_shape(bcast(x, batch + (m, k)), (bt, m, k))
            b = self.as_shape(bcast(w, batch + (k, n)), (bt, k, n))
            out_shape, bmn = batch + (m, n), (bt, m, n)
        epi = [
            self.as_shape(bcast(buf[name][..., None] if unsq else buf[name], out_shape), bmn)
            for name, unsq in zip(step["inputs"][2:], step["unsqueeze"])
        ]
        outs = [self.empty(out_shape, n) for n in step["outputs"]]
        matmul.launch(
            self.kernels[step["kernel"]], a, b, epi, step["consts"], [o.view(bmn) for o in outs], interpreting()
        )
        buf.update(zip(step["outputs"], outs))

    def _row(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        op = self.fn.body[step["ops"][0]]
        a = op.attrs
        mod = self.kernels[step["kernel"]]
        x = buf[step["inputs"][0]]
        res = step["outputs"]
        if op.name == "rmsnorm":
            out = self.empty(tuple(x.shape), res[0])
            rows.rmsnorm(mod, self.rows2d(x, x.shape[-1]), buf[step["inputs"][1]], out.view(-1, x.shape[-1]), a["eps"])
        elif op.name == "softmax":
            xm = x.movedim(a["axis"], -1)
            out = self.empty(tuple(xm.shape), res[0])
            rows.softmax(mod, self.rows2d(xm, xm.shape[-1]), out.view(-1, xm.shape[-1]))
            out = out.movedim(-1, a["axis"])
        elif op.name.startswith("reduce_"):
            axes = sorted(ax % x.dim() for ax in a["axes"])
            kept = [d for d in range(x.dim()) if d not in axes]
            xp = x.permute(kept + axes)
            n = math.prod(x.shape[d] for d in axes)
            flat = self.empty((math.prod(x.shape[d] for d in kept),), res[0])
            rows.reduce(mod, self.rows2d(xp, n), flat, op.name)
            shape = (
                [1 if d in axes else x.shape[d] for d in range(x.dim())]
                if a["keepdims"]
                else [x.shape[d] for d in kept]
            )
            out = flat.view(shape)
        elif op.name == "rope":
            inv, scale = self._rope_table(step["ops"][0], x.shape[-1], a)
            out = self.empty(tuple(x.shape), res[0])
            rows.rope(mod, x, buf[step["inputs"][1]], inv, out, scale, a["interleaved"])
        elif op.name == "embedding":
            ids = self.contiguous(buf[step["inputs"][1]])
            out = self.empty(tuple(ids.shape) + (x.shape[1],), res[0])
            rows.embedding(mod, self.rows2d(x, x.shape[1]), ids, out)
        elif op.name == "topk":
            xm = x.movedim(a["axis"], -1)
            lead, k = tuple(xm.shape[:-1]), a["k"]
            vals, idx = self.empty(lead + (k,), res[0]), self.empty(lead + (k,), res[1])
            rows.topk(mod, self.rows2d(xm, xm.shape[-1]), vals.view(-1, k), idx.view(-1, k), k, a["largest"])
            buf[res[0]], buf[res[1]] = vals.movedim(-1, a["axis"]), idx.movedim(-1, a["axis"])
            return
        else:
            raise CudaRuntimeError(f"cuda runtime: no row kernel for '{op.name}'")
        buf[res[0]] = out

    def _rope_table(self, i: int, dim: int, attrs: dict) -> tuple[torch.Tensor, float]:
        """Inverse frequencies from the reference's own formula, computed once per op on the host."""
        if i not in self.rope_tables:
            inv, scale = rope_inv_freq(dim, attrs)
            self.rope_tables[i] = (torch.from_numpy(inv.astype(np.float32)).to(self.device), float(scale))
        return self.rope_tables[i]

    def _gather(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        op = self.fn.body[step["ops"][0]]
        x, idx = buf[step["inputs"][0]], buf[step["inputs"][1]]
        if op.name == "gather":
            out = self.empty(tuple(idx.shape), step["outputs"][0])
            indexing.gather(self.kernels[step["kernel"]], x, idx, out)
        else:
            ax = op.attrs["axis"] % x.dim()
            out = self.empty(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1 :]), step["outputs"][0])
            indexing.take(self.kernels[step["kernel"]], x, idx, out)
        buf[step["outputs"][0]] = out

    def _view(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        op = self.fn.body[step["ops"][0]]
        x, a = buf[step["inputs"][0]], op.attrs
        if op.name == "reshape":
            out = self.as_shape(x, tuple(dims.evaluate(d, env) for d in a["shape"]))
        elif op.name == "transpose":
            out = x.permute(tuple(a["perm"]))
        elif op.name == "slice":
            ax = a["axis"] % x.dim()
            out = x[(slice(None),) * ax + (slice(a["start"], a["stop"], a["step"]),)]
        else:  # broadcast_to
            out = bcast(x, tuple(dims.evaluate(d, env) for d in a["shape"]))
        buf[step["outputs"][0]] = out

    def _concat(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        op = self.fn.body[step["ops"][0]]
        parts = [buf[n] for n in step["inputs"]]
        ax = op.attrs["axis"] % parts[0].dim()
        shape = list(parts[0].shape)
        shape[ax] = sum(p.shape[ax] for p in parts)
        out = self.empty(tuple(shape), step["outputs"][0])
        start = 0
        for p in parts:
            self.copy_into(p, out.narrow(ax, start, p.shape[ax]))
            start += p.shape[ax]
        buf[step["outputs"][0]] = out

    def _slice_scatter(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        a = self.fn.body[step["ops"][0]].attrs
        base, upd = (buf[n] for n in step["inputs"])
        out = self.copy_of(base)
        ax = a["axis"] % out.dim()
        self.copy_into(upd, out[(slice(None),) * ax + (slice(a["start"], a["stop"], a["step"]),)])
        buf[step["outputs"][0]] = out

    def _template(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        ops = [self.fn.body[i] for i in step["ops"]]
        fn = get_launcher(step["launcher"])
        args = [self.contiguous(buf[n]) for n in step["inputs"]]
        if step.get("in_place") is False:  # the launcher writes into its first operands, which are read later
            for j in range(IN_PLACE[step["launcher"]]):
                args[j] = self.copy_of(args[j])
        attrs = {
            k: DimList(dims.evaluate(d, env) for d in v) if isinstance(v, DimList) else v
            for k, v in registry.get(ops[0].name).complete_attrs(ops[0].attrs).items()
        }
        res = fn(*args, **attrs)
        res = res if isinstance(res, tuple) else (res,)
        if len(res) != len(step["outputs"]):
            raise CudaRuntimeError(
                f"launcher '{step['launcher']}' gave {len(res)} results, expected {len(step['outputs'])}"
            )
        buf.update(zip(step["outputs"], res))

    def _param(self, step: dict, buf: dict, env: dict[str, int]) -> None:
        buf[step["outputs"][0]] = self.weights[self.fn.body[step["ops"][0]].attrs["name"]]

    # -- running ---------------------------------------------------------------------------------------------------

    def run_torch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Execute the plan on device tensors (int32 token ids)."""
        env = bind_dims(self.fn, inputs)
        buf: dict[str, torch.Tensor] = {**self.static, **{a.name: x for a, x in zip(self.fn.args, inputs)}}
        for i, step in enumerate(self.plan["steps"]):
            if not step["static"]:  # static steps ran once, at load
                (self._step if self.profile is None else self._timed_step)(step, buf, env)
            for name in self.last_use.get(i, ()):
                del buf[name]
        return [buf[r.name] for r in self.fn.results]

    def _timed_step(self, step: dict, buf: dict[str, torch.Tensor], env: dict[str, int]) -> None:
        """Run one step between device synchronizations and add its time under its label (kind + op names)."""
        assert self.profile is not None
        label = step.get("launcher") or f"{step['kind']}:{'+'.join(self.fn.body[i].name for i in step['ops'])}"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self._step(step, buf, env)
        torch.cuda.synchronize()
        self.profile[label] = self.profile.get(label, 0.0) + time.perf_counter() - t0

    def _step(self, step: dict, buf: dict[str, torch.Tensor], env: dict[str, int]) -> None:
        run = {
            "param": self._param,
            "ew": self._ew,
            "gemm": self._gemm,
            "row": self._row,
            "gather": self._gather,
            "view": self._view,
            "concat": self._concat,
            "slice_scatter": self._slice_scatter,
            "template": self._template,
        }
        run[step["kind"]](step, buf, env)

    def _graph(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self.graphs:
            # donated inputs (KV caches written in place) are captured as the caller's tensors: no copy per call
            donated = set(self.plan.get("donated", ()))
            static = [x if a.name in donated else x.clone() for a, x in zip(self.fn.args, inputs)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles every kernel outside the capture
                self.run_torch(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = self.run_torch(static)
            self.graphs[key] = (graph, static, outs)
        graph, static, outs = self.graphs[key]
        for s, x in zip(static, inputs):
            if s.data_ptr() != x.data_ptr():
                s.copy_(x)
        graph.replay()
        return outs

    def to_device(self, inputs: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Host arrays moved (and cast) as the entry's arguments in their positions; device tensors kept as they are
        (a pipeline stage's received activations beside the batch's token ids)."""
        return [
            x
            if isinstance(x, torch.Tensor)
            else torch.from_numpy(np.require(x, np.int32 if x.dtype.kind in "iu" else x.dtype, "C")).to(
                self.device, self.value_dtype(a.name)
            )
            for a, x in zip(self.fn.args, inputs)
        ]

    def forward(self, inputs: list[torch.Tensor], cuda_graph: bool = False) -> list[torch.Tensor]:
        if cuda_graph and self.device.type != "cuda":
            raise CudaRuntimeError("cuda_graph=True needs a CUDA device (not the Triton interpreter)")
        if cuda_graph:
            return self._graph(inputs)
        # the interpreter computes masked-off lanes too: 0/0 there is expected, not a warning
        quiet = np.errstate(divide="ignore", invalid="ignore", over="ignore") if interpreting() else nullcontext()
        with quiet:
            return self.run_torch(inputs)

    def run(self, inputs: list[np.ndarray], cuda_graph: bool = False) -> list[np.ndarray]:
        return host_arrays(self.forward(self.to_device([np.asarray(x) for x in inputs]), cuda_graph))


def host_arrays(outs: list[torch.Tensor]) -> list[np.ndarray]:
    """Results as numpy arrays on the host; bf16/f16/fp8 ones as float32 (numpy has no such dtypes)."""
    narrow = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    return [(o.float() if o.dtype in narrow else o).cpu().numpy() for o in outs]


_PROGRAMS: dict[tuple[str, str], Program] = {}


def program(artifact: Artifact) -> Program:
    """The loaded program of an artifact, cached per artifact directory and content."""
    key = (str(Path(artifact.path).resolve()), json.dumps(artifact.manifest["files"], sort_keys=True))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = Program(artifact)
    return _PROGRAMS[key]
