"""The hardware floor, measured in the same run as the benchmark: the bf16 matrix rate (a large torch matmul on
random data) and HBM bandwidth (a large device-to-device copy, bytes read + written), and the floor of a
workload = max(flops / rate, bytes / bandwidth). Also the one timing rule every CUDA benchmark uses."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import triton.testing


def median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of fn in milliseconds, by CUDA events (triton.testing.do_bench)."""
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Median time of one call, replaying a CUDA graph of `calls` calls: GPU time without host launch gaps."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return median_ms(g.replay) / calls


@dataclass(frozen=True)
class Floor:
    bf16_tflops: float  # measured dense bf16 matmul rate
    hbm_tbps: float  # measured copy bandwidth, bytes read + written
    device: str

    def seconds(self, flops: float, bytes_moved: float) -> float:
        return max(flops / (self.bf16_tflops * 1e12), bytes_moved / (self.hbm_tbps * 1e12))

    def as_dict(self) -> dict:
        return asdict(self)


@functools.cache
def measure() -> Floor:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB: far past L2
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    return Floor(
        bf16_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12,
        hbm_tbps=2 * (1 << 30) * 2 / (copy_ms * 1e-3) / 1e12,
        device=torch.cuda.get_device_name(),
    )


if __name__ == "__main__":
    print(measure())
