"""Load test of `r1c serve` on loopback, against the same requests driven through the engine in this process.

Starts `r1c serve` (a subprocess) for r1-tiny compiled for the cpu target (`--entry paged_step`; if the cpu target
cannot build it, the ref target, with the reason printed), then C client threads (stdlib http.client, one
connection per request, `stream: true` to see the first token) send N requests with mixed prompt lengths and
max_tokens, half greedy and half seeded sampling, each new request as soon as a client's previous one ends (a
closed loop). Reported: requests/s, output tokens/s, time to first token (TTFT) and latency p50/p90/p99, errors
(must be 0). Then the server is stopped and the same requests run through an `Engine` in this process with the same
closed loop of C (admitted as earlier ones finish), so the HTTP, JSON and thread hand-off cost is the difference;
the tokens of both must be equal (mismatches are reported).

    python bench/serve_load.py                                  # writes bench/results/serve_load.json
    python bench/serve_load.py --requests 16 --concurrency 4    # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import r1c
from r1c.inference.engine import Engine
from r1c.inference.sampling import SamplingParams

ROOT = Path(__file__).parents[1]


def build(model: str, target: str, out: Path) -> tuple[r1c.artifact.Artifact, str]:
    """The artifact, and a note on how it was chosen."""
    module = r1c.load(model)
    if target in ("auto", "cpu"):
        try:
            return r1c.compile(module, target="cpu", out_dir=out / "cpu", options={"entry": "paged_step"}), ""
        except Exception as e:
            if target == "cpu":
                raise
            note = f"cpu target could not build paged_step ({type(e).__name__}: {e}); using ref"
            print(note)
            return r1c.compile(module, target="ref", out_dir=out / "ref"), note
    return r1c.compile(module, target=target, out_dir=out / target), ""


def make_requests(n: int, vocab: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(0, vocab, int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist()
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": i}
        out.append({"prompt": prompt, "max_tokens": int(rng.integers(max_tokens[0], max_tokens[1] + 1))} | sampling)
    return out


def start_server(artifact: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "r1c.cli", "serve", str(artifact), "--port", "0", "--max-batch", str(args.max_batch)]
    cmd += ["--page-size", str(args.page_size), "--num-pages", str(args.num_pages), "--max-queue", str(args.requests)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("r1c serve: http://"):
        proc.kill()
        raise RuntimeError(f"r1c serve did not start: {line!r}")
    host, port = line.split()[2][len("http://") :].split(":")
    return proc, host, int(port)


def one_request(host: str, port: int, body: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        tokens, first = [], None
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            first = first or time.perf_counter()
            tokens += event["choices"][0]["token_ids"]
        return {"tokens": tokens, "ttft": first - t0, "latency": time.perf_counter() - t0}
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def run_http(host: str, port: int, requests: list[dict], concurrency: int) -> tuple[list[dict], float]:
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(requests)):
        todo.put(i)
    results: list[dict] = [{}] * len(requests)

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = one_request(host, port, requests[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_direct(engine: Engine, requests: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """The same closed loop of `concurrency` requests, through the engine's API in this thread."""
    pending = list(range(len(requests)))[::-1]
    live: dict[int, int] = {}  # engine id -> request index
    results: list[dict] = [{"tokens": []} for _ in requests]
    t0 = time.perf_counter()

    def admit() -> None:
        i = pending.pop()
        r = requests[i]
        params = SamplingParams(max_new_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r.get("top_p", 1.0),
                                seed=r.get("seed"))  # fmt: skip
        results[i]["t0"] = time.perf_counter()
        live[engine.add_request(r["prompt"], params)] = i

    while pending and len(live) < concurrency:
        admit()
    while live:
        for ev in engine.step():
            res = results[live[ev.request_id]]
            res.setdefault("ttft", time.perf_counter() - res["t0"])
            res["tokens"].append(ev.token)
            if ev.finish_reason is not None:
                res["latency"] = time.perf_counter() - res["t0"]
                del live[ev.request_id]
                if pending:
                    admit()
    return results, time.perf_counter() - t0


def engine_stats(host: str, port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/health")
    stats = json.loads(conn.getresponse().read())["engine"]
    conn.close()
    return stats


def stat_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What the engine did in between: its step calls and the seconds inside them (the rest of the wall time is
    scheduling, sampling and, for HTTP, the server)."""
    keys = ("prefill_seconds", "decode_seconds", "target_calls", "decode_calls", "preemptions")
    return {"engine_" + k: after[k] - before[k] for k in keys}


def summarize(results: list[dict], wall: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(len(r["tokens"]) for r in ok)
    pct = lambda key: {f"p{q}": float(np.percentile([r[key] for r in ok], q)) for q in (50, 90, 99)} if ok else {}  # noqa: E731
    return {
        "wall_s": wall,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "output_tokens": out_tokens,
        "ttft_s": pct("ttft"),
        "latency_s": pct("latency"),
    }


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "host": platform.node(),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "r1c": r1c.__version__,
        "git": commit.strip() + ("+dirty" if dirty.strip() else ""),
    }


def report(http_: dict, direct: dict | None, mismatches: int | None, settings: dict) -> None:
    table = Table(title=f"r1c serve load test: {settings['requests']} requests, {settings['concurrency']} clients, "
                  f"target {settings['target']}")  # fmt: skip
    table.add_column("")
    for name in ("HTTP (r1c serve)", "engine in-process"):
        table.add_column(name, justify="right")
    rows = [
        ("requests/s", "requests_per_s", "{:.2f}"),
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
        ("errors", "errors", "{}"),
        ("wall s", "wall_s", "{:.2f}"),
        ("model step calls", "engine_target_calls", "{}"),
        ("s in prefill calls", "engine_prefill_seconds", "{:.2f}"),
        ("s in decode calls", "engine_decode_seconds", "{:.2f}"),
        ("preemptions", "engine_preemptions", "{}"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, fmt.format(http_[key]), fmt.format(direct[key]) if direct else "-")
    for what in ("ttft_s", "latency_s"):
        for q in ("p50", "p90", "p99"):
            cells = [f"{d[what][q] * 1e3:.1f}" if d and d[what] else "-" for d in (http_, direct)]
            table.add_row(f"{what[:-2].upper() if what == 'ttft_s' else 'latency'} {q} ms", *cells)
    Console(width=120).print(table)
    if mismatches is not None:
        print(f"requests whose tokens differ between HTTP and in-process: {mismatches}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "examples" / "r1-tiny.r1"))
    ap.add_argument("--target", default="auto", help="auto (cpu if it builds paged_step, else ref), cpu or ref")
    ap.add_argument("--artifact", help="an already compiled artifact directory (skips --model / --target)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", default="4,96", help="prompt lengths, uniform in LO,HI (default 4,96)")
    ap.add_argument("--max-tokens", default="8,64", help="max_tokens, uniform in LO,HI (default 8,64)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-direct", action="store_true", help="skip the in-process engine run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = ap.parse_args()
    lens = tuple(int(x) for x in args.prompt_len.split(","))
    news = tuple(int(x) for x in args.max_tokens.split(","))
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        note = ""
        if args.artifact:
            art = r1c.load_artifact(args.artifact)
        else:
            art, note = build(args.model, args.target, Path(tmp))
        vocab = Engine(art, page_size=args.page_size, num_pages=1).vocab_size
        requests = make_requests(args.requests, vocab, lens, news, args.seed)
        proc, host, port = start_server(art.path, args)
        try:
            one_request(host, port, requests[0])  # warm-up (first-call costs: kernel loading, allocations)
            before = engine_stats(host, port)
            http_results, http_wall = run_http(host, port, requests, args.concurrency)
            http_engine = stat_delta(engine_stats(host, port), before)
        finally:
            proc.terminate()
            proc.wait(60)
        http_ = summarize(http_results, http_wall) | http_engine
        direct, mismatches = None, None
        if not args.no_direct:
            engine = Engine(art, page_size=args.page_size, num_pages=args.num_pages, max_batch=args.max_batch)
            run_direct(engine, requests[:1], 1)  # the same warm-up, on the same engine
            before = dataclasses.asdict(engine.stats)
            direct_results, direct_wall = run_direct(engine, requests, args.concurrency)
            direct = summarize(direct_results, direct_wall) | stat_delta(dataclasses.asdict(engine.stats), before)
            mismatches = sum(h.get("tokens") != d["tokens"] for h, d in zip(http_results, direct_results))
    settings = vars(args) | {"target": art.target, "target_note": note, "artifact": args.artifact}
    report(http_, direct, mismatches, settings)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {
        "provenance": f"python bench/serve_load.py {' '.join(sys.argv[1:])} on {info['host']} ({info['cores']} cores, "
        f"load {info['load_avg_at_start'][0]:.1f}) at {now}, r1c git {info['git']}",
        "machine": info,
        "settings": settings,
        "http": http_,
        "in_process": direct,
        "token_mismatches": mismatches,
        "http_overhead": {
            "throughput_ratio": http_["output_tokens_per_s"] / direct["output_tokens_per_s"],
            "ttft_p50_extra_s": http_["ttft_s"]["p50"] - direct["ttft_s"]["p50"],
        }
        if direct and http_["ttft_s"]
        else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if http_["errors"] or (direct and direct["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
