"""Training-step kernels (optimizer updates, global norm, clipping, lr schedule, balancing bias) against the IR ops'
numpy references. On the CPU they run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import optim
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (7,), (33, 5), (1025,), (3, 17, 11)]


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list, **attrs) -> list[np.ndarray]:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs(attrs))


def run(op: str, ins: list, **attrs) -> tuple[torch.Tensor, ...]:
    out = get_launcher(op)(*ins, **registry.get(op).complete_attrs(attrs))
    return out if isinstance(out, tuple) else (out,)


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    got = out.detach().cpu().double().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and not np.isnan(got).any()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE, dtype)


def scalar(x: float | int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, device=DEVICE)


ADAMW_ATTRS = [
    {},
    dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1),
    dict(beta1=0.0, beta2=0.9999, weight_decay=0.0),  # 1 - beta2**t cancels in f32 unless computed with care
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attrs", ADAMW_ATTRS)
def test_adamw_matches_reference(shape: tuple[int, ...], gdtype: torch.dtype, attrs: dict) -> None:
    rng = np.random.default_rng(sum(shape) + len(attrs))
    p, g, m = randn(rng, shape), randn(rng, shape, gdtype), randn(rng, shape) * 0.1
    v = randn(rng, shape) ** 2 * 0.01
    for t in (1, 2, 3, 10, 1000, 100000):
        lr = scalar(float(rng.uniform(0.05, 0.5)), torch.float32)  # large: the update stands out of p's rounding
        ins = [p, g, m, v, lr, scalar(t, torch.int32)]
        outs, want = run("adamw_update", ins, **attrs), ref("adamw_update", ins, **attrs)
        assert all(o.dtype == torch.float32 for o in outs)
        assert rel(outs[0] - p, want[0] - p.cpu().double().numpy()) < 1e-5, t
        for o, w in zip(outs, want):
            assert rel(o, w) < 1e-5, t
        p, m, v = outs  # a run of steps, the state carried


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.9, 0.05)])
def test_sgd_matches_reference(shape: tuple[int, ...], gdtype: torch.dtype, momentum: float, weight_decay: float):
    rng = np.random.default_rng(sum(shape))
    p, g, buf = randn(rng, shape), randn(rng, shape, gdtype), randn(rng, shape)
    ins = [p, g, buf, scalar(0.3, torch.float32)]
    attrs = dict(momentum=momentum, weight_decay=weight_decay)
    outs, want = run("sgd_update", ins, **attrs), ref("sgd_update", ins, **attrs)
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]
    assert rel(outs[0] - p, want[0] - p.cpu().double().numpy()) < 1e-5
    for o, w in zip(outs, want):
        assert rel(o, w) < 1e-5
    if not momentum:
        assert outs[1].data_ptr() != buf.data_ptr()  # passed through as a copy, never aliased


NORM_SETS = [
    [((7,), torch.float32)],
    [((), torch.float32), ((33, 5), torch.float16), ((1025,), torch.float32)],
    [((0,), torch.float32), ((3, 17, 11), torch.float16), ((1,), torch.float16), ((4097,), torch.float32)],
]


@pytest.mark.parametrize("parts", [optim.NORM_PARTS, 2])  # 2: several blocks per program on small operands
@pytest.mark.parametrize("case", range(len(NORM_SETS)))
def test_global_norm_matches_reference(monkeypatch: pytest.MonkeyPatch, parts: int, case: int) -> None:
    monkeypatch.setattr(optim, "NORM_PARTS", parts)
    rng = np.random.default_rng(case)
    xs = [randn(rng, shape, dtype) for shape, dtype in NORM_SETS[case]]
    (out,) = run("global_norm", xs)
    assert out.shape == () and out.dtype == torch.float32
    assert rel(out, ref("global_norm", xs)[0]) < 1e-6
    again = run("global_norm", xs)[0]
    assert torch.equal(out, again)  # deterministic


def test_clip_coef_matches_reference() -> None:
    for norm in (0.0, 0.3, 0.999999, 1.0, 2.5, 1e4, float("inf")):
        for max_norm in (1.0, 0.5):
            ins = [scalar(norm, torch.float32)]
            (out,) = run("clip_coef", ins, max_norm=max_norm)
            assert out.shape == () and out.dtype == torch.float32
            assert abs(float(out) - float(ref("clip_coef", ins, max_norm=max_norm)[0])) < 1e-6 * max(1, float(out))
    (out,) = run("clip_coef", [scalar(float("nan"), torch.float32)], max_norm=1.0)
    assert np.isnan(float(out))  # a NaN norm stays NaN (np.minimum), never clamps to 1


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 20), (5, 20), (7, 3), (4, 4), (1, 1000)])
@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_lr_schedule_matches_reference(kind: str, warmup: int, total: int, min_lr: float) -> None:
    attrs = dict(lr=3e-3, warmup=warmup, total=total, min_lr=min_lr, kind=kind)
    steps = [*range(1, min(total, 30) + 4), total - 2, total - 1, total, total + 1, 10**6]
    for i, t in enumerate(s for s in steps if s >= 1):
        ins = [scalar(t, torch.int32 if i % 2 else torch.int64)]
        (out,) = run("lr_schedule", ins, **attrs)
        assert out.shape == () and out.dtype == torch.float32
        want = float(ref("lr_schedule", ins, **attrs)[0])
        assert abs(float(out) - want) <= 1e-6 * abs(want), (t, float(out), want)


@pytest.mark.parametrize("e", [1, 7, 64, 257, 1500])
@pytest.mark.parametrize("ldtype", [torch.float32, torch.float16])
def test_balance_bias_matches_reference(e: int, ldtype: torch.dtype) -> None:
    rng = np.random.default_rng(e)
    bias = randn(rng, (e,)) * 0.01
    loads = [
        rng.integers(0, 50, e),  # token counts: some equal the mean when it is an integer
        np.full(e, 12),  # balanced: no change
        rng.standard_normal(e) + 10,
    ]
    if e > 2:
        loads.append(np.r_[np.full(e - 2, 8), 5, 11])  # mean exactly 8: most experts are at the mean
    for load in loads:
        ins = [bias, torch.from_numpy(load.astype(np.float32)).to(DEVICE, ldtype)]
        (out,) = run("balance_bias_update", ins, gamma=0.001)
        assert out.dtype == torch.float32
        want = ref("balance_bias_update", ins, gamma=0.001)[0]
        np.testing.assert_allclose(out.cpu().double().numpy(), want, rtol=0, atol=1e-8)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_training_step_ops_capture_in_a_cuda_graph() -> None:
    """No launcher syncs with the host: a whole optimizer step (schedule, norm, clip, AdamW) captures and replays."""
    rng = np.random.default_rng(0)
    p, g, m = randn(rng, (1000,)), randn(rng, (1000,), torch.float16), randn(rng, (1000,))
    v, w, step = randn(rng, (1000,)) ** 2, randn(rng, (17,)), scalar(3, torch.int32)

    def opt_step() -> tuple[torch.Tensor, ...]:
        lr = run("lr_schedule", [step], lr=1e-3, warmup=2, total=10)[0]
        coef = run("clip_coef", run("global_norm", [g, w]), max_norm=1.0)[0]
        return (lr, coef, *run("adamw_update", [p, g, m, v, lr, step]))

    eager = opt_step()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = opt_step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
