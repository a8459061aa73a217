"""rmsnorm_grad and rope_grad kernels against the IR references (rows that are not a power of two, many rows,
interleaved and half-split RoPE, YaRN attributes as the DeepSeek-V3 and r1-tiny examples use them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import norm_grad  # registers the launchers
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# rope attributes of examples/deepseek-v3.r1 and examples/r1-tiny.r1 (YaRN, interleaved pairs)
DSV3 = dict(theta=10000.0, interleaved=True, scaling="yarn", factor=40.0, original_max_position=4096,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # fmt: skip
TINY = dict(DSV3, factor=4.0, original_max_position=256)


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list, **attrs) -> list[np.ndarray]:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs(attrs))


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    got = out.detach().cpu().double().numpy()
    assert got.shape == want.shape and not np.isnan(got).any()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE, dtype)


RMS_SHAPES = [(1, 16), (7, 33), (3, 5, 100), (2, 4, 3, 64), (2100, 24), (5, 1000), (1, 3)]


@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_grad_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    rng = np.random.default_rng(sum(shape))
    x, g = randn(rng, shape, dtype), randn(rng, shape, dtype)
    w = randn(rng, shape[-1:], torch.float32)  # master weights stay f32 under mixed precision
    fn = get_launcher("rmsnorm_grad")
    dx, dw = fn(x, w, g, eps=1e-6)
    want_dx, want_dw = ref("rmsnorm_grad", [x, w, g], eps=1e-6)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    assert rel(dx, want_dx) < TOL[dtype]
    assert rel(dw, want_dw) < max(TOL[dtype], 1e-5)
    assert torch.equal(dw, fn(x, w, g, eps=1e-6)[1])  # deterministic partial sums


@pytest.mark.parametrize("shape", [(103, 40), (50, 600)])
def test_rmsnorm_grad_many_rows_per_program(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]) -> None:
    """Few programs, so each walks several row tiles (the last one partly past the end)."""
    monkeypatch.setattr(norm_grad, "RMS_PROGRAMS", 3)
    rng = np.random.default_rng(shape[0])
    x, g, w = randn(rng, shape, torch.float32), randn(rng, shape, torch.float32), randn(rng, shape[1:], torch.float32)
    dx, dw = get_launcher("rmsnorm_grad")(x, w, g, eps=1e-6)
    want_dx, want_dw = ref("rmsnorm_grad", [x, w, g], eps=1e-6)
    assert rel(dx, want_dx) < 1e-5 and rel(dw, want_dw) < 1e-5


def test_rmsnorm_grad_eps_matters() -> None:
    rng = np.random.default_rng(1)
    x, g = randn(rng, (4, 10), torch.float32) * 1e-3, randn(rng, (4, 10), torch.float32)  # small x: eps dominates
    w = randn(rng, (10,), torch.float32)
    dx, dw = get_launcher("rmsnorm_grad")(x, w, g, eps=1e-5)
    want_dx, want_dw = ref("rmsnorm_grad", [x, w, g], eps=1e-5)
    assert rel(dx, want_dx) < 1e-5 and rel(dw, want_dw) < 1e-5


# (B, S, H, D, attrs, max position)
ROPE_CASES = [
    (2, 5, 3, 16, {}, 50),
    (1, 7, 2, 12, {"interleaved": True}, 50),  # half = 6: a masked column block
    (2, 3, 5, 10, {"theta": 500000.0}, 100),
    (2, 9, 4, 8, TINY, 256),  # r1-tiny: qk_rope_head_dim 8
    (1, 4, 3, 64, DSV3, 4096),  # DeepSeek-V3: qk_rope_head_dim 64
    (1, 3, 2, 64, dict(DSV3, interleaved=False), 2000),
    (1, 2, 70, 16, {}, 10),  # several head blocks
]


@pytest.mark.parametrize("b,s,h,d,attrs,maxpos", ROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_grad_matches_reference(
    b: int, s: int, h: int, d: int, attrs: dict, maxpos: int, dtype: torch.dtype
) -> None:
    rng = np.random.default_rng(b * s * h + d)
    g = randn(rng, (b, s, h, d), dtype)
    pos = torch.from_numpy(rng.integers(0, maxpos, (b, s))).to(DEVICE, torch.int32)
    full = registry.get("rope_grad").complete_attrs(attrs)
    dx = get_launcher("rope_grad")(g, pos, **full)
    assert dx.dtype == dtype and dx.shape == g.shape
    # angles are float32 (as the reference's); large positions leave ~1e-4 absolute error in cos/sin
    tol = TOL[dtype] if maxpos <= 256 else max(TOL[dtype], 3e-4)
    assert rel(dx, ref("rope_grad", [g, pos], **attrs)[0]) < tol


def test_rope_grad_is_the_transpose_of_rope() -> None:
    """<rope(x), g> == <x, rope_grad(g)> with the reference forward."""
    rng = np.random.default_rng(5)
    x, g = randn(rng, (2, 6, 3, 8), torch.float32), randn(rng, (2, 6, 3, 8), torch.float32)
    pos = torch.from_numpy(rng.integers(0, 200, (2, 6))).to(DEVICE, torch.int64)
    full = registry.get("rope").complete_attrs(TINY)
    y = registry.get("rope").reference([x.cpu().double().numpy(), pos.cpu().numpy()], full)[0]
    dx = get_launcher("rope_grad")(g, pos, **full).cpu().double().numpy()
    lhs, rhs = float((y * g.cpu().double().numpy()).sum()), float((x.cpu().double().numpy() * dx).sum())
    assert abs(lhs - rhs) < 1e-4 * max(1.0, abs(lhs))
