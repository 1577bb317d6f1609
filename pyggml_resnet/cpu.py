"""The CPUs this process may use, and the compute threads to run on them by default: its affinity mask, its
cgroup's CPU quota and OMP_NUM_THREADS; how many of them other processes keep busy (`CpuShare`); and what the
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
PROC_STAT = "/proc/stat"
PROC_SELF_STAT = "/proc/self/stat"
# The shortest span CpuShare measures over: the kernel counts CPU time in ticks (1/100 s on Linux), so over
# 0.2 s a CPU's share is known to within 5%.
SHARE_WINDOW = 0.2
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


def _cpu_ticks(cpus) -> int | None:
    """The CPU time spent on the given CPUs, by every process, in ticks since boot: /proc/stat's user, nice,
    system, irq and softirq (not idle, iowait, or steal: time the hypervisor gave to other machines)."""
    try:
        with open(PROC_STAT) as f:
            lines = f.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0].startswith("cpu") and fields[0][3:].isdigit() and int(fields[0][3:]) in cpus:
            try:
                total += sum(int(fields[i]) for i in (1, 2, 3, 6, 7))
            except (IndexError, ValueError):
                return None
    return total


def _own_ticks() -> int | None:
    """This process's CPU time (all its threads, user and system) in ticks: /proc/self/stat's utime and stime."""
    try:
        with open(PROC_SELF_STAT) as f:
            fields = f.read().rpartition(")")[2].split()  # the command name before ")" may hold spaces
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class CpuShare:
    """How many of this process's CPUs (its affinity mask) other processes keep busy, measured over spans of at
    least SHARE_WINDOW seconds between calls of `threads`, and so how many compute threads to run now.

    ggml's threads wait for each other at every graph node: a thread that shares its CPU with a busy process
    holds the others up at each one (ResNet-101 int8 beside one busy loop on 2 CPUs: 2 threads 69 ms per
    image, 1 thread 44 ms; alone 22 and 41). Where /proc cannot be read (not Linux), nothing is measured and
    `threads` gives the most it is asked for."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        try:
            self._cpus = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            self._cpus = set(range(os.cpu_count() or 1))
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._free = len(self._cpus)
        self._last = self._sample()

    def _sample(self):
        busy, own = _cpu_ticks(self._cpus), _own_ticks()
        return None if busy is None or own is None else (self._clock(), busy, own)

    def busy_elsewhere(self) -> float | None:
        """CPUs' worth of time other processes took over the span since the last measurement, if that span is
        long enough (then a new one starts); else None."""
        now = self._clock()
        if self._last is None or now - self._last[0] < SHARE_WINDOW:
            return None
        last, self._last = self._last, self._sample()
        if self._last is None:
            return None
        span = (self._last[0] - last[0]) * self._tick
        return max(0.0, ((self._last[1] - last[1]) - (self._last[2] - last[2])) / span)

    def threads(self, most: int) -> int:
        """Compute threads for the next computation: about the CPUs that others leave free, at least 1 and at
        most `most`. Fewer once the free CPUs fall half a CPU short of the threads; more once they exceed
        them by 0.4. Measured beside a process busy part of the time on one of 2 CPUs (ResNet-101 int8, batch
        1, ms per image, 2 threads / 1): busy half the time 36 / 41 (it took 0.39 of a CPU beside 2 threads,
        0.51 beside 1), three quarters 44 / 42 (0.56, 0.76), always 66 / 41 (0.95, 1.01)."""
        others = self.busy_elsewhere()
        if others is not None:
            free = len(self._cpus) - others
            if free < self._free - 0.5:
                self._free = max(1, math.floor(free + 0.5))
            elif free >= self._free + 0.4:
                self._free = math.floor(free + 0.6)
        return min(most, self._free)
