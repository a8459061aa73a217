"""`r1c compile` (model -> artifact directory) and `r1c run` (artifact + token ids -> next-token logits, in one
process, pipelined over S processes with `--pipeline S`, or with the experts split E ways by `--expert-parallel E`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from rich.table import Table

from r1c.api import InputError, load_weights
from r1c.artifact import Artifact
from r1c.cli_common import add_set_flag, console, load_model
from r1c.cli_tune import add_shape_flags, parse_shapes
from r1c.ir.core import Function


def add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a model to an artifact directory",
        description="Compile a .r1 model (or .ir module) for a target into an artifact directory.",
    )
    p.add_argument("model", nargs="?", help="model file (.r1 or .ir); optional with --from-hf")
    p.add_argument("--target", default="ref", help="compilation target (default: ref)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="artifact directory to write")
    p.add_argument(
        "--passes",
        metavar="PIPELINE",
        help='pass pipeline to run first, e.g. "canonicalize,cse" (for cuda it replaces the default pipeline)',
    )
    p.add_argument("--dtype", choices=("f32", "f16", "bf16"), help="cuda: cast float parameters and activations")
    p.add_argument("--dump-kernels", metavar="DIR", help="cuda: also write every generated kernel's source to DIR")
    p.add_argument(
        "--entry", metavar="FUNC", help="cuda, cpu: the function to compile (default forward; decode: a KV step)"
    )
    add_shape_flags(p)
    p.add_argument("--mesh", metavar="AXIS=N,...", help="tpu: shard batch/experts over devices, e.g. data=2,expert=2")
    p.add_argument("--emit", choices=("stablehlo",), help="tpu: also print the StableHLO MLIR")
    add_set_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed for initializing weights (default: 0)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="load weights from a .safetensors file")
    w.add_argument("--from-hf", metavar="DIR", help="load model and weights from a Hugging Face DeepSeek checkpoint")
    p.set_defaults(run=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    import r1c

    if args.sets and not args.model:
        raise InputError("--set overrides a .r1 model's config; --from-hf alone takes its config from the checkpoint")
    weights = None
    if args.from_hf:
        from r1c.frontends.hf import load_hf

        hf_module, weights = load_hf(args.from_hf)
        module = load_model(args.model, args.sets) if args.model else hf_module
    elif args.model:
        module = load_model(args.model, args.sets)
    else:
        raise InputError("compile needs a model file (or --from-hf DIR)")
    if args.weights:
        weights = load_weights(args.weights)
    passes, options = args.passes, {}
    tpu = args.target.split(":")[0] == "tpu"
    if args.target == "cuda":  # the cuda target runs its own default pipeline; --passes replaces it
        flags = (("dtype", args.dtype), ("dump_kernels", args.dump_kernels), ("entry", args.entry))
        options = {k: v for k, v in flags if v is not None}
        if passes is not None:
            options["passes"], passes = passes, None
    elif args.target in ("cpu", "cpu-arm"):
        if args.dtype or args.dump_kernels:
            raise InputError("--dtype and --dump-kernels apply to --target cuda")
        flags = (("entry", args.entry), ("shapes", parse_shapes(args.shapes) or None), ("tuning", args.tuning_db))
        options = {k: v for k, v in flags if v is not None}
    elif tpu:
        if args.dtype or args.dump_kernels or args.tuning_db:
            raise InputError("--dtype, --dump-kernels and --tuning-db do not apply to --target tpu")
        flags = (("entry", args.entry), ("shapes", parse_shapes(args.shapes) or None), ("mesh", args.mesh))
        options = {k: v for k, v in flags if v is not None}
    elif args.dtype or args.dump_kernels or args.entry:
        raise InputError("--dtype, --dump-kernels and --entry apply to --target cuda (--entry also to cpu, tpu)")
    if (args.mesh or args.emit) and not tpu:
        raise InputError("--mesh and --emit apply to --target tpu")
    if (args.shapes or args.tuning_db) and args.target not in ("cpu", "cpu-arm") and not tpu:
        raise InputError("--shapes and --tuning-db apply to --target cpu and cpu-arm (--shapes also to tpu)")
    art = r1c.compile(
        module,
        target=args.target,
        passes=passes,
        weights=weights,
        seed=args.seed,
        out_dir=args.output,
        options=options,
    )
    if args.emit:
        print((Path(art.path) / "stablehlo.mlir").read_text(), end="")
    params = art.manifest["parameters"]["elements"]
    source = "loaded" if weights is not None else f"initialized with seed {args.seed}"
    print(
        f"compiled @{art.module.name} for target '{art.target}' -> {art.path} "
        f"({params:,} parameters, {source}; {len(art.module.main.body)} ops)"
    )
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a compiled artifact on token ids",
        description="Run an artifact (or a .r1/.ir model on the reference interpreter) on token ids and print the "
        "top next-token logits of each row.",
    )
    p.add_argument("artifact", help="artifact directory written by `r1c compile`, or a .r1 / .ir model file")
    p.add_argument(
        "--tokens",
        action="append",
        required=True,
        metavar='"ID ID ..."',
        help="token ids of one row (repeat for a batch; rows must have equal length)",
    )
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to show (default: 5)")
    p.add_argument("--output", metavar="FILE.npy", help="save the logits [B, S, V] to a .npy file")
    add_set_flag(p)
    p.add_argument("--seed", type=int, help="model file: seed for initializing weights (default: 0)")
    p.add_argument("--weights", metavar="FILE", help="model file: load weights from a .safetensors file")
    p.add_argument(
        "--pipeline", type=int, metavar="S", help="pipelined over S stages (one process per stage; a ref artifact "
        "or model file on the interpreter, a cuda artifact on GPUs): start with `torchrun --nproc-per-node S r1c run "
        "...`; see docs/distributed.md",
    )  # fmt: skip
    p.add_argument(
        "--expert-parallel", type=int, metavar="E", help="split the rows and the routed experts over E replicas "
        "(E processes, S * E with --pipeline S; E divides the experts and the rows); see docs/distributed.md",
    )  # fmt: skip
    p.add_argument(
        "--comm", choices=("gloo", "nccl"), help="with --pipeline: the process-group backend (default: nccl for a "
        "cuda artifact, one GPU per rank; gloo otherwise, or to run several cuda ranks on one GPU)",
    )  # fmt: skip
    p.add_argument(
        "--micro-batches", type=int, metavar="M", help="with --pipeline / --expert-parallel: micro-batches per "
        "replica (1); M * E divides B",
    )  # fmt: skip
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SEC",
        help="with --pipeline / --expert-parallel: gloo timeout in seconds (300)",
    )
    p.set_defaults(run=run_run)


def parse_tokens(rows: list[str]) -> np.ndarray:
    parsed = []
    for i, row in enumerate(rows):
        items = [t for t in re.split(r"[\s,]+", row.strip()) if t]
        if not items:
            raise InputError(f"--tokens row {i + 1} is empty")
        try:
            parsed.append([int(t) for t in items])
        except ValueError:
            bad = next(t for t in items if not re.fullmatch(r"[+-]?\d+", t))
            raise InputError(f"--tokens row {i + 1}: {bad!r} is not an integer token id") from None
    lengths = {len(r) for r in parsed}
    if len(lengths) > 1:
        raise InputError(f"--tokens rows have different lengths {sorted(lengths)}; a batch needs equal lengths")
    arr = np.array(parsed, dtype=np.int64)
    if np.abs(arr).max() >= 2**31:
        raise InputError("--tokens: token id does not fit in int32")
    return arr.astype(np.int32)


def run_run(args: argparse.Namespace) -> int:
    from r1c.cli_common import parse_sets
    from r1c.distributed.inference import load_source
    from r1c.distributed.program import DistributedError

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    if args.output and not args.output.endswith(".npy"):
        raise InputError(f"--output {args.output}: logits are saved as .npy; use a name ending in .npy")
    distributed = args.pipeline is not None or args.expert_parallel is not None
    if not distributed and any(x is not None for x in (args.micro_batches, args.timeout, args.comm)):
        raise InputError("--micro-batches, --timeout and --comm apply to --pipeline / --expert-parallel runs only")
    art = load_source(args.artifact, parse_sets(args.sets), args.seed, args.weights)
    f = art.module.functions[art.entry]
    if len(f.args) != 1 or f.args[0].type.dtype.is_float or f.args[0].type.rank != 2:
        sig = ", ".join(f"%{a.name}: {a.type}" for a in f.args)
        raise InputError(f"r1c run feeds one token tensor [B, S]; @{f.name} takes ({sig})")
    tokens = parse_tokens(args.tokens)
    if distributed:
        from r1c.distributed.cli import run_pipeline_infer

        try:
            outputs = run_pipeline_infer(args, art, tokens)
        except DistributedError as e:
            raise InputError(str(e)) from None
        if outputs is None:  # not the last stage of replica 0, which prints
            return 0
    else:
        outputs = art.run([tokens])
    return print_logits(np.asarray(outputs[0]), f, art, args.top, args.output)


def print_logits(logits: np.ndarray, f: Function, art: Artifact, top: int, output: str | None) -> int:
    """`r1c run`'s output, the same whether one process or the last pipeline stage computed the logits."""
    if logits.ndim != 3:
        raise InputError(f"@{f.name} returns {f.results[0].type}; r1c run expects logits [B, S, V]")
    if output:
        np.save(output, logits.astype(np.float32))
        print(f"saved logits {list(logits.shape)} to {Path(output)}")
        return 0
    k = min(top, logits.shape[-1])
    out = console()
    out.print(f"top-{k} next tokens after the last position of each row ({art.module.name}, target {art.target}):")
    table = Table()
    for col in ("row", "rank", "token", "logit"):
        table.add_column(col, justify="right")
    for b in range(logits.shape[0]):
        last = logits[b, -1].astype(np.float64)
        for rank, tok in enumerate(np.argsort(-last, kind="stable")[:k]):
            table.add_row(str(b) if rank == 0 else "", str(rank + 1), str(int(tok)), f"{last[tok]:.4f}")
    out.print(table)
    return 0
