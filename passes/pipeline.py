"""Textual pipelines: `canonicalize,cse,kv-quant{dtype=int8,block=64},shape-inference{bind="B=1,S=128"}`.

Grammar: items separated by commas; an item is a pass name, optionally followed by `{key=value, ...}`.
A value is a double-quoted string (backslash escapes `"` and `\\`) or a bare word (anything up to `,`,
`}` or whitespace). Values stay text here; each pass's option types convert them (see registry.py).
"""

from __future__ import annotations

import re
from typing import Any

from r1c.passes.registry import PipelineError, get_pass

PipelineSpec = list[tuple[str, dict[str, Any]]]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_BARE = re.compile(r"[^,{}\"\s=]+")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, message: str, pos: int | None = None) -> PipelineError:
        pos = self.pos if pos is None else pos
        return PipelineError(f"pipeline:1:{pos + 1}: {message}\n  {self.text}\n  {' ' * pos}^")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str, context: str) -> None:
        got = self.peek()
        if got != ch:
            raise self.error(f"expected '{ch}' {context}, got {repr(got) if got else 'end of pipeline'}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> tuple[str, int]:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            got = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of pipeline"
            raise self.error(f"expected {what}, got {got}")
        self.pos = m.end()
        return m.group(), m.start()

    def string(self) -> str:
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
                ch = self.text[self.pos]
            out.append(ch)
            self.pos += 1
        raise self.error("unterminated string", start)


def parse_pipeline(text: str) -> PipelineSpec:
    """Parse and check a pipeline: every pass exists and every option is known and well-typed."""
    s = _Scanner(text)
    out: PipelineSpec = []
    if not s.peek():
        return out
    while True:
        name, name_pos = s.match(_NAME, "a pass name")
        try:
            info = get_pass(name)
        except PipelineError as e:
            raise s.error(str(e), name_pos) from None
        raw: dict[str, Any] = {}
        if s.peek() == "{":
            s.pos += 1
            while s.peek() != "}":
                key, key_pos = s.match(_NAME, "an option name")
                if key in raw:
                    raise s.error(f"option '{key}' of pass '{name}' is given twice", key_pos)
                s.expect("=", f"after option '{key}'")
                raw[key] = s.string() if s.peek() == '"' else s.match(_BARE, f"a value for option '{key}'")[0]
                try:
                    info.convert_option(key, raw[key])
                except PipelineError as e:
                    raise s.error(str(e), key_pos) from None
                if s.peek() != "}":
                    s.expect(",", "between options")
            s.pos += 1
        try:
            info.bind_options(raw)  # required options
        except PipelineError as e:
            raise s.error(str(e), name_pos) from None
        out.append((name, raw))
        if not s.peek():
            return out
        s.expect(",", "between passes")
