"""The kernel cache: generated Triton source -> imported Python module, in memory and on disk.

`triton.jit` reads a kernel's source from its file, so every generated kernel is written to a real `.py` file and
imported from there. The key is the sha256 of the source and of the device it is meant for (GPU name and compute
capability, or the interpreter); the disk copy lives in `$R1C_CACHE_DIR` (default `~/.cache/r1c/kernels`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

_MEMORY: dict[str, ModuleType] = {}
STATS = {"memory_hits": 0, "disk_hits": 0, "misses": 0}


def cache_dir() -> Path:
    return Path(os.environ.get("R1C_CACHE_DIR") or Path.home() / ".cache" / "r1c" / "kernels")


def device_key() -> str:
    """What the compiled binaries depend on besides the source: the GPU model, or the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    import torch

    if not torch.cuda.is_available():
        return "nodevice"
    major, minor = torch.cuda.get_device_capability()
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    return f"{name}-sm{major}{minor}"


def key_of(source: str) -> str:
    return hashlib.sha256(f"{device_key()}\n{source}".encode()).hexdigest()


def load(source: str) -> ModuleType:
    """The imported module of `source`; written to the disk cache first when it is not there yet."""
    key = key_of(source)
    if key in _MEMORY:
        STATS["memory_hits"] += 1
        return _MEMORY[key]
    path = cache_dir() / device_key() / f"k_{key[:32]}.py"
    if path.is_file() and path.read_text() == source:
        STATS["disk_hits"] += 1
    else:
        STATS["misses"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    name = f"r1c_kernel_{key[:32]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton.jit looks the module up while decorating
    spec.loader.exec_module(module)
    _MEMORY[key] = module
    return module


def clear_memory() -> None:
    """Forget the imported modules (the disk cache stays): the next load of a source is a disk hit."""
    _MEMORY.clear()
