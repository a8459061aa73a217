"""Tokens -> text for one completion, incrementally, with OpenAI `stop` strings.

Decoding token by token breaks multi-byte characters and tokenizers whose pieces depend on their neighbours, so
the new text of each token is found by decoding a short window of recent tokens twice (the method of Hugging
Face's text-generation-inference): with and without the new tokens; a window that ends in an incomplete character
(U+FFFD) waits for more tokens. Text that could be the start of a stop string is held back until it is known not
to be one, so a stop string never reaches the client and streamed text equals the non-streamed text.
"""

from __future__ import annotations

from r1c.inference.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self._tok, self._stops = tokenizer, stop_strings
        self._ids: list[int] = []
        self._prefix = self._read = 0  # the window ids[prefix:] is decoded; ids[prefix:read] were already read
        self._pending = ""  # decoded text not yet given out (it might begin a stop string)

    def push(self, token: int) -> tuple[str, bool]:
        """Adds a generated token; returns the text that may be sent now and whether a stop string was reached
        (the text then ends just before it and the completion is over)."""
        self._ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """The rest of the text when the completion ends (tokens still waiting to complete a character, text held
        back for the stop strings), and whether it holds a stop string (then it ends before it)."""
        self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> None:
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._pending += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            text, self._pending = self._pending[: min(hits)], ""
            return text, True
        if final:
            text, self._pending = self._pending, ""
            return text, False
        hold = max((n for s in self._stops for n in range(1, len(s)) if self._pending.endswith(s[:n])), default=0)
        cut = len(self._pending) - hold
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False
