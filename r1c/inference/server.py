"""`r1c serve`: an OpenAI-compatible HTTP endpoint over the inference engine, on Python's `http.server`.

    POST /v1/completions   a completion (JSON, or Server-Sent Events with "stream": true)
    GET  /v1/models        the one model served
    GET  /health           200 {"status": "ok", ...}, or 503 while shutting down or after the engine failed

Each connection gets a handler thread (ThreadingHTTPServer); handlers submit requests to the `EngineDriver`
thread, which batches them in the engine, and block on their own event queue. A client that goes away (a failed
write, or its socket at EOF: `ClientWatch`) has its request aborted so that its pages are freed. JSON responses
keep HTTP/1.1 connections alive; a stream closes its connection after `data: [DONE]`.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from r1c.inference.driver import EngineDriver, Event, Ticket
from r1c.inference.openai_protocol import ApiError, Completion, Limits, parse_completion
from r1c.inference.text_stream import TextStream
from r1c.inference.tokenizer import Tokenizer

ROUTES = {"/v1/completions": "POST", "/v1/models": "GET", "/health": "GET"}
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    limits: Limits
    max_body_bytes: int = 1 << 20


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold the process open at exit
    # socketserver's default listen backlog is 5: a burst of clients overflows it and the kernel drops their SYNs,
    # which they resend only after a second (seen as 1 s TTFT outliers in bench/serve_load.py with 16 clients).
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], driver: EngineDriver, tokenizer: Tokenizer | None, config: ServerConfig
    ) -> None:
        super().__init__(address, Handler)
        self.driver, self.tokenizer, self.config = driver, tokenizer, config
        self._active = 0  # completion handlers still writing (they outlive the driver's view of their request)
        self._active_cond = threading.Condition()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def track(self, delta: int) -> None:
        with self._active_cond:
            self._active += delta
            self._active_cond.notify_all()

    def stop(self, grace_s: float) -> None:
        """Refuse new completions (503), let those in flight finish for up to `grace_s` seconds (then they end with
        an error), and stop serving. Call it from another thread than the one in serve_forever()."""
        self.driver.shutdown(grace_s)
        with self._active_cond:  # the last responses are being written
            self._active_cond.wait_for(lambda: self._active == 0, timeout=5)
        self.shutdown()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CompletionServer
    server_version = "r1c"
    timeout = 120  # seconds a socket read or write may stall (an idle keep-alive client, a reader that stopped)
    _events_started = False  # a stream's 200 and headers are out: errors can only be sent as events
    _body_read = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per request on stderr would drown the startup line; errors still reach the client

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._body_read = self._events_started = False  # a kept-alive connection's handler serves many requests
        try:
            if path not in ROUTES:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            if ROUTES[path] != method:
                raise ApiError(405, f"{path} takes {ROUTES[path]}, not {method}", code="method_not_allowed")
            if path == "/v1/completions":
                self._completions()
            elif path == "/v1/models":
                self._send_json(200, self._models())
            else:
                self._health()
        except ApiError as e:
            if method == "POST" and not self._body_read:
                self.close_connection = True  # the unread body would be taken for the next request
            self._send_json(e.status, e.body())
        except DISCONNECTED:
            self.close_connection = True
        except Exception as e:  # a bug: the client gets a 500 (if no stream began), the traceback goes to stderr
            traceback.print_exc()
            self.close_connection = True
            if not self._events_started:
                self._send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _models(self) -> dict[str, Any]:
        model = {"id": self.server.config.model_name, "object": "model", "created": 0, "owned_by": "r1c"}
        return {"object": "list", "data": [model]}

    def _health(self) -> None:
        driver = self.server.driver
        if driver.failure is not None:
            raise ApiError(503, f"the engine failed: {driver.failure}")
        if driver.closing:
            raise ApiError(503, "the server is shutting down")
        self._send_json(200, {"status": "ok", "in_flight": driver.in_flight, "engine": driver.stats})

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            raise ApiError(411, "the request needs a Content-Length header (chunked bodies are not accepted)")
        try:
            size = int(self.headers["Content-Length"])
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
        limit = self.server.config.max_body_bytes
        if size > limit:
            raise ApiError(413, f"the request body has {size} bytes; the limit is {limit}", code="request_too_large")
        raw = self.rfile.read(size)
        self._body_read = True
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _completions(self) -> None:
        srv = self.server
        body = self._read_json()
        if isinstance(body, dict) and body.get("model") not in (None, srv.config.model_name):
            msg = f"the model '{body['model']}' does not exist; this server serves '{srv.config.model_name}'"
            raise ApiError(404, msg, "model", "model_not_found")
        req = parse_completion(body, srv.tokenizer, srv.config.limits)
        srv.track(+1)
        try:
            ticket = srv.driver.submit(req.prompt, req.params)
            text = TextStream(srv.tokenizer, req.stop_strings) if srv.tokenizer is not None else None
            outputs = _outputs(srv.driver, ticket, text, ClientWatch(self.connection))
            comp = Completion(srv.config.model_name)
            try:
                if req.stream:
                    self._stream(comp, outputs, len(req.prompt), req.include_usage)
                else:
                    parts = list(outputs)  # (text, token, finish reason) per token
                    text_out, tokens = "".join(p[0] for p in parts), [p[1] for p in parts]
                    self._send_json(200, comp.final(text_out, tokens, parts[-1][2], len(req.prompt)))
            except BaseException:  # the client went away (or a bug): the engine must not go on for nobody
                srv.driver.cancel(ticket)  # frees its pages; nothing if it had finished
                raise
        finally:
            srv.track(-1)

    def _stream(self, comp: Completion, outputs: Iterator, prompt_tokens: int, usage: bool) -> None:
        """Server-Sent Events: one `data: {chunk}` per token (text may be empty while a character or a possible
        stop string is incomplete), then `data: [DONE]`. The headers wait for the first token so that a request the
        engine refuses still gets its HTTP status; an error after that arrives as a `data: {"error": ...}` event."""
        count = 0
        try:
            for piece, token, reason in outputs:
                if not self._events_started:
                    self._start_events()
                count += 1
                self._event(comp.chunk(piece, [token], reason))
            if usage:
                self._event(comp.usage_chunk(prompt_tokens, count))
        except ApiError as e:
            if not self._events_started:
                raise
            self._event(e.body())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no Content-Length: the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        self._events_started = True

    def _event(self, obj: Any) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


class ClientWatch:
    """Notices a client that closed its connection while its request runs (a non-streaming one writes nothing
    until the end, and a queued stream nothing until its first token): at most every CHECK_S seconds, a socket
    that reads as at its end (EOF, or a reset) means the client is gone."""

    CHECK_S = 0.5

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.next = sock, time.monotonic() + self.CHECK_S

    def gone(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.CHECK_S
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""  # bytes: a pipelined next request
        except OSError:
            return True


def _outputs(
    driver: EngineDriver, ticket: Ticket, text: TextStream | None, watch: ClientWatch
) -> Iterator[tuple[str, int, str | None]]:
    """(new text, token, finish reason) per generated token; raises the request's ApiError if it fails, and
    ConnectionAbortedError if the client went away. A stop string ends the request here (the engine does not see
    text) by aborting it in the engine."""
    while True:
        try:
            ev: Event | None = ticket.events.get(timeout=watch.CHECK_S)
        except queue.Empty:
            ev = None
        if watch.gone():
            raise ConnectionAbortedError("the client closed its connection")
        if ev is None:
            continue
        if ev.error is not None:
            raise ev.error
        reason = ev.finish_reason
        piece = ""
        if text is not None:
            piece, stopped = text.push(ev.token)
            if reason is not None and not stopped:  # the engine ended it: the rest of the text
                rest, stopped = text.flush()
                piece += rest
            if stopped:  # a stop string ended it (the engine knows no text: abort it there)
                if reason is None:
                    driver.cancel(ticket)
                reason = "stop"
        yield piece, ev.token, reason
        if reason is not None:
            return


def open_server(
    engine: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokenizer: Tokenizer | None = None,
    model_name: str = "r1c",
    max_queue: int = 64,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = 1 << 20,
) -> CompletionServer:
    """A server bound to host:port (0: a free port; see `.url`) with its engine thread started; run
    `serve_forever()` and end with `stop()` from another thread, then `server_close()`. Up to
    engine.max_batch + max_queue requests are in flight; the token limits default to the engine's context."""
    # A request must fit the context limit and, alone, the whole pool (the engine refuses it otherwise).
    context = min(engine.max_seq_len, engine.num_pages * engine.page_size - engine.lookahead)
    limits = Limits(
        vocab_size=engine.vocab_size,
        max_prompt_tokens=min(max_prompt_tokens or context - 1, context - 1),
        max_tokens_limit=min(max_tokens_limit or context - 1, context - 1),
        max_total_tokens=context,
    )
    driver = EngineDriver(engine, capacity=engine.max_batch + max_queue)
    server = CompletionServer((host, port), driver, tokenizer, ServerConfig(model_name, limits, max_body_bytes))
    driver.start()
    return server
