"""Training on one GPU: r1c's whole train step (forward, backward, clipping, AdamW: one IR function compiled by the
cuda target, state kept on the GPU) against PyTorch training HF DeepseekV2ForCausalLM from the same init on the same
batches (torch.optim.AdamW fused, clip_grad_norm_), eager and torch.compile. DeepSeek-V2-Lite-shaped, 2 layers (one
dense, one 64-expert MoE), random init, batch 4 x 512 tokens; f32 (no TF32, as both sides' defaults) and bf16
mixed precision (r1c `precision=bf16`; torch autocast bf16), each side's f32 master weights.

Checks in the same run: r1c cuda's first-step loss against torch's (same weights and batch), and r1-tiny trained
for 6 steps on the cuda target against the reference interpreter (loss curves). Floor: 3x the forward FLOPs of the
batch (r1c.stats) at the matmul rate measured in the same run (f32 without TF32, or bf16).

    source bench/gpu_setup.sh && python3 bench/train_cuda.py --out $OUT/train_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import r1c
from r1c.ir.ops.optim import lr_at
from r1c.train.config import TrainConfig
from r1c.train.data import Batches, load_tokens
from r1c.train.runtime import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from e2e_cuda import hf_v2  # noqa: E402

ROOT = Path(__file__).parents[1]
LAYERS, BATCH, SEQ, STEPS = 2, 4, 512, 8
RESULTS: dict[str, Any] = {}
OUT: Path | None = None


def record(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    try:
        out = fn()
    except Exception as e:  # one failure must not hide the other numbers
        RESULTS.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=-4)
        out = None
    print(f"[{time.time() - t0:7.1f}s] {label}", flush=True)
    if OUT is not None:
        OUT.write_text(json.dumps(RESULTS, indent=1) + "\n")
    return out


def matmul_tflops(dtype: torch.dtype) -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def r1c_steps(trainer: Trainer, steps: int) -> tuple[list[float], float]:
    """Losses of `steps` steps after 2 warm-up steps (kernel compiles), and seconds per step."""
    losses = [trainer.run_step().loss for _ in range(2)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses += [trainer.run_step().loss for _ in range(steps)]
    return losses, (time.perf_counter() - t0) / steps


def profile(trainer: Trainer, key: str) -> None:
    """One more step with a device sync around every launch: seconds per kind of step (the 15 largest)."""
    program = trainer.runner.program
    program.profile = {}
    trainer.run_step()
    top = sorted(program.profile.items(), key=lambda kv: -kv[1])[:15]
    program.profile = None
    RESULTS[f"{key}.r1c_profile_ms"] = {label[:80]: round(s * 1e3, 3) for label, s in top}


def torch_steps(model, batches, cfg: TrainConfig, bf16: bool, compiled: bool) -> tuple[list[float], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True
    )
    model.train()

    def loss_of(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            logits = model(tokens).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    fwd = torch.compile(loss_of) if compiled else loss_of
    losses, t0 = [], 0.0
    for step, (tok, lab) in enumerate(batches, start=1):
        if step == 3:  # after 2 warm-up steps (compiles)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = fwd(torch.from_numpy(tok).long().cuda(), torch.from_numpy(lab).long().cuda())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr, cfg.schedule)
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - t0) / (len(batches) - 2)


def lite(precision: str) -> None:
    base = r1c.load(ROOT / "examples/deepseek-v2-lite.r1", overrides={"num_layers": LAYERS})
    cfg = TrainConfig.from_attrs(
        base.attrs, steps=STEPS + 2, batch=BATCH, seq=SEQ, bias_gamma=0.0, aux_loss_alpha=0.0, precision=precision
    )
    stream = np.random.default_rng(0).integers(0, base.attrs["vocab_size"], 1 << 20).astype(np.int32)
    key, tokens = f"lite{LAYERS}.{precision}", BATCH * SEQ
    flops = 3 * r1c.stats(base, seq=SEQ, batch=BATCH).flops
    rate = RESULTS["matmul_tflops"]["bf16" if precision == "bf16" else "f32"]
    RESULTS[f"{key}.floor_tok_s"] = tokens / (flops / (rate * 1e12))
    trainer = record(f"{key} r1c compile", lambda: Trainer.create(base, cfg, stream, "cuda"))
    if trainer is None:
        return
    weights = {n: trainer.state[n] for n in base.params}
    out = record(f"{key} r1c steps", lambda t=trainer: r1c_steps(t, STEPS))
    if out:
        RESULTS[f"{key}.r1c_losses"], s = out
        RESULTS[f"{key}.r1c_tok_s"] = tokens / s
        record(f"{key} r1c profile", lambda t=trainer: profile(t, key))
    del trainer
    torch.cuda.empty_cache()
    sampler = Batches(stream, cfg.batch, cfg.seq, cfg.seed)
    batches = [sampler.next() for _ in range(STEPS + 2)]
    for compiled in (False, True):
        name = "torch_compile" if compiled else "torch_eager"

        def run(compiled: bool = compiled) -> tuple[list[float], float]:
            model = hf_v2(base.attrs, weights, torch.float32, "cuda")
            try:
                return torch_steps(model, batches, cfg, precision == "bf16", compiled)
            finally:
                del model
                torch.cuda.empty_cache()

        got = record(f"{key} {name}", run)
        if got:
            RESULTS[f"{key}.{name}_losses"], s = got
            RESULTS[f"{key}.{name}_tok_s"] = tokens / s
    r, t = RESULTS.get(f"{key}.r1c_losses"), RESULTS.get(f"{key}.torch_eager_losses")
    if r and t:
        RESULTS[f"{key}.first_loss_rel_diff_vs_torch"] = abs(r[0] - t[0]) / abs(t[0])


def tiny_vs_ref() -> None:
    base = r1c.load(ROOT / "examples/r1-tiny.r1")
    cfg = TrainConfig.from_attrs(base.attrs, steps=6)
    tokens = load_tokens(ROOT / "examples/data/tiny-corpus.txt", base.attrs["vocab_size"])
    ref, cuda = Trainer.create(base, cfg, tokens), Trainer.create(base, cfg, tokens, "cuda")
    a = [ref.run_step().loss for _ in range(cfg.steps)]
    b = [cuda.run_step().loss for _ in range(cfg.steps)]
    RESULTS["tiny.ref_losses"], RESULTS["tiny.cuda_losses"] = a, b
    RESULTS["tiny.max_abs_loss_diff"] = float(np.max(np.abs(np.array(a) - np.array(b))))


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/train_cuda.json"))
    p.add_argument("--only", choices=("tiny", "f32", "bf16"), action="append")
    args = p.parse_args()
    OUT = Path(args.out)
    RESULTS.update(device=torch.cuda.get_device_name(), config=dict(layers=LAYERS, batch=BATCH, seq=SEQ, steps=STEPS))
    RESULTS["matmul_tflops"] = {"f32": matmul_tflops(torch.float32), "bf16": matmul_tflops(torch.bfloat16)}
    only = args.only or ["tiny", "f32", "bf16"]
    if "tiny" in only:
        record("tiny cuda vs ref", tiny_vs_ref)
    for precision in ("f32", "bf16"):
        if precision in only:
            lite(precision)


if __name__ == "__main__":
    main()
