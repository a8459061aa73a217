"""The KV-cache launchers (cache_write, cached_attention) against the ops' references, the in-place rule of the
lowering, and r1-tiny's `decode` compiled for cuda (prefill then decode steps) against the ref target. Unwritten
cache slots hold NaN, so a kernel that reads past a row's fill level fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import r1c
from r1c.backends.cuda.kernels.decode_attention import DecodeKernelError
from r1c.backends.cuda.launchers import get_launcher
from r1c.backends.cuda.runtime import program
from r1c.ir import parse_module, registry
from r1c.ir.interpreter import init_weights, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = Path(__file__).parents[3] / "examples" / "r1-tiny.r1"


def np_(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def nan_cache(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE)


@pytest.mark.parametrize("steps", [1, 5])
def test_cache_write(steps):
    cache = torch.randn(2, 3, 2, 9, 24, device=DEVICE)
    new = torch.randn(3, 2, steps, 24, device=DEVICE)
    start = torch.tensor([0, 4, 9 - steps], dtype=torch.int32, device=DEVICE)
    want = registry.get("cache_write").reference([np_(cache), np_(new), np_(start)], {"layer": 1})[0]
    out = get_launcher("cache_write")(cache, new, start, layer=1)
    assert out is cache  # in place
    np.testing.assert_array_equal(np_(out), want)


@pytest.mark.parametrize(
    "h,hkv,sq,dtype",
    [(4, 4, 1, torch.float32), (4, 2, 1, torch.float32), (4, 4, 3, torch.float32), (2, 2, 1, torch.float16)],
)
def test_cached_attention(h, hkv, sq, dtype):
    b, slots, dk, dv = 3, 40, 24, 16
    start = torch.tensor([0, 17, slots - sq], dtype=torch.int32, device=DEVICE)
    k, v = nan_cache(2, b, hkv, slots, dk), nan_cache(2, b, hkv, slots, dv)
    for r, s in enumerate(start.tolist()):  # fill each row's first start + sq slots of both layers
        k[:, r, :, : s + sq] = torch.randn(2, hkv, s + sq, dk, device=DEVICE)
        v[:, r, :, : s + sq] = torch.randn(2, hkv, s + sq, dv, device=DEVICE)
    q, k, v = torch.randn(b, h, sq, dk, device=DEVICE).to(dtype), k.to(dtype), v.to(dtype)
    attrs = {"layer": 1, "scale": dk**-0.5}
    want = registry.get("cached_attention").reference([np_(t) for t in (q, k, v, start)], attrs)[0]
    out = get_launcher("cached_attention")(q, k, v, start, **attrs)
    assert out.dtype == dtype and np.isfinite(np_(out)).all()
    assert rel(np_(out), want) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_bad_steps_are_clear_errors():
    cache, new = torch.zeros(1, 2, 1, 8, 4, device=DEVICE), torch.zeros(2, 1, 3, 4, device=DEVICE)
    start = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(DecodeKernelError, match="rows start at 0..6 with 3 new token"):
        get_launcher("cache_write")(cache, new, start, layer=0)
    with pytest.raises(DecodeKernelError, match="layer 1 is out of range"):
        get_launcher("cache_write")(cache, new, start, layer=1)
    with pytest.raises(DecodeKernelError, match="start must be int32"):
        get_launcher("cached_attention")(new, cache, cache, start.long(), layer=0, scale=1.0)


READ_AFTER_WRITE = """
module @m {
  func @forward(%c: f32[1,B,2,8,4], %x: f32[B,2,1,4], %s: int32[B]) -> (f32[1,B,2,8,4], f32[1,B,2,8,4]) {
    %w = cache_write(%c, %x, %s) {layer=0} : f32[1,B,2,8,4]
    %w2 = cache_write(%w, %x, %s) {layer=0} : f32[1,B,2,8,4]
    %old = mul(%c, %c) : f32[1,B,2,8,4]
    return %w2, %old
  }
}
"""


def test_write_is_in_place_only_when_nothing_reads_the_old_cache(tmp_path):
    m = parse_module(READ_AFTER_WRITE)
    art = r1c.compile(m, target="cuda", weights={}, out_dir=tmp_path / "a", options={"passes": ""})
    plan = json.loads((art.path / "plan.json").read_text())
    assert [s.get("in_place") for s in plan["steps"] if s["kind"] == "template"] == [False, True]
    assert plan["donated"] == []  # %c is read after the first write: copied, not donated
    c, x, s = np.random.default_rng(0).standard_normal((1, 2, 2, 8, 4)), np.ones((2, 2, 1, 4)), np.array([1, 7])
    got = art.run([c.astype(np.float32), x.astype(np.float32), s.astype(np.int32)])
    want = run(m, [c.astype(np.float32), x.astype(np.float32), s.astype(np.int32)], {})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_r1_tiny_decode_matches_ref(tmp_path):
    m = r1c.load(TINY)
    w = init_weights(m, 0)
    art = r1c.compile(m, target="cuda", weights=w, out_dir=tmp_path / "a", options={"entry": "decode"})
    plan = json.loads((art.path / "plan.json").read_text())
    assert plan["entry"] == "decode" and plan["donated"] == ["k_cache", "v_cache"]
    assert all(s["in_place"] for s in plan["steps"] if s.get("launcher") == "cache_write")
    prog = program(art)
    toks = np.random.default_rng(1).integers(0, 512, (2, 7)).astype(np.int32)
    rng = np.random.default_rng(2)
    caches = [rng.standard_normal((3, 2, 4, 10, d)).astype(np.float32) for d in (24, 16)]
    ref_k, ref_v = caches
    dev = prog.to_device([toks[:, :4], *caches, np.zeros(2, np.int32)])
    for t in [0, 4, 5, 6]:
        s = 4 if t == 0 else 1
        step = toks[:, t : t + s]
        start = np.full(2, t, np.int32)
        want, ref_k, ref_v = run(m, [step, ref_k, ref_v, start], w, "decode")
        logits, k_out, v_out = prog.forward([prog.to_device([step])[0], dev[1], dev[2], prog.to_device([start])[0]])
        assert k_out is dev[1] and v_out is dev[2]  # the donated caches were updated in place
        assert rel(np_(logits), want) < 1e-4
    for got, ref in zip((dev[1], dev[2]), (ref_k, ref_v)):
        filled = np_(got)[:, :, :, :7]
        assert rel(filled, ref[:, :, :, :7]) < 1e-4


def test_cli_compiles_decode(tmp_path, capsys):
    from r1c.cli import main

    out = tmp_path / "dec"
    assert main(["compile", str(TINY), "--target", "cuda", "--entry", "decode", "-o", str(out)]) == 0
    assert json.loads((out / "plan.json").read_text())["entry"] == "decode"
    assert main(["run", str(out), "--tokens", "1 2 3"]) == 1  # r1c run feeds tokens only: a clear error
    assert "r1c run feeds one token tensor" in capsys.readouterr().err
    assert main(["compile", str(TINY), "--target", "cuda", "--entry", "generate", "-o", str(tmp_path / "x")]) == 1
    assert "no function 'generate'" in capsys.readouterr().err
