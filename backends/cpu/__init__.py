"""r1c.backends.cpu: the cpu and cpu-arm targets (TVM)."""

import os


def _physical_cpus() -> int:
    """CPUs this process may run on, one per physical core (hyperthreads do not add FMA units)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        return max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    except ImportError:
        return usable


# TVM's thread pool takes half the logical CPUs on x86 (it assumes two hyperthreads per core): on a machine without
# SMT, such as this 2-core VM, it ran every kernel on one core while PyTorch used both (measured: a 128 x 2048 x 8192
# GEMM at 136 GFLOP/s with the default, 275 with two threads, torch 293). The variable is read when the pool is
# created, at the first parallel kernel; a value the user set wins.
os.environ.setdefault("TVM_NUM_THREADS", str(_physical_cpus()))
