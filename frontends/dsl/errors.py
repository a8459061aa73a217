"""Source positions and the one error type of the DSL frontend."""

from __future__ import annotations

from dataclasses import dataclass


class SourceFile:
    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.text = text
        self.lines = text.splitlines()

    def __repr__(self) -> str:
        return f"SourceFile({self.filename!r})"

    def line(self, n: int) -> str:
        return self.lines[n - 1] if 1 <= n <= len(self.lines) else ""


@dataclass(frozen=True)
class Pos:
    file: SourceFile
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file.filename}:{self.line}:{self.col}"

    def __repr__(self) -> str:
        return f"Pos({self})"


class DSLError(Exception):
    """`file:line:col: error: message`, the source line, a caret under the offending text, and a hint."""

    def __init__(
        self,
        message: str,
        pos: Pos | None = None,
        hint: str = "",
        notes: list[str] | None = None,
        filename: str = "<unknown>",
    ) -> None:
        self.message = message
        self.hint = hint
        self.notes = list(notes or [])
        self.pos = pos
        self.filename = pos.file.filename if pos else filename
        self.line = pos.line if pos else 1
        self.col = pos.col if pos else 1
        self.source_line = pos.file.line(pos.line) if pos else ""
        super().__init__(str(self))

    @property
    def caret(self) -> str:
        if self.pos is None or not self.source_line:
            return ""
        width = (
            self.pos.end_col - self.pos.col
            if self.pos.end_line == self.pos.line
            else len(self.source_line) - self.col + 1
        )
        # keep tabs so the caret lines up under tab-indented source
        lead = "".join(c if c == "\t" else " " for c in self.source_line[: self.col - 1])
        return lead + "^" + "~" * max(0, width - 1)

    def __str__(self) -> str:
        out = [f"{self.filename}:{self.line}:{self.col}: error: {self.message}"]
        if self.source_line:
            out += [f"  {self.source_line}", f"  {self.caret}"]
        if self.hint:
            out.append(f"hint: {self.hint}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)
