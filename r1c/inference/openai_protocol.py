"""The OpenAI completions protocol as `r1c serve` speaks it: request validation and response bodies.

A request body is checked field by field; a bad one raises `ApiError` naming the field, which the server turns
into OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with the error's HTTP status.
Unknown fields are refused (400) rather than ignored so that a typo or an unsupported OpenAI feature
(logprobs, penalties, logit_bias, best_of, suffix) is never silently dropped.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from r1c.inference.sampling import SamplingParams
from r1c.inference.tokenizer import Tokenizer

D = TypeVar("D", int, None)  # an integer field's default: a number, or None (seed)

# OpenAI's error `type` per HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server refuses or cannot finish: HTTP status, message, and the offending field if any."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the `r1c serve` flags) and what the model accepts."""

    vocab_size: int
    max_prompt_tokens: int
    max_tokens_limit: int
    max_total_tokens: int  # prompt + completion tokens one request may hold in the paged cache


@dataclass(frozen=True)
class CompletionRequest:
    prompt: tuple[int, ...]
    params: SamplingParams
    stop_strings: tuple[str, ...]  # matched on the decoded text (needs a tokenizer); token-id stops are in params
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


# Fields that are accepted only at their default (they are OpenAI features this server does not implement).
_DEFAULT_ONLY = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
}
_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
_FIELDS |= {"stream_options", "user"} | set(_DEFAULT_ONLY)


def _int(body: dict[str, Any], name: str, default: D, lo: int, hi: int | None = None) -> int | D:
    v = body.get(name)
    if v is None:  # absent or null: the default, as in OpenAI's API
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json_type(v)}", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{name}' must be {bound}, got {v}", name, "invalid_value")
    return v


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a number, got {json_type(v)}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def json_type(v: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return "null" if v is None else names.get(type(v), "an object")


def _token_ids(v: Any, name: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise ApiError(400, f"'{name}' must be a string or an array of token ids", name, "invalid_type")
    bad = [t for t in v if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"'{name}': token id {bad[0]} is out of range [0, {vocab_size})", name, "invalid_value")
    return tuple(v)


def _prompt(body: dict[str, Any], tokenizer: Tokenizer | None, vocab_size: int) -> tuple[int, ...]:
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_field")
    p = body["prompt"]
    if isinstance(p, list) and p and all(isinstance(x, (list, str)) for x in p):
        if len(p) > 1:
            raise ApiError(400, "'prompt': only one prompt per request is supported", "prompt", "invalid_value")
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if tokenizer is None:
            raise ApiError(
                400, "'prompt' is text but the server has no tokenizer (start it with --tokenizer, or send token ids)",
                "prompt", "invalid_value",
            )  # fmt: skip
        ids = tuple(tokenizer.encode(p))
        _token_ids(list(ids), "prompt", vocab_size)  # a tokenizer bigger than the model's vocabulary
    else:
        ids = _token_ids(p, "prompt", vocab_size)
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
    return ids


def _stop(body: dict[str, Any], tokenizer: Tokenizer | None, vocab: int) -> tuple[tuple[str, ...], tuple]:
    """`stop`: a string or strings (matched on the text; needs a tokenizer), or arrays of token ids (an extension:
    the completion ends after the model produces that token sequence)."""
    v = body.get("stop")
    if v is None:
        return (), ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or len(items) > 16:
        raise ApiError(400, "'stop' must be a string, or an array of 1-16 strings or token-id arrays", "stop")
    if all(isinstance(s, str) for s in items):
        if tokenizer is None:
            raise ApiError(400, "'stop' strings need a tokenizer (start the server with --tokenizer)", "stop")
        if not all(items):
            raise ApiError(400, "'stop' strings must not be empty", "stop", "invalid_value")
        return tuple(items), ()
    if all(isinstance(s, list) for s in items):
        seqs = tuple(_token_ids(s, "stop", vocab) for s in items)
        if not all(seqs):
            raise ApiError(400, "'stop' token-id arrays must not be empty", "stop", "invalid_value")
        return (), seqs
    raise ApiError(400, "'stop' must be all strings or all token-id arrays", "stop", "invalid_type")


def parse_completion(body: Any, tokenizer: Tokenizer | None, limits: Limits) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(body)}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ApiError(400, f"unrecognized request field '{unknown[0]}'", unknown[0], "unknown_field")
    for name, default in _DEFAULT_ONLY.items():
        if name in body and body[name] not in (default, None):
            raise ApiError(400, f"'{name}' is not supported (only {default!r})", name, "unsupported_value")
    prompt = _prompt(body, tokenizer, limits.vocab_size)
    if len(prompt) > limits.max_prompt_tokens:
        msg = f"the prompt has {len(prompt)} tokens; this server accepts at most {limits.max_prompt_tokens}"
        raise ApiError(400, msg, "prompt", "prompt_too_long")
    max_tokens = _int(body, "max_tokens", 16, 1, limits.max_tokens_limit)
    room = limits.max_total_tokens - len(prompt)
    if max_tokens > room:
        msg = (
            f"'max_tokens' {max_tokens} + the prompt's {len(prompt)} tokens exceed the {limits.max_total_tokens} "
            f"tokens one request may hold in the cache"
        )
        raise ApiError(400, msg, "max_tokens", "context_length_exceeded")
    stop_strings, stop_seqs = _stop(body, tokenizer, limits.vocab_size)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {json_type(stream)}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold 'include_usage'", "stream_options")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_k=_int(body, "top_k", 0, 0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_int(body, "seed", None, 0, 2**63 - 1),
        stop_sequences=stop_seqs,
    )
    return CompletionRequest(prompt, params, stop_strings, bool(stream), bool(options.get("include_usage")))


@dataclass
class Completion:
    """One request's identity for the response bodies."""

    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"cmpl-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "token_ids": token_ids, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice])

    def final(self, text: str, token_ids: list[int], finish_reason: str | None, prompt_tokens: int) -> dict[str, Any]:
        return self.chunk(text, token_ids, finish_reason) | {"usage": usage(prompt_tokens, len(token_ids))}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._envelope([]) | {"usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
