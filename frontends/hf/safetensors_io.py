"""Read `.safetensors` files into numpy, including dtypes numpy lacks (bf16, fp8).

`safetensors.numpy` refuses bf16 and fp8 tensors, which is what DeepSeek checkpoints hold, so the tensors are
taken as raw little-endian bytes from `safetensors.deserialize` and float tensors are widened to float32 exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors


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
_PLAIN = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


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
    try:
        tensors = safetensors.deserialize(path.read_bytes())
    except safetensors.SafetensorError as e:
        raise SafetensorsError(f"{path}: not a valid safetensors file: {e}") from None
    return {
        name: _decode(np.frombuffer(info["data"], dtype=np.uint8), info["dtype"], info["shape"], name, path)
        for name, info in tensors
    }
