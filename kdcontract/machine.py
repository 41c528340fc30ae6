"""The machine a figure was measured on, read from it (never assumed): every report records it, since CPUs of
one kind of machine differ (PyTorch training ran 3.4x slower on one than on another)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

SIMD_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags, read from the machine (never assumed)."""
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return cpu, flags


def cpu_description() -> str:
    cpu, flags = cpu_info()
    # The cores this process may run on (taskset, a container's cpuset), not the machine's count.
    usable = len(os.sched_getaffinity(0))
    return f"{cpu} ({', '.join(sorted(flags & SIMD_FLAGS)) or 'no AVX2'}), {usable} core{'s' if usable > 1 else ''}"
