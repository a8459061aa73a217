"""The GPU machine has no TVM (its wheel is too large to carry there): compiling for ref or cuda, and looking up any
target, must not import tvm. Checked in a fresh interpreter whose import of tvm fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

SCRIPT = f"""
import sys, tempfile

class NoTVM:
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" or name.startswith("tvm."):
            raise ImportError("tvm is not installed on this machine")

sys.meta_path.insert(0, NoTVM())
import r1c
from r1c.backends import all_targets, get_target
from r1c.frontends.dsl import load

for t in all_targets():
    get_target(t)
art = r1c.compile(load({str(ROOT / "examples" / "r1-tiny.r1")!r}), target="ref", out_dir=tempfile.mkdtemp())
print("ok", art.target, "tvm" in sys.modules)
"""


def test_targets_load_without_tvm():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "ref", "False"]
