"""Shared fixtures for the autodiff tests.

The tiny random HF DeepSeek models come from tests/frontends/test_hf_exact.py (loaded by path, so the
two suites build their models one way and no test module depends on sys.path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
import torch

from r1c import build
from r1c.ir import run
from r1c.ir.types import DType, TensorType
from r1c.passes.grad import grad_function


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_r1c_autodiff_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hf_exact() -> ModuleType:
    """tests/frontends/test_hf_exact.py: hf_model(kind, **overrides), TINY, YARN, random_tokens, rel_err."""
    return _load(Path(__file__).parents[1] / "frontends" / "test_hf_exact.py")


def _vjp_grads(name: str, inputs: list[np.ndarray], cotangents: list[np.ndarray], attrs: dict) -> list:
    """Gradients of sum_j <result_j, cotangent_j> w.r.t. each float operand, via the `grad` pass on a one-op
    module (float operands are parameters, integer/bool operands and cotangents are arguments)."""
    mb = build.ModuleBuilder(f"vjp_{name}")
    args = {f"i{k}": _type_of(x) for k, x in enumerate(inputs) if x.dtype.kind != "f"}
    args.update({f"c{j}": _type_of(c) for j, c in enumerate(cotangents)})
    fb = mb.function("loss", **args)
    operands = [
        fb.param(f"p{k}", _type_of(x), init="normal(1)") if x.dtype.kind == "f" else fb.arg(f"i{k}")
        for k, x in enumerate(inputs)
    ]
    out = fb.op(name, *operands, **attrs)
    results = out if isinstance(out, tuple) else (out,)
    loss = None
    for j, r in enumerate(r for r in results if r.type.dtype.is_float):
        term = fb.mul(r, fb.arg(f"c{j}"))
        if term.type.rank:
            term = fb.reduce_sum(term, axes=tuple(range(term.type.rank)))
        loss = term if loss is None else fb.add(loss, term)
    fb.ret(loss)
    module = grad_function(mb.build(), "loss")
    weights = {f"p{k}": x for k, x in enumerate(inputs) if x.dtype.kind == "f"}
    feed = [x for x in inputs if x.dtype.kind != "f"] + list(cotangents)
    _, *grads = run(module, feed, weights, function="loss_grad")
    names = module.attrs["grad_params.loss"]
    by_name = dict(zip(names, grads))
    return [by_name.get(f"p{k}") for k in range(len(inputs))]


def _type_of(x: np.ndarray) -> TensorType:
    dtype = {"f": DType.f32, "i": DType.int32, "b": DType.bool}[x.dtype.kind]
    return TensorType(dtype, tuple(x.shape))


def check_vjp_impl(
    name: str,
    inputs: list[np.ndarray],
    torch_fn: Callable[..., Any],
    rtol: float = 1e-5,
    seed: int = 0,
    **attrs: Any,
) -> None:
    """The VJP of op `name` on `inputs` agrees with torch autograd of `torch_fn` (float64) for a random
    cotangent of every float result: max |ours - torch| <= rtol * max |torch|, per operand."""
    inputs = [np.asarray(x) for x in inputs]
    inputs = [
        x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32) if x.dtype.kind in "iu" else x
        for x in inputs
    ]
    tensors = [
        torch.tensor(x.astype(np.float64), requires_grad=True) if x.dtype.kind == "f" else torch.tensor(x)
        for x in inputs
    ]
    outs = torch_fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    rng = np.random.default_rng(seed)
    cots = [rng.standard_normal(tuple(o.shape)).astype(np.float32) for o in outs if o.dtype.is_floating_point]
    floats = [t for t in tensors if t.dtype.is_floating_point]
    want = torch.autograd.grad(
        [o for o in outs if o.dtype.is_floating_point],
        floats,
        grad_outputs=[torch.tensor(c.astype(np.float64)) for c in cots],
        allow_unused=True,
    )
    got = [g for g in _vjp_grads(name, inputs, cots, attrs) if g is not None]
    assert len(got) == len(want), f"{name}: {len(got)} gradients, torch has {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        w = np.zeros(g.shape) if w is None else w.detach().numpy()
        assert g.shape == w.shape, (name, k, g.shape, w.shape)
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(g.astype(np.float64) - w).max()) / scale
        assert err <= rtol, f"{name}: gradient of float operand {k} has relative error {err:.2e}"


@pytest.fixture(scope="session")
def check_vjp() -> Callable[..., None]:
    return check_vjp_impl
