"""MoE kernels (permutation, grouped GEMMs, combine) against the IR ops' numpy references.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py), which cannot do tl.dot on bfloat16, so
these tests use float16/float32; bfloat16 is checked on the GPU by bench/moe_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import moe  # noqa: F401  (registers every MoE launcher)
from r1c.backends.cuda.kernels.grouped_gemm import GemmConfig, MoeKernelError
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list, **attrs) -> list[np.ndarray]:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs(attrs))


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    assert out.shape == want.shape and not np.isnan(out).any()
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


def randn(rng: np.random.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE, dtype)


def routing(rng: np.random.Generator, t: int, k: int, e: int, shared: int = 0) -> torch.Tensor:
    """Top-k of random logits over the routed experts, then the shared experts as the last columns."""
    routed = np.argsort(-rng.standard_normal((t, e - shared)), axis=1)[:, : k - shared]
    ids = np.concatenate([routed, np.tile(np.arange(e - shared, e), (t, 1))], axis=1)
    return torch.from_numpy(ids.astype(np.int32)).to(DEVICE)


def offsets_of(rng: np.random.Generator, rows: int, groups: int, used: int) -> torch.Tensor:
    """Random non-decreasing offsets (empty groups included) covering `used` of the rows."""
    cuts = np.sort(rng.integers(0, used + 1, groups - 1))
    return torch.tensor([0, *cuts, used], dtype=torch.int32, device=DEVICE)


# (T, K, E, num_shared, capacity_factor)
PERMUTE_CASES = [
    (37, 3, 5, 0, 0.0),
    (200, 4, 64, 0, 0.0),  # 4 chunks of 256 pairs: ranks carried across chunks
    (150, 6, 64, 2, 1.0),
    (64, 4, 9, 1, 0.0),
    (50, 3, 6, 1, 1.0),
    (300, 2, 8, 0, 0.5),
    (1, 1, 1, 0, 0.0),
]


@pytest.mark.parametrize("t,k,e,shared,cf", PERMUTE_CASES)
def test_permute_matches_reference(t: int, k: int, e: int, shared: int, cf: float) -> None:
    rng = np.random.default_rng(t + e)
    x, ids = randn(rng, t, 24, dtype=torch.float16), routing(rng, t, k, e, shared)
    attrs = dict(num_experts=e, num_shared=shared, capacity_factor=cf)
    outs = get_launcher("moe_permute")(x, ids, **attrs)
    want = ref("moe_permute", [x, ids], **attrs)
    assert [o.dtype for o in outs[1:]] == [torch.int32, torch.int32]
    assert rel(outs[0], want[0]) == 0.0
    np.testing.assert_array_equal(outs[1].cpu().numpy(), want[1])
    np.testing.assert_array_equal(outs[2].cpu().numpy(), want[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "config", [None, GemmConfig(16, 32, 32, 4, 2), GemmConfig(32, 64, 64, 4, 2), GemmConfig(32, 32, 64, 4, 2, tma=True)]
)
def test_grouped_matmul(dtype: torch.dtype, config: GemmConfig | None) -> None:
    rng = np.random.default_rng(1)
    rows, d, n, groups = 150, 96, 80, 7
    x, w = randn(rng, rows, d, dtype=dtype), randn(rng, groups, n, d, dtype=dtype)
    off = offsets_of(rng, rows, groups + 3, rows - 11)  # 10 groups in all: this dispatch serves 2..8
    out = get_launcher("grouped_matmul")(x, w, off, first_expert=2, config=config)
    assert rel(out, ref("grouped_matmul", [x, w, off], first_expert=2)[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_matmul_swiglu(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    rows, d, f, groups = 100, 72, 40, 5  # d not a multiple of BLOCK_K: masked K tail
    x, w = randn(rng, rows, d, dtype=dtype), randn(rng, groups, 2 * f, d, dtype=dtype)
    off = offsets_of(rng, rows, groups, rows - 7)
    launch = get_launcher("grouped_matmul+swiglu")
    out = launch(x, w, off, first_expert=0, config=GemmConfig(32, 32, 32, 4, 2))
    out_tma = launch(x, w, off, first_expert=0, config=GemmConfig(32, 32, 32, 4, 2, tma=True))
    gate_up = ref("grouped_matmul", [x, w, off], first_expert=0)[0]
    want = registry.get("swiglu").reference([gate_up[:, :f], gate_up[:, f:]], {})[0]
    assert rel(out, want) < TOL[dtype] and rel(out_tma, want) < TOL[dtype]


@pytest.mark.parametrize("cf", [0.0, 0.8])
def test_fused_permute_gemm_swiglu(cf: float) -> None:
    rng = np.random.default_rng(3)
    t, k, e, d, f = 40, 3, 6, 64, 24
    x, ids = randn(rng, t, d, dtype=torch.float16), routing(rng, t, k, e)
    w = randn(rng, e, 2 * f, d, dtype=torch.float16)
    attrs = dict(num_experts=e, num_shared=0, capacity_factor=cf)
    tma = GemmConfig(16, 16, 32, 4, 2, tma=True)  # the gathered A through pointers, w through descriptors
    act, off, row_of = get_launcher("moe_permute+grouped_matmul+swiglu")(x, ids, w, **attrs, config=tma)
    x_sorted, want_off, want_row_of = ref("moe_permute", [x, ids], **attrs)
    np.testing.assert_array_equal(off.cpu().numpy(), want_off)
    np.testing.assert_array_equal(row_of.cpu().numpy(), want_row_of)
    gate_up = ref("grouped_matmul", [torch.from_numpy(x_sorted), w, off], first_expert=0)[0]
    want = registry.get("swiglu").reference([gate_up[:, :f], gate_up[:, f:]], {})[0]
    assert rel(act, want) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unpermute_gather_scatter(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(4)
    t, k, d = 33, 3, 300
    perm = rng.permutation(t * k).reshape(t, k)
    perm[rng.random((t, k)) < 0.2] = -1  # dropped pairs
    row_of = torch.from_numpy(perm.astype(np.int32)).to(DEVICE)
    y, wts = randn(rng, t * k, d, dtype=dtype), randn(rng, t, k, dtype=dtype)
    assert rel(get_launcher("moe_unpermute")(y, row_of, wts), ref("moe_unpermute", [y, row_of, wts])[0]) < TOL[dtype]
    assert rel(get_launcher("moe_gather_rows")(y, row_of), ref("moe_gather_rows", [y, row_of])[0]) == 0.0
    dup = row_of.clone()
    dup[0] = dup[1]  # repeated rows add up
    z = randn(rng, t, k, d, dtype=dtype)
    assert rel(get_launcher("moe_scatter_rows")(z, dup), ref("moe_scatter_rows", [z, dup])[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wgrad(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    rows, n, d = 120, 70, 50
    dy, x = randn(rng, rows, n, dtype=dtype), randn(rng, rows, d, dtype=dtype)
    off = offsets_of(rng, rows, 6, rows - 5)
    out = get_launcher("grouped_matmul_wgrad")(dy, x, off, first_expert=1, num_experts=4)
    assert rel(out, ref("grouped_matmul_wgrad", [dy, x, off], first_expert=1, num_experts=4)[0]) < TOL[dtype]


def test_layer_chain_matches_references() -> None:
    """permute -> gate_up+SwiGLU -> down -> combine, each step fed the kernels' own previous output."""
    rng = np.random.default_rng(6)
    t, k, e, d, f = 48, 3, 8, 64, 32
    x, ids = randn(rng, t, d, dtype=torch.float32), routing(rng, t, k, e)
    wts = randn(rng, t, k, dtype=torch.float32)
    w1, w2 = randn(rng, e, 2 * f, d, dtype=torch.float32), randn(rng, e, d, f, dtype=torch.float32)
    xs, off, row_of = get_launcher("moe_permute")(x, ids, num_experts=e, num_shared=0, capacity_factor=0.0)
    act = get_launcher("grouped_matmul+swiglu")(xs, w1, off, first_expert=0)
    y = get_launcher("grouped_matmul")(act, w2, off, first_expert=0)
    out = get_launcher("moe_unpermute")(y, row_of, wts)
    gate_up = ref("grouped_matmul", [xs, w1, off], first_expert=0)[0]
    act_ref = registry.get("swiglu").reference([gate_up[:, :f], gate_up[:, f:]], {})[0]
    y_ref = ref("grouped_matmul", [torch.from_numpy(act_ref), w2, off], first_expert=0)[0]
    assert rel(out, ref("moe_unpermute", [torch.from_numpy(y_ref), row_of, wts])[0]) < 1e-5


def test_clear_errors() -> None:
    x = torch.zeros(4, 8, device=DEVICE, dtype=torch.float16)
    w = torch.zeros(2, 6, 8, device=DEVICE, dtype=torch.float32)
    off = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(MoeKernelError, match="share one dtype"):
        get_launcher("grouped_matmul")(x, w, off, first_expert=0)
    with pytest.raises(MoeKernelError, match="not all in"):
        get_launcher("grouped_matmul")(x, w.half(), off, first_expert=1)
    with pytest.raises(MoeKernelError, match="f16, bf16 or f32"):
        get_launcher("moe_unpermute")(x.to(torch.int32), off[:2].view(1, 2).repeat(2, 1), off[:2].view(1, 2))
    with pytest.raises(MoeKernelError, match="even 2F"):
        get_launcher("grouped_matmul+swiglu")(
            x, torch.zeros(2, 5, 8, device=DEVICE, dtype=torch.float16), off, first_expert=0
        )
    with pytest.raises(MoeKernelError, match="ids must be"):
        get_launcher("moe_permute")(x, off, num_experts=2, num_shared=0, capacity_factor=0.0)
