"""How many CPU threads qnkit uses: the one rule shared by the compiled kernels, the inference
backends and training.

``QNKIT_NUM_THREADS`` when it is a positive integer; otherwise the CPUs this process may really use:
the CPUs in its affinity mask (``taskset``, ``numactl``, Slurm), capped by a cgroup CPU quota
(containers: ``docker --cpus``, Kubernetes limits), never less than 1. An unusable
``QNKIT_NUM_THREADS`` (``abc``, ``0``, ``-2``) is reported once on stderr and ignored: a setting
read at import must never stop every command from starting.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

ENV = "QNKIT_NUM_THREADS"
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = float((folder / "cpu.cfs_quota_us").read_text())
            period = float((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for naming the machine beside every timing."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> frozenset | None:
    """The CPU's feature flags ("flags" on x86, "Features" on ARM) from Linux's /proc/cpuinfo; None when it
    cannot be read (not Linux). This machine's are read once."""
    if str(cpuinfo) == CPUINFO:
        return _own_cpu_flags()
    return _read_cpu_flags(cpuinfo)


@functools.lru_cache(maxsize=1)
def _own_cpu_flags() -> frozenset | None:
    return _read_cpu_flags(CPUINFO)


def _read_cpu_flags(cpuinfo: str | Path) -> frozenset | None:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


#: /proc/cpuinfo flags of a native bfloat16 dot product (bf16 autocast otherwise runs emulated, slower than FP32).
BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "ARM BF16"}


def native_bf16(cpuinfo: str | Path = CPUINFO) -> tuple[bool, str]:
    """(True, its name) when the CPU computes bfloat16 dot products natively (:data:`BF16_FLAGS`), else
    (False, why): mixed-precision training on the CPU pays only there (AVX2-only machines get FP32)."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return False, f"{cpuinfo} unreadable"
    found = [name for flag, name in BF16_FLAGS.items() if flag in flags]
    return (True, found[0]) if found else (False, "no AVX512-BF16, AMX-BF16 or ARM BF16 in the CPU flags")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (rounded up), at least 1."""
    cpus = _affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


@functools.lru_cache(maxsize=None)
def _warn_once(value: str) -> None:
    print(f"qnkit: warning: {ENV}={value!r} is not a positive integer; using {available_cpus()} threads",
          file=sys.stderr)


def requested_threads() -> int | None:
    """``QNKIT_NUM_THREADS`` when it is set to a positive integer, else None (an unusable value is reported once)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n > 0:
        return n
    _warn_once(value)
    return None


def default_threads() -> int:
    """Threads to use when none were asked for: ``QNKIT_NUM_THREADS`` if valid, else :func:`available_cpus`."""
    return requested_threads() or available_cpus()
