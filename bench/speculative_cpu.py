"""Speculative decoding on the cpu target: acceptance rate, tokens per target call and wall-clock speed-up against
plain decoding of the same requests, with greedy output checked identical in the same run.

Acceptance needs a draft that agrees with the target, which random weights do not give (about 1-5%), so both are
trained first on the bundled byte-level corpus with the reference trainer (r1c.train): the target is r1-tiny
widened (`--target-set`, default hidden 256, 4 layers, so a step costs more than the runtime's per-call overhead),
the draft r1-tiny cut to one layer at the same width. Prompts are slices of that corpus, text both models were
trained on, so the acceptance is what a draft reaches on in-distribution text. Plain and speculative decoding of the
same prompts take turns over 9 rounds after a warm-up pass each, and the medians are compared.

    python bench/speculative_cpu.py                    # -> bench/results/speculative_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import r1c
from r1c.inference import Engine, SamplingParams
from r1c.train.config import TrainConfig
from r1c.train.data import load_tokens
from r1c.train.runtime import Trainer

ROOT = Path(__file__).parents[1]
TINY, CORPUS = ROOT / "examples" / "r1-tiny.r1", ROOT / "examples" / "data" / "tiny-corpus.txt"


def parse_sets(items: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in items.split(",") if kv)}


def train(overrides: dict[str, int], steps: int, tokens: np.ndarray, console: Console) -> tuple:
    """The module and its trained weights (parameters only) after `steps` steps of the model's train block."""
    module = r1c.load(TINY, overrides=overrides)
    trainer = Trainer.create(module, TrainConfig.from_attrs(module.attrs, steps=steps), tokens)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = trainer.run_step()
    console.print(f"trained {overrides}: {steps} steps, loss {last.loss:.3f}, {time.perf_counter() - t0:.0f} s")
    return module, {k: trainer.state[k] for k in module.params}


def interleaved(
    engines: tuple[Engine, Engine], prompts: list[list[int]], params: SamplingParams, rounds: int
) -> tuple[list[list[list[int]]], list[float]]:
    """Each engine's outputs and median seconds over `rounds` rounds, the engines taking turns within a round (so
    a slow moment of the machine hits both), after one warm-up pass each (kernels and pools ready)."""
    for e in engines:
        e.generate(prompts, params)
    times: list[list[float]] = [[] for _ in engines]
    outs: list[list[list[int]]] = []
    for _ in range(rounds):
        outs = []
        for e, t in zip(engines, times):
            t0 = time.perf_counter()
            outs.append(e.generate(prompts, params))
            t.append(time.perf_counter() - t0)
    return outs, [float(np.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--target-set", default="hidden_size=256,num_layers=4,intermediate_size=512,moe_intermediate_size=128"
    )
    ap.add_argument("--steps", type=int, default=300, help="training steps of target and draft")
    ap.add_argument("--k", default="2,3,4", help="draft tokens per verify step")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per configuration (medians)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speculative_cpu.json"))
    args = ap.parse_args()
    console = Console()
    tokens = load_tokens(CORPUS, 512)
    target_set = parse_sets(args.target_set)
    target, tw = train(target_set, args.steps, tokens, console)
    draft, dw = train({**target_set, "num_layers": 1}, args.steps, tokens, console)
    tmp = ROOT / "out" / "bench-speculative"
    compiled = {
        name: r1c.compile(m, target="cpu", weights=w, out_dir=tmp / name, options={"entry": "paged_step"})
        for name, m, w in (("target", target, tw), ("draft", draft, dw))
    }
    rng = np.random.default_rng(0)
    results: dict = {
        "provenance": f"bench/speculative_cpu.py on {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}",
        "target": target_set,
        "draft": {**target_set, "num_layers": 1},
        "train_steps": args.steps,
        "new_tokens": args.new,
        "runs": [],
    }
    table = Table(title="speculative decoding, cpu target")
    for col in ("B", "sampling", "k", "plain tok/s", "spec tok/s", "speed-up", "acceptance", "tok/target call"):
        table.add_column(col, justify="right")
    for b in (int(x) for x in args.batches.split(",")):
        starts = rng.integers(0, len(tokens) - 64, b)
        prompts = [tokens[s : s + int(rng.integers(16, 48))].tolist() for s in starts]
        for label, params in (
            ("greedy", SamplingParams(max_new_tokens=args.new)),
            ("T=0.7", SamplingParams(max_new_tokens=args.new, temperature=0.7, seed=1)),
        ):
            for k in (int(x) for x in args.k.split(",")):
                plain_engine = Engine(compiled["target"], max_batch=b)
                spec_engine = Engine(compiled["target"], max_batch=b, draft=compiled["draft"], speculate=k)
                (plain, outs), (t_plain, t_spec) = interleaved(
                    (plain_engine, spec_engine), prompts, params, args.rounds
                )
                if label == "greedy" and outs != plain:
                    raise SystemExit(f"B={b} k={k}: speculative greedy output differs from plain greedy decoding")
                s = spec_engine.stats
                n = sum(len(o) for o in outs)
                row = {
                    "batch": b,
                    "sampling": label,
                    "k": k,
                    "plain_tok_s": sum(len(o) for o in plain) / t_plain,
                    "spec_tok_s": n / t_spec,
                    "speedup": (n / t_spec) / (sum(len(o) for o in plain) / t_plain),
                    "acceptance": s.acceptance_rate,
                    "tokens_per_target_call": s.tokens_per_row_step,
                    "greedy_identical": label == "greedy",
                }
                results["runs"].append(row)
                cells = (row["plain_tok_s"], row["spec_tok_s"], row["speedup"], row["acceptance"])
                table.add_row(str(b), label, str(k), *(f"{c:.0f}" for c in cells[:2]), f"{cells[2]:.2f}x",
                              f"{cells[3]:.0%}", f"{row['tokens_per_target_call']:.2f}")  # fmt: skip
    console.print(table)
    Path(args.out).write_text(json.dumps(results, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
