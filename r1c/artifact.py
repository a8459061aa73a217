"""The artifact directory a target compiles to, and its loader.

    OUT/manifest.json        format version, versions, module/target/entry, I/O types, config, param count, sha256s
    OUT/module.ir            the compiled module as IR text
    OUT/weights.safetensors  every parameter
    OUT/...                  target-specific files (the cuda target's plan.json and kernels/*.py), hashed alike

The manifest is checked before anything is trusted: a missing or edited file is an error, not a surprise later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from r1c.ir.core import DimList, Module
from r1c.ir.interpreter import to_storage
from r1c.ir.types import DType

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IR_FILE = "module.ir"
WEIGHTS_FILE = "weights.safetensors"
# numpy has no bf16/fp8: the interpreter keeps those values (already rounded) in float32, and so does the file.
WIDENED = (DType.bf16, DType.fp8e4m3)


class ArtifactError(ValueError):
    """A missing, corrupted or incompatible artifact, or inputs that do not fit it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_attr(v: Any) -> Any:
    if isinstance(v, DType):
        return v.value
    if isinstance(v, (tuple, DimList)):
        return [_json_attr(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)  # JSON has no inf/nan
    return v


def param_count(module: Module) -> int:
    return sum(int(np.prod(p.type.concrete({}), dtype=np.int64)) for p in module.params.values())


def check_weights(module: Module, weights: dict[str, np.ndarray]) -> None:
    """Every declared parameter present with its declared shape, and nothing else."""
    missing = [n for n in module.params if n not in weights]
    extra = [n for n in weights if n not in module.params]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} parameter(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        if extra:
            parts.append(f"{len(extra)} unknown tensor(s): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise ArtifactError(f"weights do not match module @{module.name}: " + "; ".join(parts))
    for name, p in module.params.items():
        want = p.type.concrete({})
        if tuple(np.shape(weights[name])) != want:
            raise ArtifactError(
                f"weight {name} has shape {tuple(np.shape(weights[name]))}, module @{module.name} declares {p.type}"
            )


def input_limits(module: Module, function: str) -> dict[str, int]:
    """Integer inputs that index an embedding table, with the table's row count (the vocabulary size)."""
    f = module.functions[function]
    args = {a: a.name for a in f.args}
    return {
        args[op.operands[1]]: int(op.operands[0].type.shape[0])
        for op in f.body
        if op.name == "embedding" and op.operands[1] in args
    }


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    module: Module
    weights: dict[str, np.ndarray] = field(repr=False)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def entry(self) -> str:
        return self.manifest["entry"]

    def check_inputs(self, inputs: list[np.ndarray]) -> None:
        f = self.module.functions[self.entry]
        if len(inputs) != len(f.args):
            raise ArtifactError(
                f"@{f.name} takes {len(f.args)} input(s) "
                f"({', '.join(f'%{a.name}: {a.type}' for a in f.args)}), got {len(inputs)}"
            )
        limits = input_limits(self.module, self.entry)
        for a, x in zip(f.args, inputs):
            x = np.asarray(x)
            if a.type.rank != x.ndim:
                raise ArtifactError(f"input %{a.name}: expected {a.type} (rank {a.type.rank}), got shape {x.shape}")
            if not a.type.dtype.is_float and a.type.dtype != DType.bool and not np.issubdtype(x.dtype, np.integer):
                raise ArtifactError(f"input %{a.name}: expected integers ({a.type}), got {x.dtype}")
            if a.name in limits and x.size and (x.min() < 0 or x.max() >= limits[a.name]):
                bad = x.min() if x.min() < 0 else x.max()
                raise ArtifactError(
                    f"input %{a.name}: token id {bad} is out of range [0, {limits[a.name]}) "
                    f"(vocabulary size {limits[a.name]})"
                )

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        from r1c.backends import get_target

        target = get_target(self.target)
        if target.run is None:
            raise ArtifactError(f"artifacts of target '{self.target}' cannot be executed in this process")
        self.check_inputs(inputs)
        return target.run(self, [np.asarray(x) for x in inputs])


def write(
    out_dir: str | Path,
    module: Module,
    weights: dict[str, np.ndarray],
    target: str,
    entry: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Artifact:
    """Write module + weights + manifest to out_dir (created if needed; existing artifact files are replaced).

    `extra_files` (relative path -> text) are written too and hashed in the manifest like the others."""
    from safetensors.numpy import save_file

    import r1c
    from r1c.ir.printer import print_module

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entry = entry or module.main.name
    check_weights(module, weights)
    # Stored exactly as the interpreter holds them (bf16/fp8 rounded, kept in float32), contiguous for safetensors.
    arrays = {
        n: np.ascontiguousarray(to_storage(np.asarray(weights[n]), p.type.dtype)) for n, p in module.params.items()
    }
    (out / IR_FILE).write_text(print_module(module))
    save_file(arrays, str(out / WEIGHTS_FILE))
    extra = extra_files or {}
    for name, text in extra.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    f = module.functions[entry]
    manifest = {
        "format_version": FORMAT_VERSION,
        "r1c_version": r1c.__version__,
        "module": module.name,
        "target": target,
        "entry": entry,
        "inputs": [{"name": a.name, "type": str(a.type)} for a in f.args],
        "outputs": [{"name": r.name, "type": str(r.type)} for r in f.results],
        "config": {k: _json_attr(v) for k, v in module.attrs.items()},
        "parameters": {"tensors": len(module.params), "elements": param_count(module)},
        "weights_storage": {
            "note": "bf16 and fp8e4m3 parameters are stored as float32 holding values already rounded to their dtype",
            "widened_to_float32": [n for n, p in module.params.items() if p.type.dtype in WIDENED],
        },
        "files": {name: _sha256(out / name) for name in (IR_FILE, WEIGHTS_FILE, *extra)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Artifact(out, manifest, module, arrays)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ArtifactError(f"artifact directory {path} does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an artifact directory (expected a directory with {MANIFEST})")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupted manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: corrupted manifest (expected a JSON object)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: artifact format version {version!r} is not supported by this r1c "
            f"(expects {FORMAT_VERSION}); recompile the model"
        )
    for key in ("target", "entry", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: corrupted manifest (no '{key}' entry)")
    return manifest


def load(path: str | Path) -> Artifact:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from r1c.ir.parser import parse_module
    from r1c.ir.verifier import verify

    path = Path(path)
    manifest = _read_manifest(path)
    files = manifest["files"]
    for name in (IR_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ArtifactError(f"{path / MANIFEST}: corrupted manifest (no hash for {name})")
    for name, digest in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(f"artifact {path}: file {name} is missing")
        if _sha256(fpath) != digest:
            raise ArtifactError(
                f"artifact {path}: {name} does not match its sha256 in {MANIFEST} "
                f"(the file was modified or corrupted; recompile)"
            )
    module = verify(parse_module((path / IR_FILE).read_text(), str(path / IR_FILE)))
    if manifest["entry"] not in module.functions:
        raise ArtifactError(f"artifact {path}: entry function @{manifest['entry']} is not in {IR_FILE}")
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except SafetensorError as e:
        raise ArtifactError(f"artifact {path}: cannot read {WEIGHTS_FILE}: {e}") from None
    check_weights(module, weights)
    return Artifact(path, manifest, module, weights)


__all__ = [
    "Artifact",
    "ArtifactError",
    "FORMAT_VERSION",
    "check_weights",
    "input_limits",
    "load",
    "param_count",
    "write",
]
