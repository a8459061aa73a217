"""`r1c generate`: sample tokens from a compiled artifact through the inference engine (docs/inference.md).

One prompt streams its tokens (or text) as they are produced; several run as one continuous batch and print a line
per row at the end. A summary (tokens/s, prefill, and for speculative decoding the acceptance rate) goes to stderr,
so stdout holds only the generated tokens or text.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter

from rich.console import Console

from r1c.api import InputError


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate tokens from a compiled artifact",
        description="Generate tokens with the inference engine (paged KV cache, continuous batching, sampling, "
        "speculative decoding) from an artifact whose model has a paged step function (ref: @paged_step of the "
        "module; cpu/cuda: compiled with --entry paged_step).",
    )
    p.add_argument("artifact", help="artifact directory written by `r1c compile`")
    p.add_argument("--prompt-tokens", action="append", default=[], metavar='"ID ID ..."',
                   help="a prompt as token ids (repeat for a batch)")  # fmt: skip
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a text prompt (needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="FILE|bytes",
                   help="a HF tokenizer.json, or `bytes` (UTF-8 bytes as ids, as r1c train uses)")  # fmt: skip
    p.add_argument("--max-new", type=int, default=32, metavar="N", help="new tokens per prompt at most (32)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K most probable (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed; prompt i uses SEED + i (default: random)")
    p.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID", help="stop at this token")
    p.add_argument("--stop-sequence", action="append", default=[], metavar='"ID ID ..."',
                   help="stop after these tokens (repeatable); stop tokens are part of the output")  # fmt: skip
    p.add_argument("--page-size", type=int, metavar="T", help="tokens per KV page (16)")
    p.add_argument("--num-pages", type=int, metavar="P", help="pages in the KV pool (256)")
    p.add_argument("--max-batch", type=int, default=8, metavar="B", help="requests decoding together (8)")
    p.add_argument(
        "--prefill-chunk", type=int, metavar="N", help="feed a prompt at most N tokens a step (default: all)"
    )
    p.add_argument("--max-seq-len", type=int, metavar="N", help="context limit, prompt + output tokens (4096)")
    p.add_argument("--draft", metavar="DRAFT_ARTIFACT", help="speculative decoding with this draft model")
    p.add_argument("--speculate", type=int, metavar="K", help="with --draft: draft tokens per step (4)")
    p.set_defaults(run=run_generate)


def _ids(text: str, flag: str) -> list[int]:
    items = [t for t in re.split(r"[\s,]+", text.strip()) if t]
    if not items:
        raise InputError(f"{flag} {text!r} holds no token ids")
    bad = [t for t in items if not re.fullmatch(r"[+-]?\d+", t)]
    if bad:
        raise InputError(f"{flag} {text!r}: {bad[0]!r} is not an integer token id")
    return [int(t) for t in items]


def run_generate(args: argparse.Namespace) -> int:
    from r1c.inference import Engine, SamplingParams
    from r1c.inference.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.prompt and tok is None:
        raise InputError("--prompt TEXT needs --tokenizer (a tokenizer.json, or `bytes`)")
    prompts = [_ids(t, "--prompt-tokens") for t in args.prompt_tokens]
    prompts += [tok.encode(t) for t in args.prompt] if tok else []
    if not prompts:
        raise InputError('give at least one prompt: --prompt-tokens "ID ..." or --prompt TEXT with --tokenizer')
    if args.speculate is not None and not args.draft:
        raise InputError("--speculate needs --draft DRAFT_ARTIFACT")
    stop_seqs = tuple(tuple(_ids(s, "--stop-sequence")) for s in args.stop_sequence)
    params = [
        SamplingParams(
            max_new_tokens=args.max_new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=None if args.seed is None else args.seed + i,
            stop_token_ids=tuple(args.stop_token),
            stop_sequences=stop_seqs,
        )
        for i in range(len(prompts))
    ]
    speculate = (args.speculate or 4) if args.draft else 0
    t0 = time.perf_counter()
    engine = Engine(args.artifact, page_size=args.page_size, num_pages=args.num_pages, max_batch=args.max_batch,
                    max_seq_len=args.max_seq_len, draft=args.draft, speculate=speculate,
                    prefill_chunk=args.prefill_chunk)  # fmt: skip
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    loaded = time.perf_counter()
    outputs: dict[int, list[int]] = {i: [] for i in ids}
    reasons: dict[int, str] = {}
    stream = _Stream(tok) if len(prompts) == 1 else None
    while engine.has_work():
        for ev in engine.step():
            outputs[ev.request_id].append(ev.token)
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
            if stream:
                stream.show(outputs[ev.request_id], last=ev.finish_reason is not None)
    elapsed = time.perf_counter() - loaded
    if not stream:
        for i in ids:
            print(tok.decode(outputs[i]) if tok else " ".join(map(str, outputs[i])))
    _summary(engine, len(prompts), loaded - t0, elapsed, reasons)
    return 0


class _Stream:
    """Prints one row's output as it grows: token ids, or the text's new suffix (held back while the text ends in a
    partial UTF-8 character, which decodes to U+FFFD until its last byte arrives)."""

    def __init__(self, tok) -> None:
        self.tok, self.shown = tok, 0

    def show(self, tokens: list[int], last: bool = False) -> None:
        if self.tok is None:
            print(("" if len(tokens) == 1 else " ") + str(tokens[-1]), end="\n" if last else "", flush=True)
            return
        text = self.tok.decode(tokens)
        if last or not text.endswith("\ufffd"):
            print(text[self.shown :], end="\n" if last else "", flush=True)
            self.shown = len(text)


def _summary(engine, rows: int, load_s: float, elapsed: float, reasons: dict[int, str]) -> None:
    s = engine.stats
    err = Console(file=sys.stderr, highlight=False, width=None if sys.stderr.isatty() else 120)
    finished = ", ".join(f"{n} {r}" for r, n in sorted(Counter(reasons.values()).items()))
    err.print(
        f"[bold]{s.generated_tokens}[/] tokens for {rows} prompt(s) in {elapsed:.2f} s "
        f"([bold]{s.generated_tokens / max(elapsed, 1e-9):.1f}[/] tokens/s; finished: {finished}); "
        f"target {engine.executor.target}, loaded in {load_s:.2f} s"
    )
    err.print(
        f"prefill: {s.prefill_tokens} tokens in {1e3 * s.prefill_seconds:.1f} ms; decode: {s.decode_calls} steps "
        f"in {1e3 * s.decode_seconds:.1f} ms ({1e3 * s.decode_seconds / max(s.decode_calls, 1):.2f} ms per step); "
        f"{s.preemptions} preemption(s)"
    )
    if engine.speculator:
        err.print(
            f"speculative (k={engine.speculator.k}): acceptance rate {100 * s.acceptance_rate:.1f}% "
            f"({s.accepted}/{s.proposed}), {s.tokens_per_row_step:.2f} tokens per request per target call, "
            f"{s.draft_calls} draft calls"
        )
