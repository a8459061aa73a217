"""Element types and tensor types. Text form: ``f32[B,S,64]``; a scalar is ``f32[]``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from r1c.ir import dims
from r1c.ir.dims import Dim


class DType(enum.Enum):
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    fp8e4m3 = "fp8e4m3"
    int8 = "int8"
    int32 = "int32"
    bool = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.bf16, DType.f16, DType.fp8e4m3)

    @property
    def itemsize(self) -> int:
        return {"f32": 4, "bf16": 2, "f16": 2, "fp8e4m3": 1, "int8": 1, "int32": 4, "bool": 1}[self.value]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype the reference interpreter stores this type in.

        bf16 and fp8 have no numpy type: the reference keeps them in float32 after rounding
        to the narrow format (see `round_to`), so their values are exactly representable.
        """
        return np.dtype(
            {
                "f32": "float32",
                "bf16": "float32",
                "f16": "float16",
                "fp8e4m3": "float32",
                "int8": "int8",
                "int32": "int32",
                "bool": "bool",
            }[self.value]
        )

    def __str__(self) -> str:
        return self.value


def parse_dtype(name: str) -> DType:
    try:
        return DType(name)
    except ValueError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(d.value for d in DType)}") from None


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float32 values to a narrow float format, returned as its numpy storage type."""
    if dtype == DType.bf16:
        bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        # The carry wraps a NaN with a full mantissa around to 0; give the canonical NaN (torch scalar path).
        rounded = np.where(np.isnan(np.asarray(x, np.float32)), 0x7FC00000, rounded)
        return rounded.astype(np.uint32).view(np.float32)
    if dtype == DType.fp8e4m3:
        x = np.clip(np.asarray(x, np.float32), -448.0, 448.0)
        mag = np.abs(x)
        exp = np.floor(np.log2(np.maximum(mag, 2.0**-9)))
        step = 2.0 ** (np.maximum(exp, -6) - 3)  # 3 mantissa bits; subnormals below 2^-6
        return (np.round(x / step) * step).astype(np.float32)
    if dtype == DType.f16:
        # Via float32 like bf16/fp8: ops compute in float32, and f64 -> f16 directly can round differently.
        with np.errstate(over="ignore"):  # beyond f16's range is inf, as in torch
            return np.asarray(x, np.float32).astype(np.float16)
    return np.asarray(x).astype(dtype.numpy)


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(dims.normalize(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return dims.mul(*self.shape) if self.shape else 1

    def concrete(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims.evaluate(d, env) for d in self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


def tensor(dtype: str | DType, shape: list[Dim] | tuple[Dim, ...]) -> TensorType:
    return TensorType(dtype if isinstance(dtype, DType) else parse_dtype(dtype), tuple(shape))
