"""Read `.safetensors` files into numpy, including dtypes numpy lacks (bf16, fp8).

`safetensors.numpy` refuses bf16 and fp8 tensors, which is what DeepSeek checkpoints hold, so the file is
parsed directly (8-byte header length, JSON header, raw little-endian data) and float tensors are widened
to float32 exactly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


class SafetensorsError(ValueError):
    pass


def _fp8_e4m3fn_table() -> np.ndarray:
    """All 256 float8_e4m3fn values (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; 0x7f/0xff are NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((codes & 0x7F) == 0x7F, np.nan, value)
    return (sign * value).astype(np.float32)


_FP8_E4M3 = _fp8_e4m3fn_table()
_PLAIN = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _decode(raw: np.ndarray, dtype: str, shape: list[int], name: str, path: Path) -> np.ndarray:
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F8_E4M3":
        return _FP8_E4M3[raw.view(np.uint8)].reshape(shape)
    if dtype not in _PLAIN:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    x = raw.view(np.dtype(_PLAIN[dtype]).newbyteorder("<")).reshape(shape)
    return x.astype(np.float32) if x.dtype.kind == "f" else x.astype(x.dtype.newbyteorder("="))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one file; float tensors come back as float32, integer ones keep their type."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except ValueError as e:
        raise SafetensorsError(f"{path}: bad safetensors header: {e}") from None
    base = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        out[name] = _decode(np.asarray(data[base + start:base + stop]), info["dtype"], info["shape"], name, path)
    return out
