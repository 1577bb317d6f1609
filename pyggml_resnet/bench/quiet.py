"""Waiting for a quiet machine before the timed rounds.

The 1-minute load average lags: right after a build (the README's `pip install . && pyggml-resnet bench`)
it stays high for minutes although nothing runs, and while another job runs it says too little too late.
So the CPUs' busy time is measured directly, from /proc/stat, a second at a time, and the timed rounds
start once other processes have kept less than half a CPU busy for three seconds in a row, or after a
bounded wait, with a note saying how busy the machine still was.
"""

from __future__ import annotations

import time

QUIET_CPUS = 0.5  # busy CPUs (of all of them together) below which the machine counts as quiet
SETTLE = 3  # quiet seconds in a row


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of all CPUs and the number of CPUs, from /proc/stat, or None without it."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:8]]  # user nice system idle iowait irq softirq
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields), max(cpus, 1)


def busy_cpus(interval: float = 1.0, *, sleep=time.sleep, read=_cpu_times) -> float | None:
    """How many CPUs were busy, on average, over the next `interval` seconds (None without /proc/stat)."""
    before = read()
    sleep(interval)
    after = read()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * after[2]


def wait_until_quiet(limit_s: float, *, measure=busy_cpus, progress=lambda text: None) -> float | None:
    """Measure once a second until SETTLE quiet seconds in a row or `limit_s` seconds; return the busy CPUs
    of the last second (None where they cannot be measured: the wait is skipped)."""
    quiet, busy = 0, None
    for second in range(max(int(limit_s), 1)):
        busy = measure()
        if busy is None:
            return None
        quiet = quiet + 1 if busy < QUIET_CPUS else 0
        if quiet >= SETTLE:
            break
        if second == SETTLE:
            progress(f"waiting up to {limit_s:.0f} s for the machine to be quiet ({busy:.1f} CPUs busy) ...")
    return busy
