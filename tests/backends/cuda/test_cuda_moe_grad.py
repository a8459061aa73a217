"""moe_experts_grad kernels against the IR op's numpy reference (Triton's interpreter on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1c.backends.cuda.kernels import moe_experts_grad  # noqa: F401  (registers the launcher)
from r1c.backends.cuda.launchers import get_launcher
from r1c.ir import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("dx", "dweights", "dw_gate", "dw_up", "dw_down")


pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest.py: unwritten elements fail


def ref(op: str, ins: list) -> list[np.ndarray]:
    np_ins = [t.cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy() for t in ins]
    return registry.get(op).reference(np_ins, registry.get(op).complete_attrs({}))


def rel(out: torch.Tensor, want: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    assert out.shape == want.shape and not np.isnan(out).any()
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


def case(t: int, k: int, e: int, d: int, f: int, used: int, seed: int, dup: bool = False) -> list[torch.Tensor]:
    """Random inputs whose ids use only the first `used` experts (the rest get zero gradients); dup repeats an
    expert across a token's slots."""
    rng = np.random.default_rng(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32)).to(DEVICE)

    ids = rng.integers(0, used, (t, k)) if dup else np.array([rng.permutation(used)[:k] for _ in range(t)])
    ids = torch.from_numpy(ids.astype(np.int32).reshape(t, k)).to(DEVICE)
    return [
        randn(t, d), ids, randn(t, k), randn(e, f, d, scale=d**-0.5), randn(e, f, d, scale=d**-0.5),
        randn(e, d, f, scale=f**-0.5), randn(t, d),
    ]  # fmt: skip


# (T, K, E, D, F, experts used)
CASES = [
    (1, 1, 1, 8, 4, 1),
    (7, 2, 5, 13, 9, 3),  # odd sizes; experts 3 and 4 unused
    (20, 3, 6, 70, 40, 6),
    (6, 2, 4, 40, 150, 4),  # F over several ffn blocks: dweights sums per-block partials
    (4, 2, 3, 300, 70, 3),  # D over several model blocks: masked tails of every loop
    (33, 4, 9, 24, 33, 5),  # an expert's rows span several dot steps
    (5, 6, 8, 16, 16, 8),
]


@pytest.mark.parametrize("t,k,e,d,f,used", CASES)
def test_matches_reference(t: int, k: int, e: int, d: int, f: int, used: int) -> None:
    ins = case(t, k, e, d, f, used, seed=t * 31 + e)
    outs = get_launcher("moe_experts_grad")(*ins)
    want = ref("moe_experts_grad", ins)
    for name, out, w in zip(NAMES, outs, want):
        assert out.dtype == torch.float32
        assert rel(out, w) < 1e-5, name
    if used < e:
        assert (outs[2][used:] == 0).all() and (outs[4][used:] == 0).all()


def test_repeated_expert_in_one_token() -> None:
    ins = case(12, 3, 4, 20, 12, 2, seed=7, dup=True)
    outs = get_launcher("moe_experts_grad")(*ins)
    for name, out, w in zip(NAMES, outs, ref("moe_experts_grad", ins)):
        assert rel(out, w) < 1e-5, name


def test_deterministic() -> None:
    ins = case(40, 2, 3, 32, 24, 3, seed=3)
    a = get_launcher("moe_experts_grad")(*ins)
    b = get_launcher("moe_experts_grad")(*ins)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_no_tokens() -> None:
    ins = case(0, 2, 3, 8, 6, 3, seed=0)
    dx, dw, dwg, dwu, dwd = get_launcher("moe_experts_grad")(*ins)
    assert dx.shape == (0, 8) and dw.shape == (0, 2)
    assert (dwg == 0).all() and (dwu == 0).all() and (dwd == 0).all()
