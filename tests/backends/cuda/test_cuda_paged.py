"""The paged MLA cache launchers (backends/cuda/kernels/paged.py) against ir/ops/paged.py's references, and r1-tiny's
`paged_step` compiled for cuda (prefill, then decode steps) against the reference interpreter. Block tables list
pages in random order with unused -1 entries, rows start at different positions, and the slots and pages a step must
not touch hold NaN (float pools) or NaN scales (quantized pools), so a kernel that reads or writes the wrong place
fails. On the CPU the kernels run in Triton's interpreter (tests/conftest.py): tiny shapes, q in f32/f16 (the
interpreter cannot dot bf16; bf16 runs where a GPU is present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import r1c
from r1c.backends.cuda.kernels.decode_attention import DecodeKernelError
from r1c.backends.cuda.launchers import get_launcher
from r1c.backends.cuda.lower import DEFAULT_PIPELINE
from r1c.inference import Engine, SamplingParams, executor_for
from r1c.inference.executor import RefExecutor, pool_shapes
from r1c.ir import registry
from r1c.ir.interpreter import init_weights
from r1c.ir.types import DType

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = Path(__file__).parents[3] / "examples" / "r1-tiny.r1"
L, P, T, M = 2, 26, 4, 10  # layers, pages, page size, block-table width
H, DN, DR, DV, C = 4, 8, 8, 8, 32  # rope 8 pads to 16 lanes in the kernel: the padding is exercised
D = C + DR
ATTRS = {"layer": 1, "scale": (DN + DR) ** -0.5, "qk_nope_head_dim": DN, "v_head_dim": DV}
QDT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def np_(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


def rel_np(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def rel(out: torch.Tensor, ref: np.ndarray) -> float:
    return rel_np(np_(out), ref)


def layout(seed: int, starts: list[int], steps: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A block table of distinct pages in random order (-1 past what each row needs), start, and a [L, P, T] mask
    of the slots that rows hold after the step."""
    rng = np.random.default_rng(seed)
    pages = rng.permutation(P)
    table = np.full((len(starts), M), -1, np.int32)
    used = np.zeros((L, P, T), bool)
    k = 0
    for b, s in enumerate(starts):
        n = -(-(s + steps) // T)
        table[b, :n] = pages[k : k + n]
        k += n
        for p in range(s + steps):
            used[:, table[b, p // T], p % T] = True
    return torch.tensor(table, device=DEVICE), torch.tensor(starts, dtype=torch.int32, device=DEVICE), used


def float_pool(seed: int, used: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Random values where rows hold tokens, NaN everywhere else."""
    x = torch.randn(L, P, T, D, generator=torch.Generator().manual_seed(seed))
    x[~torch.from_numpy(used)] = float("nan")
    return x.to(DEVICE, dtype)


def quant_pool(seed: int, used: np.ndarray, kind: str, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes everywhere; random positive scales where rows hold tokens, NaN scales elsewhere."""
    g = torch.Generator().manual_seed(seed)
    if kind == "int8":
        codes = torch.randint(-127, 128, (L, P, T, D), generator=g, dtype=torch.int8)
    else:
        codes = (torch.randn(L, P, T, D, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(L, P, T, groups, generator=g) * 0.05 + 0.01
    scales[~torch.from_numpy(used)] = float("nan")
    return codes.to(DEVICE), scales.to(DEVICE)


CASES = [([0, 17, 35], 1), ([3, 0, 30], 3), ([0, 0, 0], 6)]  # decode, a verify-sized step, a prefill


@pytest.mark.parametrize("starts,steps", CASES)
def test_paged_write(starts, steps):
    table, start, used = layout(1, starts, steps)
    pool = float_pool(2, used, torch.float32)
    new = torch.randn(len(starts), steps, D, device=DEVICE)
    want = registry.get("paged_write").reference([np_(pool), np_(new), np_(table), np_(start)], {"layer": 1})[0]
    out = get_launcher("paged_write")(pool, new, table, start, layer=1)
    assert out is pool  # in place
    np.testing.assert_array_equal(np_(out), want)  # NaN where untouched, on both sides


@pytest.mark.parametrize("kind,groups", [("int8", 5), ("fp8", 5), ("int8", 2), ("fp8", 1)])
@pytest.mark.parametrize("starts,steps", CASES[:2])
def test_paged_write_q(kind, groups, starts, steps):
    table, start, used = layout(3, starts, steps)
    codes, scales = quant_pool(4, used, kind, groups)
    new = torch.randn(len(starts), steps, D, device=DEVICE) * torch.linspace(0.1, 3, D, device=DEVICE)
    new[0, 0, :5] = 0.0  # a partly zero group next to nonzero ones
    ins = [np_(codes), np_(scales), np_(new), np_(table), np_(start)]
    want_q, want_s = registry.get("paged_write_q").reference(ins, {"layer": 1})
    got_q, got_s = get_launcher("paged_write_q")(codes, scales, new, table, start, layer=1)
    assert got_q is codes and got_s is scales
    np.testing.assert_array_equal(np_(got_q), want_q)  # bit-exact, as kv_quant's kernels
    np.testing.assert_array_equal(np_(got_s), want_s)


def qkw(seed: int, bsz: int, steps: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, H, steps, DN + DR, generator=g)
    w = torch.randn(H * (DN + DV), C, generator=g) * C**-0.5
    return q.to(DEVICE, dtype), w.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("starts,steps", CASES)
def test_paged_mla_attention(dtype, starts, steps):
    table, start, used = layout(5, starts, steps)
    pool = float_pool(6, used, dtype)
    q, w = qkw(7, len(starts), steps, dtype)
    want = registry.get("paged_mla_attention").reference([np_(t) for t in (q, pool, table, start, w)], ATTRS)[0]
    out = get_launcher("paged_mla_attention")(q, pool, table, start, w, **ATTRS)
    assert out.dtype == dtype and out.shape == (len(starts), H, steps, DV)
    assert rel(out, want) < TOL[dtype]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind,groups", [("int8", 5), ("fp8", 5), ("int8", 2)])
@pytest.mark.parametrize("starts,steps", CASES[:2])
def test_paged_mla_attention_kvq(kind, groups, starts, steps, splits):
    table, start, used = layout(8, starts, steps)
    codes, scales = quant_pool(9, used, kind, groups)
    q, w = qkw(10, len(starts), steps, torch.float32)
    ins = [np_(t) for t in (q, codes, scales, table, start, w)]
    want = registry.get("paged_mla_attention_kvq").reference(ins, ATTRS)[0]
    out = get_launcher("paged_mla_attention_kvq")(q, codes, scales, table, start, w, splits=splits, block_n=16,
                                                  **ATTRS)  # fmt: skip
    assert rel(out, want) < TOL[torch.float32]


def test_bad_steps_are_clear_errors():
    table, start, used = layout(11, [0, 5], 1)
    pool = float_pool(12, used, torch.float32)
    new = torch.randn(2, 1, D, device=DEVICE)
    with pytest.raises(DecodeKernelError, match="row 1 position 8 maps to page -1"):
        get_launcher("paged_write")(
            pool, new, table, start + torch.tensor([0, 3], dtype=torch.int32, device=DEVICE), layer=0
        )
    with pytest.raises(DecodeKernelError, match="past its block table"):
        get_launcher("paged_write")(pool, new, table, torch.tensor([0, 40], dtype=torch.int32, device=DEVICE), layer=0)
    with pytest.raises(DecodeKernelError, match="layer 2 is out of range"):
        get_launcher("paged_write")(pool, new, table, start, layer=2)
    codes, scales = quant_pool(13, used, "int8", 3)
    with pytest.raises(DecodeKernelError, match="G dividing 40"):
        get_launcher("paged_write_q")(codes, scales, new, table, start, layer=0)


def random_pools(executor, rng, pages: int, page: int) -> list[np.ndarray]:
    """Host pools of the step's types: random values, codes, and positive scales (never zeros)."""
    out = []
    for shape, dtype in pool_shapes(executor.signature, pages, page):
        if dtype == DType.int8:
            out.append(rng.integers(-127, 128, shape).astype(np.float32))
        elif dtype == DType.f32 and len(out) == 1:  # the scales after quantized codes
            out.append(rng.uniform(0.01, 0.05, shape).astype(np.float32))
        else:
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


@pytest.mark.parametrize("quant", [None, "int8"])
def test_r1_tiny_paged_step_matches_ref(tmp_path, quant):
    """Prefills of rows at different lengths, then 3 decode steps of both rows, through the cuda executor (pools
    donated, updated in place) against the reference interpreter running the same (rewritten) paged_step."""
    m = r1c.load(TINY)
    w = init_weights(m, 0)
    passes = f"kv-quant{{dtype={quant}}},{DEFAULT_PIPELINE}" if quant else DEFAULT_PIPELINE
    art = r1c.compile(m, target="cuda", weights=w, out_dir=tmp_path / "a",
                      options={"entry": "paged_step", "passes": passes})  # fmt: skip
    plan = json.loads((art.path / "plan.json").read_text())
    assert plan["donated"] == (["kv_pool", "kv_pool_scale"] if quant else ["kv_pool"])
    assert all(s["in_place"] for s in plan["steps"] if s.get("launcher", "").startswith("paged_write"))
    ex, ref = executor_for(art), RefExecutor(art.module, w, "paged_step")
    rng = np.random.default_rng(1)
    pages, page = 9, 4
    ref_pools = random_pools(ref, rng, pages, page)
    pools = ex.new_pools(pages, page)
    for dev, host in zip(pools, ref_pools):
        dev.copy_(torch.from_numpy(host))
    table = np.full((2, 4), -1, np.int32)
    table[0, :3], table[1, :2] = [7, 2, 5], [0, 8]  # row 0: prompt 5 + 3 = 8 tokens; row 1: 3 + 3
    tol = 1e-4 if quant is None else 1e-3  # int8: a near-tie in quantization may round one code the other way
    for b, prompt in enumerate([rng.integers(0, 512, (1, 5)), rng.integers(0, 512, (1, 3))]):
        args = (prompt.astype(np.int32), table[b : b + 1], np.zeros(1, np.int32))
        want, ref_pools = ref.step(args[0], ref_pools, *args[1:])
        got, out = ex.step(args[0], pools, *args[1:])
        assert all(o is p for o, p in zip(out, pools))  # in place
        assert rel_np(got, want) < tol
    start = np.array([5, 3], np.int32)
    for _ in range(3):
        toks = rng.integers(0, 512, (2, 1)).astype(np.int32)
        want, ref_pools = ref.step(toks, ref_pools, table, start)
        got, pools = ex.step(toks, pools, table, start)
        assert rel_np(got, want) < tol
        start += 1
    # the reduced outputs the engine asks for, taken on the device: the last position and its argmax
    toks = rng.integers(0, 512, (2, 2)).astype(np.int32)  # two tokens: the last position is not the first
    want, ref_pools = ref.step(toks, ref_pools, table, start)
    last, pools = ex.step(toks, pools, table, start, out="last")
    assert last.shape == (2, 1, 512) and rel_np(last, want[:, -1:]) < tol
    ids, pools = ex.step(toks, pools, table, start, out="argmax")  # the same step again: the same slots rewritten
    np.testing.assert_array_equal(ids, want[:, -1].argmax(axis=-1))
    for dev, host in zip(pools, ref_pools):  # whole pools: the written slots and the untouched ones
        assert rel(dev, host) < tol


def test_engine_on_cuda_equals_ref(tmp_path):
    """The inference engine over the cuda executor generates the ref engine's greedy tokens."""
    m = r1c.load(TINY)
    w = {k: v * 4 if k.endswith("proj.weight") else v for k, v in init_weights(m, 0).items()}  # away from ties
    art = r1c.compile(m, target="cuda", weights=w, out_dir=tmp_path / "a", options={"entry": "paged_step"})
    ref = r1c.compile(m, target="ref", weights=w, out_dir=tmp_path / "r")
    prompts = [[5, 9, 1, 44, 7], [300, 2, 17]]
    params = SamplingParams(max_new_tokens=3)
    want = Engine(ref, page_size=4, num_pages=8).generate(prompts, params)
    assert Engine(art, page_size=4, num_pages=8).generate(prompts, params) == want


@pytest.mark.parametrize("quant", [None, "fp8e4m3"])
def test_cli_compiles_paged_step(tmp_path, quant):
    """`r1c compile --entry paged_step --dtype bf16` (and after kv-quant): the executor's pools are bf16, or fp8
    codes with f32 scales (neither is cast by --dtype)."""
    from r1c.cli import main

    out = tmp_path / "paged"
    passes = ["--passes", f"kv-quant{{dtype={quant}}},{DEFAULT_PIPELINE}"] if quant else []
    args = ["compile", str(TINY), "--target", "cuda", "--entry", "paged_step", "--dtype", "bf16", "-o", str(out)]
    assert main(args + passes) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["entry"] == "paged_step" and plan["dtype"] == "bf16"
    want = {"paged_write_q", "paged_mla_attention_kvq"} if quant else {"paged_write", "paged_mla_attention"}
    assert {s.get("launcher") for s in plan["steps"]} >= want
    pools = executor_for(out).new_pools(3, 4)
    assert [p.dtype for p in pools] == ([torch.float8_e4m3fn, torch.float32] if quant else [torch.bfloat16])
