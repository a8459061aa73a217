"""The inference engine: continuous batching of generation requests over one paged KV pool.

Each `step()` is one scheduler iteration:
  1. admit waiting requests (FIFO, up to max_batch running) whose pages fit next to what the running ones need this
     step, and prefill them, with the requests still in a chunked prefill: one paged step per distinct feed length
     (equal lengths share a call); with `prefill_chunk` N a request feeds at most N tokens a step, so a long prompt
     is spread over several steps while the others keep decoding, and samples its first token after its last chunk;
  2. one decode step (S = 1) for every request that had finished its prefill before this iteration, all rows
     together, each at its own length (`start`), or a speculative step when the engine has a draft (speculative.py).
A request's pages grow as it does. When a running request cannot get its next page, the latest-arrived running
request is preempted: its pages are freed and it goes back to the front of the queue, to be recomputed (its prompt
and the tokens it produced prefilled again; its random generator keeps its state, so sampling continues as it
would have). A request that could never fit the pool is refused at add_request, so the queue always drains.

No thread safety: one thread drives the engine (a server's loop), as the API in docs/inference.md says.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from r1c.api import InputError
from r1c.artifact import Artifact, ArtifactError
from r1c.inference.executor import Executor, executor_for
from r1c.inference.pages import OutOfPages, PageAllocator
from r1c.inference.sampling import SamplingParams, sample, stop_reason

if TYPE_CHECKING:
    from r1c.inference.speculative import Speculator

DEFAULT_PAGE_SIZE, DEFAULT_NUM_PAGES, DEFAULT_MAX_SEQ_LEN = 16, 256, 4096


@dataclass(frozen=True)
class TokenEvent:
    """One token of one request; finish_reason is None while it goes on, else "stop" or "length" (its last)."""

    request_id: int
    token: int
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """What the engine measured so far (seconds are wall time inside step calls of the executors)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens fed to prefill calls
    generated_tokens: int = 0
    target_calls: int = 0  # paged steps of the model (prefill and decode/verify)
    decode_calls: int = 0  # target calls that decoded or verified for running requests
    decode_rows: int = 0  # rows over those calls
    decode_tokens: int = 0  # tokens they produced (speculative: more than one per row)
    preemptions: int = 0
    draft_calls: int = 0
    proposed: int = 0  # draft tokens proposed / accepted by the target (speculative decoding)
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_row_step(self) -> float:
        """Tokens a running request gains per decode (or verify) call: 1 plain, up to k + 1 speculative."""
        return self.decode_tokens / self.decode_rows if self.decode_rows else 0.0


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator | None
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of prompt + output held in the pool
    prefilled: bool = False  # its prefill is complete (it decodes from the next step on)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Generation over a compiled paged step (see the module docstring); `artifact` is an Artifact, its directory,
    or an Executor. page_size / num_pages default to what a static-shape build fixed, else 16 and 256. max_seq_len,
    the context limit (prompt + output of one request; the block table's width), defaults to what a fixed block
    table reaches, else 4096; a request that could outgrow the pool before reaching its limits is refused.
    With `draft` (an artifact of a smaller model with the same vocabulary) and `speculate` k > 0, decoding is
    speculative (speculative.py): the draft proposes k tokens, the target verifies them in one call."""

    def __init__(
        self,
        artifact: Artifact | str | Path | Executor,
        *,
        page_size: int | None = None,
        num_pages: int | None = None,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        entry: str | None = None,
        draft: Artifact | str | Path | Executor | None = None,
        speculate: int = 0,
        prefill_chunk: int | None = None,
    ) -> None:
        self.executor = _as_executor(artifact, entry)
        fixed = self.executor.fixed
        for role in ("batch", "steps"):
            if role in fixed:
                raise ArtifactError(
                    f"the engine varies the batch and the tokens per step, but this build fixes the {role} to "
                    f"{fixed[role]}; compile without binding {self.executor.signature.dims[role]} in --shapes"
                )
        self.page_size = _pick("page size", page_size, fixed.get("page_size"), DEFAULT_PAGE_SIZE)
        self.num_pages = _pick("page count", num_pages, fixed.get("pages"), DEFAULT_NUM_PAGES)
        if (draft is None) != (speculate < 1):
            raise InputError("speculative decoding needs both a draft artifact and speculate >= 1 tokens")
        self.lookahead = speculate if draft is not None else 0  # positions a verify step writes past a row's length
        width = fixed.get("table")
        reach = width * self.page_size - self.lookahead if width else None  # what a fixed block table can address
        self.max_seq_len = max_seq_len if max_seq_len is not None else reach or DEFAULT_MAX_SEQ_LEN
        if self.max_seq_len < 2 or (reach and self.max_seq_len > reach):
            limit = f"in [2, {reach}] (what the build's fixed block table reaches)" if reach else "at least 2"
            raise InputError(f"max_seq_len must be {limit}, got {max_seq_len}")
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.vocab_size = self.executor.signature.vocab_size
        self.table_width = width or -(-(self.max_seq_len + self.lookahead) // self.page_size)
        self.pages = PageAllocator(self.num_pages, self.page_size)
        self.pools = self.executor.new_pools(self.num_pages, self.page_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.stats = EngineStats()
        self._next_id = 0
        self.speculator: Speculator | None = None
        if draft is not None:
            from r1c.inference.speculative import Speculator

            self.speculator = Speculator(self, _as_executor(draft, None), speculate)

    # ---- the API ----

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; its id names its TokenEvents. Errors (InputError) for a prompt the model cannot take."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("a prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range [0, {self.vocab_size}) (the vocabulary)")
        if len(prompt) >= self.max_seq_len:
            raise InputError(
                f"a prompt of {len(prompt)} tokens leaves no room to generate: the context limit is "
                f"{self.max_seq_len} tokens (prompt + output)"
            )
        # The pool must hold every token but the last at the longest the request may reach.
        longest = min(len(prompt) + params.max_new_tokens, self.max_seq_len)
        need = self.pages.pages_for(longest - 1 + self.lookahead)
        if need > self.num_pages:
            raise InputError(
                f"the request can never fit: {len(prompt)} prompt + {params.max_new_tokens} new tokens need {need} "
                f"pages of {self.page_size} tokens, the pool has {self.num_pages}; use more pages or fewer tokens"
            )
        rng = None if params.greedy else np.random.default_rng(params.seed)
        req = Request(self._next_id, prompt, params, rng)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def step(self) -> list[TokenEvent]:
        """One scheduler iteration (module docstring): the tokens it produced, in request order per call."""
        decoding = [r for r in self.running if r.prefilled]
        prefilling = [r for r in self.running if not r.prefilled] + self._admit()
        events = self._prefill(prefilling) if prefilling else []
        decoding = [r for r in decoding if r in self.running]
        if decoding:
            events += self.speculator.step(decoding) if self.speculator else self._decode(decoding)
        return events

    def abort(self, request_id: int) -> bool:
        """Drop a request, waiting or running, and free its pages; False if it is not (or no longer) active."""
        for req in list(self.waiting):
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        for req in self.running:
            if req.id == request_id:
                self._finish(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[list[int]]:
        """Run the prompts to completion (one params for all, or one per prompt); the output tokens of each."""
        each = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(each)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, each)]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for ev in self.step():
                if ev.request_id in out:
                    out[ev.request_id].append(ev.token)
        return [out[i] for i in ids]

    # ---- scheduling ----

    def _growth(self, req: Request) -> int:
        """Pages a running request needs for its next decode (or verify) step."""
        return self.pages.missing(req.id, self._step_reach(req))

    def _step_reach(self, req: Request) -> int:
        return len(req.tokens) + self.lookahead

    def _admit(self) -> list[Request]:
        """Take waiting requests (FIFO) while the batch has room and their prefill fits beside the running
        requests' growth this step (so admitting never forces a preemption)."""
        admitted: list[Request] = []
        reserved = sum(self._growth(r) for r in self.running)
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = self.pages.missing(req.id, len(req.tokens))
            if need + reserved > self.pages.free_pages:
                break  # FIFO: later requests wait too, so a long one is not starved by short ones
            self.pages.reserve(req.id, len(req.tokens))
            self.waiting.popleft()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> list[TokenEvent]:
        """Feed each request the tokens it has not cached (its prompt; after a preemption, its output too), at most
        prefill_chunk of them, one call per distinct feed length and ending; a request whose feed reaches its last
        token samples its next one. A chunk that does not end its prompt is fed for the cache alone (the executor
        is asked for its argmax, the least it can return)."""
        events = []
        groups: dict[tuple[int, bool], list[Request]] = {}
        for r in reqs:
            left = len(r.tokens) - r.cached
            n = min(left, self.prefill_chunk or left)
            groups.setdefault((n, n == left), []).append(r)
        for (n, last), group in groups.items():
            t0 = time.perf_counter()
            feeds = [r.tokens[r.cached : r.cached + n] for r in group]
            if last:
                tokens = self.next_tokens(group, feeds)
            else:
                self.run_step(group, feeds, out="argmax")
            self.stats.prefill_seconds += time.perf_counter() - t0
            self.stats.prefill_tokens += n * len(group)
            for i, r in enumerate(group):
                r.cached += n
                if last:
                    r.prefilled = True
                    events.append(self.emit(r, tokens[i]))
        return events

    def _decode(self, reqs: list[Request]) -> list[TokenEvent]:
        reqs = self.make_room(reqs)
        if not reqs:
            return []
        t0 = time.perf_counter()
        tokens = self.next_tokens(reqs, [[r.tokens[-1]] for r in reqs])
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_calls += 1
        self.stats.decode_rows += len(reqs)
        self.stats.decode_tokens += len(reqs)
        events = []
        for r, token in zip(reqs, tokens):
            r.cached += 1
            events.append(self.emit(r, token))
        return events

    def make_room(self, reqs: list[Request]) -> list[Request]:
        """Reserve each row's pages for its next step, oldest first, preempting the latest-arrived running requests
        when the pool is full; returns the rows still running."""
        for r in sorted(reqs, key=lambda r: r.id):
            while r in self.running:
                try:
                    self.pages.reserve(r.id, self._step_reach(r))
                    break
                except OutOfPages:
                    self._preempt(max(self.running, key=lambda x: x.id))
        return [r for r in reqs if r in self.running]

    def _preempt(self, req: Request) -> None:
        self.pages.free(req.id)
        self.running.remove(req)
        req.cached, req.prefilled = 0, False
        self.waiting.appendleft(req)
        self.stats.preemptions += 1
        if self.speculator:
            self.speculator.forget(req)

    def run_step(self, reqs: list[Request], feeds: list[list[int]], out: str = "all") -> np.ndarray:
        """One paged step of the target for rows `reqs`, each fed its equal-length `feeds` row at its `cached`;
        `out` says what comes back (executor.OUTPUTS)."""
        tokens = np.asarray(feeds, np.int32)
        table = self.pages.block_table([r.id for r in reqs], self.table_width)
        start = np.asarray([r.cached for r in reqs], np.int32)
        result, self.pools = self.executor.step(tokens, self.pools, table, start, out=out)
        self.stats.target_calls += 1
        return result

    def next_tokens(self, reqs: list[Request], feeds: list[list[int]]) -> list[int]:
        """The token each row samples after its feed: an all-greedy batch asks the executor for the argmax alone
        (on a GPU, B ids cross to the host instead of B x V logits), any other for the last position's logits."""
        if all(r.params.greedy for r in reqs):
            return [int(t) for t in self.run_step(reqs, feeds, out="argmax")]
        logits = self.run_step(reqs, feeds, out="last")
        return [sample(row[0], r.params, r.rng) for r, row in zip(reqs, logits)]

    def emit(self, req: Request, token: int) -> TokenEvent:
        """Append a sampled token to req's output; finish it if a stop condition or the context limit is reached."""
        req.output.append(token)
        self.stats.generated_tokens += 1
        reason = stop_reason(req.output, req.params)
        if reason is None and len(req.tokens) >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self._finish(req)
        return TokenEvent(req.id, token, reason)

    def _finish(self, req: Request) -> None:
        self.pages.free(req.id)
        self.running.remove(req)
        if self.speculator:
            self.speculator.forget(req)


def _as_executor(source: Any, entry: str | None) -> Executor:
    if hasattr(source, "step") and hasattr(source, "new_pools"):
        return source
    return executor_for(source, entry=entry)


def _pick(what: str, asked: int | None, fixed: int | None, default: int) -> int:
    if fixed is not None and asked is not None and asked != fixed:
        raise InputError(f"the artifact is compiled for a {what} of {fixed}, asked for {asked}")
    value = asked if asked is not None else fixed if fixed is not None else default
    if value < 1:
        raise InputError(f"the {what} must be at least 1, got {value}")
    return value
