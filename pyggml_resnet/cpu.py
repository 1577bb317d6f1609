"""The CPUs this process may use, and the compute threads to run on them by default: its affinity mask, its
cgroup's CPU quota and OMP_NUM_THREADS; how many of them its computations get (`CpuShare`); and what the
CPU's vendor tells of its speed (`bf16_dot_is_fast`).
Plain Python, no ggml: which instructions the CPU has is the packed GEMM's cpuid check
(`ggml.gemm_path_supported`)."""

from __future__ import annotations

import functools
import math
import os
import time
import warnings

MAX_THREADS = 512  # the most compute threads a ggml Backend takes, and so the most `default_threads` gives

# Where the cgroup file systems are mounted, and the kernel's CPU description; tests point them elsewhere.
CGROUP_ROOT = "/sys/fs/cgroup"
CPUINFO = "/proc/cpuinfo"
# CpuShare: the computing time it measures over before it decides; the CPUs short of their threads at which
# computations run on fewer; and how long they do before trying them all again (doubling from the first to the
# second while that fails).
SHARE_WINDOW = 0.5
SHORT_CPUS = 0.6
PROBE_AFTER = (0.5, 2.0)
# CPU vendors (cpuid's vendor string) whose bf16 dot product (AVX512-BF16's vdpbf16ps) beats their f32 FMAs over
# the same products: AMD's Zen 4 (ResNet-101, batch 1, 2 threads: bf16 48.5 ms, f32 76.6 ms per image). On
# Intel's it loses (issue 22, a Xeon of family 6 model 207: bf16 0.97-1.03x PyTorch's time, f32 0.54-0.69x);
# AMX would not change that, as the packed GEMM's bf16 path does not use it.
FAST_BF16_VENDORS = ("AuthenticAMD",)


def _read_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def cgroup_cpu_limit() -> float | None:
    """The CPUs this process's cgroup may use per period (its CPU quota), or None without a quota.

    cgroup v2's `cpu.max` ("QUOTA PERIOD", QUOTA "max" for none), else cgroup v1's `cpu.cfs_quota_us` and
    `cpu.cfs_period_us` (quota -1 for none), as a container sees them at the cgroup root."""
    fields = _read_fields(os.path.join(CGROUP_ROOT, "cpu.max"))
    if fields is None:
        for controller in ("cpu", "cpu,cpuacct"):
            quota = _read_fields(os.path.join(CGROUP_ROOT, controller, "cpu.cfs_quota_us"))
            period = _read_fields(os.path.join(CGROUP_ROOT, controller, "cpu.cfs_period_us"))
            if quota is not None and period is not None:
                fields = quota + period
                break
    try:
        quota, period = (int(v) for v in fields)
    except (TypeError, ValueError):  # no such file, no quota ("max"), or a format we do not know
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), capped by its cgroup's CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def default_threads() -> int:
    """Compute threads when none are given: OMP_NUM_THREADS when it is set to a positive integer (Ray sets
    it to an actor's CPUs; as in OpenMP, a list "N,M" means N here), else `available_cpus()`. Any other
    value of OMP_NUM_THREADS is ignored with a warning, as OpenMP runtimes ignore it."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value.split(",")[0])
        except ValueError:
            n = 0
        if n >= 1:
            return min(n, MAX_THREADS)
        warnings.warn(f"ignoring OMP_NUM_THREADS={value!r}: not a positive integer", RuntimeWarning, stacklevel=2)
    return min(available_cpus(), MAX_THREADS)


def cpuinfo() -> dict[str, str]:
    """The first CPU's entries of /proc/cpuinfo, by key ("vendor_id", "model name", "flags", ...): every CPU's
    alike. Empty where there is no such file (not Linux)."""
    info: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


@functools.lru_cache(maxsize=1)
def vendor() -> str | None:
    """The CPU's vendor as cpuid names it ("AuthenticAMD", "GenuineIntel", ...), from `cpuinfo`; None where
    that does not say (not Linux, not x86)."""
    return cpuinfo().get("vendor_id") or None


def bf16_dot_is_fast() -> bool:
    """Whether this CPU's bf16 dot product, where it has one, is known to beat its f32 FMAs (by its vendor:
    FAST_BF16_VENDORS). Where it is not, bf16 weights multiply faster widened to f32 (`plan.packed_paths`)."""
    return vendor() in FAST_BF16_VENDORS


class CpuShare:
    """How much of its CPUs a backend's computations get, and so how many threads to run them on.

    A computation on n threads that took wall time w and CPU time c (the process's, every thread) got
    r = c / (n w) of them: 0.98 alone; 0.50 beside a busy loop on one of 2 CPUs, where the thread sharing a
    CPU runs half the time and the other sleeps in ggml's barrier waiting for it (ResNet-101 int8, batch 1,
    69 ms per image, against 42 on one thread). Only computations count: what others do while this process
    is idle does not compete with it.

    Once the computations of the last SHARE_WINDOW seconds of computing got SHORT_CPUS fewer CPUs than their
    threads, they run on the CPUs they got, rounded (at least 1). Fewer threads cannot tell whether the CPUs
    came free again (each gets a whole CPU either way), so after PROBE_AFTER[0] seconds one computation runs
    on all of them, and the count goes back up unless that one fell as short; else the next try waits twice
    as long, at most PROBE_AFTER[1]. Measured beside a process busy part of the time on one of 2 CPUs (ms per
    image, 2 threads / 1; r on 2 threads): half the time 36 / 41 (r 0.81), three quarters 44 / 42 (0.66),
    always 66 / 41 (0.50)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._reduced = None  # the threads chosen while fewer than the most, else None
        self._probing = False
        self._wait = PROBE_AFTER[0]
        self._probe_at = 0.0
        self._cpu = self._wall = 0.0

    def threads(self, most: int) -> int:
        """Threads for the next computation, at most `most`."""
        if self._reduced is None or self._reduced >= most:
            self._reduced = None
            return most
        self._probing = self._clock() >= self._probe_at
        return most if self._probing else self._reduced

    def record(self, threads: int, cpu_seconds: float, wall_seconds: float) -> None:
        """A computation on `threads` threads took `wall_seconds`, and the process `cpu_seconds` of CPU time."""
        if wall_seconds <= 0:
            return
        if self._probing:
            self._probing = False
            if cpu_seconds / wall_seconds > threads - SHORT_CPUS:
                self._reduced, self._wait = None, PROBE_AFTER[0]
            else:
                self._wait = min(2 * self._wait, PROBE_AFTER[1])
                self._probe_at = self._clock() + self._wait
            self._cpu = self._wall = 0.0
            return
        self._cpu += cpu_seconds
        self._wall += wall_seconds
        if self._wall < SHARE_WINDOW:
            return
        got = self._cpu / self._wall  # CPUs' worth over the window (on one thread count: it resets on a change)
        self._cpu = self._wall = 0.0
        if threads > 1 and got <= threads - SHORT_CPUS:
            self._reduced = max(1, math.floor(got + 0.5))
            self._probe_at = self._clock() + self._wait
