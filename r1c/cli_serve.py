"""`r1c serve ARTIFACT`: an OpenAI-compatible completions endpoint over the inference engine (r1c.inference.server).

Ctrl-C or SIGTERM stops it: new requests get 503, those in flight may finish for --shutdown-grace seconds and
the rest end with an error (a 503 body, or an error event in a stream); then the process exits with 0.
"""

from __future__ import annotations

import argparse
import signal
import threading

from r1c.api import InputError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an artifact over an OpenAI-compatible HTTP API",
        description="Serve a compiled artifact's paged step (`--entry paged_step` for compiled targets) as "
        "POST /v1/completions (JSON or streamed Server-Sent Events), GET /v1/models and GET /health.",
    )
    p.add_argument("artifact", help="artifact directory written by `r1c compile`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one and prints it)")
    p.add_argument("--model-name", help="the model id of the API (default: the module's name)")
    p.add_argument(
        "--tokenizer",
        metavar="FILE|bytes",
        help="tokenizer for text prompts and stop strings: a tokenizer.json, or `bytes` (ids are UTF-8 bytes); "
        "without one, prompts are token-id arrays and responses carry token_ids with empty text",
    )
    p.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (default: 8)")
    p.add_argument(
        "--prefill-chunk", type=_positive, help="feed a prompt at most N tokens a step, so long prompts do not stall "
        "the others' decoding (default: the whole prompt in one step)",
    )  # fmt: skip
    p.add_argument("--page-size", type=_positive, help="tokens per KV page (default: the build's, else 16)")
    p.add_argument("--num-pages", type=_positive, help="pages in the KV pool (default: the build's, else 256)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait beyond --max-batch; more get 429 (64)"
    )
    p.add_argument("--max-prompt-tokens", type=_positive, help="longest prompt (default: the context limit - 1)")
    p.add_argument("--max-tokens-limit", type=_positive, help="largest max_tokens of a request (default: as above)")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument(
        "--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests may finish on shutdown (10)"
    )
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from r1c.artifact import load
    from r1c.inference.engine import Engine
    from r1c.inference.server import open_server

    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    art = load(args.artifact)
    tokenizer = None
    if args.tokenizer:
        from r1c.inference.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    engine = Engine(art, page_size=args.page_size, num_pages=args.num_pages, max_batch=args.max_batch,
                    prefill_chunk=args.prefill_chunk)  # fmt: skip
    try:
        server = open_server(
            engine,
            host=args.host,
            port=args.port,
            tokenizer=tokenizer,
            model_name=args.model_name or art.module.name,
            max_queue=args.max_queue,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens_limit,
            max_body_bytes=args.max_body_bytes,
        )
    except OSError as e:  # the port is taken, the host is not an address of this machine
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    stopper = threading.Thread(target=server.stop, args=(args.shutdown_grace,), name="r1c-shutdown", daemon=True)

    def on_signal(signum: int, frame: object) -> None:
        # serve_forever runs in this (the main) thread, and server.shutdown() waits for it: stop from another one.
        if stopper.ident is None:  # the first signal only
            print(f"r1c serve: {signal.Signals(signum).name}, shutting down", flush=True)
            stopper.start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(
        f"r1c serve: {server.url} (model {server.config.model_name}, target {art.target}, {engine.num_pages} pages "
        f"of {engine.page_size} tokens, max batch {engine.max_batch}, context {server.config.limits.max_total_tokens} "
        "tokens)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.server_close()
    return 0
