"""The thread that owns an inference `Engine` for the server.

The engine is not thread-safe, so one thread does everything to it: it takes commands (add a request, abort
one) from an inbox that handler threads append to, runs `engine.step()` while the engine has work, and hands each
`TokenEvent` to the request's own `queue.Queue`, which its handler thread blocks on. When there is neither work
nor a command, it sleeps on a condition variable (no polling).

Admission: at most `capacity` requests are in flight (running in the engine or waiting to be admitted by it);
one more is refused with 429. A failed `engine.step()` leaves the engine's state unknown: every request in flight
gets a 500 error and the driver refuses new ones (503) until the server is restarted.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

from r1c.inference.openai_protocol import ApiError
from r1c.inference.sampling import SamplingParams


@dataclass(frozen=True)
class Event:
    """What a request's handler receives: a token (with the finish reason on the last one) or an error."""

    token: int | None = None
    finish_reason: str | None = None
    error: ApiError | None = None


@dataclass(eq=False)
class Ticket:
    """One submitted request: its prompt and parameters, its events, and the engine's id once added."""

    prompt: tuple[int, ...]
    params: SamplingParams
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    request_id: int | None = None


class EngineDriver:
    def __init__(self, engine: Any, capacity: int) -> None:
        self.engine = engine
        self._capacity = capacity
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Ticket]] = []
        self._live: dict[int, Ticket] = {}  # engine request id -> ticket; touched by the engine thread only
        self._in_flight = 0
        self._closing = False  # no new requests (shutting down)
        self._stopped = False  # the engine thread should exit
        self._failure: str | None = None
        self._stats = dataclasses.asdict(engine.stats)
        self._thread = threading.Thread(target=self._run, name="r1c-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def stats(self) -> dict[str, Any]:
        """The engine's statistics (EngineStats) as of its last step."""
        with self._cond:
            return dict(self._stats)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def failure(self) -> str | None:
        return self._failure

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> Ticket:
        ticket = Ticket(tuple(prompt), params)
        with self._cond:
            if self._failure is not None:
                raise ApiError(503, f"the engine failed and serves no more requests: {self._failure}")
            if self._closing:
                raise ApiError(503, "the server is shutting down")
            if self._in_flight >= self._capacity:
                msg = f"too many requests in flight ({self._in_flight}); retry later"
                raise ApiError(429, msg, code="queue_full")
            self._in_flight += 1
            self._inbox.append(("add", ticket))
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Abort a request (its client went away, or a stop string ended it): the engine frees its pages."""
        with self._cond:
            self._inbox.append(("abort", ticket))
            self._cond.notify()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic()))

    def shutdown(self, grace_s: float) -> None:
        """Refuse new requests, let those in flight finish for up to `grace_s` seconds, abort the rest with a
        503 error, and stop the engine thread."""
        with self._cond:
            self._closing = True
        self.wait_idle(grace_s)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not (self._inbox or busy or self._stopped):
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopped = self._stopped
            for kind, ticket in commands:
                if kind == "add":
                    self._add(ticket)
                else:
                    self._abort(ticket)
            if stopped:
                for ticket in list(self._live.values()):
                    self._abort(ticket, ApiError(503, "the server shut down before the request finished"))
                return
            if busy or commands:
                busy = self._step()

    def _add(self, ticket: Ticket) -> None:
        if self._failure is not None:  # submitted just before the engine failed
            self._finish(ticket, ApiError(503, f"the engine failed: {self._failure}"))
            return
        try:
            ticket.request_id = self.engine.add_request(list(ticket.prompt), ticket.params)
        except Exception as e:  # a request the engine refuses fails alone
            self._finish(ticket, ApiError(400 if isinstance(e, ValueError) else 500, f"request refused: {e}"))
            return
        self._live[ticket.request_id] = ticket

    def _abort(self, ticket: Ticket, error: ApiError | None = None) -> None:
        if self._live.get(ticket.request_id) is ticket:  # not finished yet
            del self._live[ticket.request_id]
            self.engine.abort(ticket.request_id)
            self._finish(ticket, error)

    def _finish(self, ticket: Ticket, error: ApiError | None) -> None:
        if error is not None:
            ticket.events.put(Event(error=error))
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()  # wait_idle

    def _step(self) -> bool:
        """One engine iteration; returns whether the engine still has work."""
        if not self.engine.has_work():
            return False
        try:
            events = self.engine.step()
        except Exception as e:
            traceback.print_exc()
            self._fail(f"{type(e).__name__}: {e}")
            return False
        with self._cond:  # a copy for other threads (/health): the engine's own object changes under them
            self._stats = dataclasses.asdict(self.engine.stats)
        for ev in events:
            ticket = self._live.get(ev.request_id)
            if ticket is None:
                continue  # aborted in this iteration
            ticket.events.put(Event(ev.token, ev.finish_reason))
            if ev.finish_reason is not None:
                del self._live[ev.request_id]
                self._finish(ticket, None)
        return self.engine.has_work()

    def _fail(self, message: str) -> None:
        with self._cond:
            self._failure = message
        for ticket in self._live.values():
            self._finish(ticket, ApiError(500, f"the engine failed: {message}"))
        self._live.clear()
