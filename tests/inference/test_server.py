"""`r1c serve` (r1c.inference.server) on r1-tiny's reference artifact: a server in this process on a free port,
spoken to over real sockets. Completions must give the tokens `Engine.generate` gives for the same prompt and
parameters (greedy and seeded sampling), streamed or not, alone or concurrently; every error status is checked;
a streaming client that disconnects must free its pages; `r1c serve` as a process starts and stops on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from r1c.cli import main
from r1c.inference.engine import Engine
from r1c.inference.sampling import SamplingParams
from r1c.inference.server import CompletionServer, open_server
from r1c.inference.text_stream import TextStream
from r1c.inference.tokenizer import ByteTokenizer

PAGE, PAGES = 8, 48
SAMPLED = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 11}


@contextmanager
def serving(artifact, max_batch: int = 4, **options: Any) -> Iterator[CompletionServer]:
    engine = Engine(artifact, page_size=PAGE, num_pages=PAGES, max_batch=max_batch)
    server = open_server(engine, port=0, model_name="tiny", **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop(grace_s=0)
        server.server_close()
        thread.join(10)


def connect(server: CompletionServer) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=60)


def call(server: CompletionServer, method: str, path: str, body: Any = None, raw: bytes | None = None):
    """(status, parsed JSON body) of one request."""
    conn = connect(server)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def stream(server: CompletionServer, body: dict) -> list[Any]:
    """The parsed `data:` events of a streamed completion ("[DONE]" kept as the string)."""
    conn = connect(server)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = []
    for line in resp.read().decode().split("\n\n"):
        if line:
            assert line.startswith("data: ")
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return events


def alone(artifact, prompt: list[int], max_tokens: int, **sampling: Any) -> list[int]:
    """What the engine by itself generates for one request."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), **sampling)
    return Engine(artifact, page_size=PAGE, num_pages=PAGES).generate([prompt], params)[0]


PROMPT = [5, 77, 300, 12, 9, 401]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, SAMPLED], ids=["greedy", "seeded"])
def test_completion_equals_engine(tiny_ref, sampling):
    want = alone(tiny_ref, PROMPT, 10, **dict(sampling))
    with serving(tiny_ref) as srv:
        status, out = call(srv, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 10} | sampling)
        streamed = stream(
            srv, {"prompt": PROMPT, "max_tokens": 10, "stream_options": {"include_usage": True}} | sampling
        )
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["token_ids"] == want and choice["finish_reason"] == "length" and choice["text"] == ""
    assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 10, "total_tokens": 16}
    # streamed: one chunk per token, the finish reason on the last, then the usage chunk and [DONE]
    assert streamed[-1] == "[DONE]" and streamed[-2]["choices"] == [] and streamed[-2]["usage"] == out["usage"]
    chunks = [e["choices"][0] for e in streamed[:-2]]
    assert [c["token_ids"] for c in chunks] == [[t] for t in want]
    assert [c["finish_reason"] for c in chunks] == [None] * 9 + ["length"]


def test_concurrent_requests_get_what_they_get_alone(tiny_ref):
    cases = [
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 6, {"temperature": 0.0}),
        ([42], 9, SAMPLED),
        ([100, 200, 300], 4, {"temperature": 0.0}),
        ([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], 5, SAMPLED | {"seed": 3}),
        ([511, 0, 256], 8, {"temperature": 1.3, "seed": 99}),
        ([64, 65], 7, {"temperature": 0.0}),
    ]
    want = [alone(tiny_ref, p, n, **dict(s)) for p, n, s in cases]
    got: list[Any] = [None] * len(cases)

    def client(i: int) -> None:
        p, n, s = cases[i]
        if i % 2:
            got[i] = [e["choices"][0]["token_ids"][0] for e in stream(srv, {"prompt": p, "max_tokens": n} | s)[:-1]]
        else:
            got[i] = call(srv, "POST", "/v1/completions", {"prompt": p, "max_tokens": n} | s)[1]["choices"][0]
            got[i] = got[i]["token_ids"]

    with serving(tiny_ref, max_batch=3) as srv:  # 6 requests, 3 at a time: admission while others decode
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert srv.driver.wait_idle(5)
        assert srv.driver.engine.stats.target_calls < sum(n for _, n, _ in cases)  # requests were batched
    assert got == want


def test_stop_token_sequences(tiny_ref):
    full = alone(tiny_ref, PROMPT, 12)
    stop = full[4:6]  # ends the completion after its 6th token (if the pair first appears there)
    cut = next(i + 2 for i in range(len(full) - 1) if full[i : i + 2] == stop)
    with serving(tiny_ref) as srv:
        _, out = call(
            srv, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]}
        )
    assert out["choices"][0]["token_ids"] == full[:cut] and out["choices"][0]["finish_reason"] == "stop"


class CharTokenizer:
    """One printable character per token id: r1-tiny's output is mostly not valid UTF-8 as bytes, and stop strings
    need text that can be matched."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x100 + i) for i in ids)


def test_text_prompt(tiny_ref):
    tok = ByteTokenizer()
    full = alone(tiny_ref, tok.encode("Hello, r1c!"), 8)
    with serving(tiny_ref, tokenizer=tok) as srv:
        _, out = call(srv, "POST", "/v1/completions", {"prompt": "Hello, r1c!", "max_tokens": 8, "temperature": 0})
    assert out["choices"][0]["token_ids"] == full and out["choices"][0]["text"] == tok.decode(full)
    assert out["usage"]["prompt_tokens"] == len("Hello, r1c!")


def test_stop_strings(tiny_ref):
    tok = CharTokenizer()
    full = alone(tiny_ref, PROMPT, 16)
    text = tok.decode(full)
    stop = text[5] + text[6]  # ends the completion once its 7th token is out (if the pair first appears there)
    cut = text.index(stop)
    body = {"prompt": tok.decode(PROMPT), "max_tokens": 16, "temperature": 0}
    with serving(tiny_ref, tokenizer=tok) as srv:
        _, out = call(srv, "POST", "/v1/completions", body | {"stop": ["never seen", stop]})
        chunks = [e["choices"][0] for e in stream(srv, body | {"stop": stop})[:-1]]
        assert srv.driver.wait_idle(5) and srv.driver.engine.pages.free_pages == PAGES  # the stop aborted it
    choice = out["choices"][0]
    assert choice["text"] == text[:cut] and choice["finish_reason"] == "stop"
    assert choice["token_ids"] == full[: cut + 2]  # up to the token that completed the stop string
    assert "".join(c["text"] for c in chunks) == text[:cut] and [c["token_ids"][0] for c in chunks] == full[: cut + 2]
    assert [c["finish_reason"] for c in chunks] == [None] * (cut + 1) + ["stop"]


def test_text_stream_characters_and_stop_prefixes():
    s = TextStream(ByteTokenizer(), ("ab",))
    assert [s.push(t) for t in "é".encode()] == [("", False), ("é", False)]  # two bytes, one character
    assert [s.push(t) for t in b"xa"] == [("x", False), ("", False)]  # "a" may begin "ab": held back
    assert s.push(ord("c")) == ("ac", False)
    assert [s.push(t) for t in b"zab"] == [("z", False), ("", False), ("", True)]
    s = TextStream(ByteTokenizer(), ("ab",))
    assert [s.push(t) for t in b"xa"] + [s.flush()] == [("x", False), ("", False), ("a", False)]
    s = TextStream(ByteTokenizer())
    assert [s.push(t) for t in (0xC3, 300)] + [s.flush()] == [("", False), ("", False), ("\ufffd\ufffd", False)]


def test_models_and_health(tiny_ref):
    with serving(tiny_ref) as srv:
        assert call(srv, "GET", "/v1/models")[1]["data"][0]["id"] == "tiny"
        status, health = call(srv, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["in_flight"] == 0
        call(srv, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        stats = call(srv, "GET", "/health")[1]["engine"]
        assert stats["generated_tokens"] == 3 and stats["prefill_tokens"] == len(PROMPT)
        nulls = {"max_tokens": None, "seed": None, "stream": None, "stop": None, "temperature": 0}  # null: default
        out = call(srv, "POST", "/v1/completions", {"prompt": PROMPT} | nulls)[1]
        assert out["choices"][0]["token_ids"] == alone(tiny_ref, PROMPT, 16)


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 512]}, 400, "prompt"),
    ({"prompt": [[1, 2], [3]]}, 400, "prompt"),
    ({"prompt": "text needs a tokenizer"}, 400, "prompt"),
    ({"prompt": [1], "n": 2}, 400, "n"),
    ({"prompt": [1], "echo": True}, 400, "echo"),
    ({"prompt": [1], "logprobs": 3}, 400, "logprobs"),
    ({"prompt": [1], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1], "max_tokens": 1000}, 400, "max_tokens"),
    ({"prompt": [1], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": [1], "temperature": -1}, 400, "temperature"),
    ({"prompt": [1], "top_p": 0}, 400, "top_p"),
    ({"prompt": [1], "top_k": True}, 400, "top_k"),
    ({"prompt": [1], "seed": "x"}, 400, "seed"),
    ({"prompt": [1], "stop": "text"}, 400, "stop"),
    ({"prompt": [1], "stop": [[]]}, 400, "stop"),
    ({"prompt": [1], "stream": "yes"}, 400, "stream"),
    ({"prompt": [1], "temprature": 0}, 400, "temprature"),
    ({"prompt": [1], "model": "gpt-4"}, 404, "model"),
    ({"prompt": list(range(40))}, 400, "prompt"),  # over --max-prompt-tokens 32
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_request(tiny_ref, body, status, param):
    with serving(tiny_ref, max_prompt_tokens=32) as srv:
        raw = body if isinstance(body, bytes) else None
        got, out = call(srv, "POST", "/v1/completions", body, raw=raw)
        assert srv.driver.in_flight == 0
    assert got == status, out
    err = out["error"]
    assert err["param"] == param, err
    assert err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert err["message"] and (param is None or param in err["message"])


def test_http_errors(tiny_ref):
    with serving(tiny_ref, max_body_bytes=100) as srv:
        assert call(srv, "GET", "/v1/nothing")[0] == 404
        assert call(srv, "POST", "/v2/completions", {"prompt": [1]})[0] == 404
        status, out = call(srv, "GET", "/v1/completions")
        assert status == 405 and "POST" in out["error"]["message"]
        assert call(srv, "POST", "/health", {})[0] == 405
        status, out = call(srv, "POST", "/v1/completions", {"prompt": list(range(50))})
        assert status == 413 and "100" in out["error"]["message"]
        # a kept-alive connection still works after an error that left the body unread (it is closed, not reused)
        conn = connect(srv)
        conn.request("POST", "/v1/nothing", body=b'{"prompt": [1]}')
        assert conn.getresponse().status == 404
        conn.close()


def test_token_limits(tiny_ref):
    with serving(tiny_ref, max_tokens_limit=100) as srv:  # the context is the pool: 48 pages of 8 = 384 tokens
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 101})
        assert status == 400 and "between 1 and 100" in out["error"]["message"]
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [7] * 300, "max_tokens": 85})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [7] * 300, "max_tokens": 84, "temperature": 0})
        assert status == 200 and out["usage"]["total_tokens"] == 384
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [7] * 384})
        assert status == 400 and out["error"]["param"] == "prompt"


def test_request_body_framing(tiny_ref):
    with serving(tiny_ref) as srv:
        for headers in ({}, {"Transfer-Encoding": "chunked"}):
            conn = connect(srv)
            conn.putrequest("POST", "/v1/completions")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]["message"]
            conn.close()


def open_stream(srv: CompletionServer, body: dict) -> tuple[http.client.HTTPConnection, Any]:
    """A streamed completion whose first token has arrived (so the request is running in the engine)."""
    conn = connect(srv)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.fp.readline()[len(b"data: ") :])["choices"][0]["token_ids"]
    return conn, resp


def test_queue_full_then_disconnect_frees_pages(tiny_ref):
    with serving(tiny_ref, max_batch=1, max_queue=0) as srv:
        engine = srv.driver.engine
        _, resp = open_stream(srv, {"prompt": PROMPT, "max_tokens": 300, "temperature": 0})
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2})
        assert status == 429 and out["error"]["type"] == "rate_limit_error"
        assert engine.pages.free_pages < PAGES
        resp.close()  # the client goes away mid-stream (the response owns the socket of a closing connection)
        assert srv.driver.wait_idle(20)
        assert not engine.has_work() and engine.pages.free_pages == PAGES
        assert engine.stats.generated_tokens < 300  # aborted, not run to its end
        assert call(srv, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2, "temperature": 0})[0] == 200


def test_disconnect_without_stream_frees_pages(tiny_ref):
    with serving(tiny_ref) as srv:
        engine = srv.driver.engine
        conn = connect(srv)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 300}))
        deadline = time.monotonic() + 20
        while engine.stats.generated_tokens == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # until it runs
        conn.close()  # gone before its response
        assert srv.driver.wait_idle(20) and engine.pages.free_pages == PAGES
        assert 0 < engine.stats.generated_tokens < 300


def test_shutdown_ends_in_flight_and_refuses_new(tiny_ref):
    with serving(tiny_ref) as srv:
        conn, resp = open_stream(srv, {"prompt": PROMPT, "max_tokens": 300, "temperature": 0})
        stopper = threading.Thread(target=srv.stop, args=(0,))
        stopper.start()
        rest = resp.read().decode().strip().split("\n\n")
        stopper.join(10)
        conn.close()
        assert rest[-1] == "data: [DONE]" and "shut down" in json.loads(rest[-2][len("data: ") :])["error"]["message"]
        assert not srv.driver.engine.has_work() and srv.driver.engine.pages.free_pages == PAGES
    with serving(tiny_ref) as srv:
        srv.driver.shutdown(0)
        assert call(srv, "GET", "/health")[0] == 503
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [1]})
        assert status == 503 and out["error"]["type"] == "service_unavailable"


def test_engine_failure(tiny_ref):
    with serving(tiny_ref) as srv:

        def broken_step() -> list:
            raise RuntimeError("deliberately broken step")

        srv.driver.engine.step = broken_step
        status, out = call(srv, "POST", "/v1/completions", {"prompt": [1], "stream": True})
        assert status == 500 and "deliberately broken step" in out["error"]["message"]
        assert call(srv, "GET", "/health")[0] == 503
        assert call(srv, "POST", "/v1/completions", {"prompt": [1]})[0] == 503


def test_cli_serve_process(tiny_ref):
    cmd = [sys.executable, "-m", "r1c.cli", "serve", str(tiny_ref.path), "--port", "0", "--num-pages", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {})
    try:
        line = proc.stdout.readline()
        assert line.startswith("r1c serve: http://127.0.0.1:") and "16 pages" in line, line + proc.stderr.read()
        host, port = line.split()[2][len("http://") :].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
        conn.request("GET", "/v1/models")  # on the same (kept-alive) connection
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "r1_tiny"  # the module's name
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_cli_serve_errors(tiny_ref, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["serve", str(tiny_ref.path), "--tokenizer", str(tmp_path / "tok.json")]) == 1
    assert "no such tokenizer file" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_ref.path), "--port", str(taken.getsockname()[1])]) == 1
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
