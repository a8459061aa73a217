"""Golden-file format for pass tests (MLIR-style: IR in, exact IR out).

// RUN: canonicalize,cse            the pipeline
// ENV: B=2,S=4                     optional: symbolic dim sizes for the numerics check
// INPUT-INVALID                    optional: the input must fail the verifier (stale types); no numerics
// NO-NUMERICS: <why>               optional: the random-input check cannot apply (the pass changes the signature,
                                    inputs must be valid page tables); the test named in <why> checks numerics
module @m { ... }                   the input IR
// CHECK:
module @m { ... }                   the exact expected output of print_module
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class GoldenFormatError(ValueError):
    pass


@dataclass
class Golden:
    path: Path
    pipeline: str
    input_ir: str
    expected: str
    env: dict[str, int] = field(default_factory=lambda: {"B": 2, "S": 4})
    input_invalid: bool = False
    no_numerics: str = ""


def load(path: Path) -> Golden:
    text = path.read_text()
    lines = text.splitlines()
    if not lines or not lines[0].startswith("// RUN:"):
        raise GoldenFormatError(f"{path}:1: a golden file starts with '// RUN: <pipeline>'")
    checks = [i for i, line in enumerate(lines) if line.strip() == "// CHECK:"]
    if len(checks) != 1:
        raise GoldenFormatError(f"{path}: needs exactly one '// CHECK:' line, found {len(checks)}")
    g = Golden(
        path,
        lines[0][len("// RUN:") :].strip(),
        "\n".join(lines[: checks[0]]) + "\n",
        "\n".join(lines[checks[0] + 1 :]).strip() + "\n",
    )
    for i, line in enumerate(lines[1 : checks[0]], start=2):
        if line.startswith("// ENV:"):
            g.env = {k.strip(): int(v) for k, v in (p.split("=") for p in line[len("// ENV:") :].split(","))}
        elif line.strip() == "// INPUT-INVALID":
            g.input_invalid = True
        elif line.startswith("// NO-NUMERICS:"):
            g.no_numerics = line[len("// NO-NUMERICS:") :].strip()
            if not g.no_numerics:
                raise GoldenFormatError(f"{path}:{i}: NO-NUMERICS needs a reason naming the test that checks them")
        elif line.startswith("//") and line[2:].lstrip().split(":")[0].isupper():
            raise GoldenFormatError(f"{path}:{i}: unknown directive {line!r}")
    return g
