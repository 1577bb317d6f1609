"""The CPUs this process may use and the default thread count (pyggml_resnet.cpu): OMP_NUM_THREADS, the
affinity mask and the cgroup CPU quota, with cgroup files written under a temporary root; the CPU's vendor,
from a /proc/cpuinfo written there too; and how many threads CpuShare picks for given measurements, on a
clock of the tests' own."""

import os

import pytest

from pyggml_resnet import cpu
from pyggml_resnet.ggml import Backend


@pytest.fixture
def no_quota(monkeypatch, tmp_path):
    """An empty cgroup root (no quota files) and no OMP_NUM_THREADS."""
    monkeypatch.setattr(cpu, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_default_is_the_cpus_this_process_may_use(no_quota, monkeypatch):
    assert cpu.default_threads() == affinity()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert cpu.default_threads() == 3


@pytest.mark.parametrize("value, expected", [("3", 3), (" 7 ", 7), ("5,2", 5), ("1", 1), ("100000", 512)])
def test_omp_num_threads_wins(no_quota, monkeypatch, value, expected):
    (no_quota / "cpu.max").write_text("100000 100000\n")  # a 1-CPU quota does not override it
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu.default_threads() == expected
    with Backend() as b:
        assert b.threads == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "2.5", ",", "1e3"])
def test_bad_omp_num_threads_is_ignored_with_a_warning(no_quota, monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.warns(RuntimeWarning, match="OMP_NUM_THREADS"):
        assert cpu.default_threads() == affinity()


def test_empty_omp_num_threads_is_unset(no_quota, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert cpu.default_threads() == affinity()


@pytest.mark.parametrize("content, cpus", [("150000 100000\n", 2), ("100000 100000", 1), ("50000 100000", 1),
                                           ("max 100000\n", None), ("garbage", None), ("", None),
                                           ("-1 100000", None)])
def test_cgroup_v2_quota_caps_the_cpus(no_quota, monkeypatch, content, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (no_quota / "cpu.max").write_text(content)
    assert cpu.default_threads() == (64 if cpus is None else cpus)


@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize("quota, period, cpus", [("250000", "100000", 3), ("-1", "100000", None),
                                                 ("20000", "10000", 2), ("x", "100000", None)])
def test_cgroup_v1_quota_caps_the_cpus(no_quota, monkeypatch, controller, quota, period, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (no_quota / controller).mkdir()
    (no_quota / controller / "cpu.cfs_quota_us").write_text(quota + "\n")
    (no_quota / controller / "cpu.cfs_period_us").write_text(period + "\n")
    assert cpu.cgroup_cpu_limit() == (None if cpus is None else int(quota) / int(period))
    assert cpu.default_threads() == (64 if cpus is None else cpus)


def test_cgroup_v2_is_read_before_v1(no_quota, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (no_quota / "cpu.max").write_text("400000 100000")
    (no_quota / "cpu").mkdir()
    (no_quota / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (no_quota / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpu.default_threads() == 4


def test_quota_never_raises_above_the_affinity(no_quota, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    (no_quota / "cpu.max").write_text("800000 100000")
    assert cpu.default_threads() == 1


_CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: 6
model\t\t: 207
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
vendor_id\t: SomeoneElse
"""


@pytest.mark.parametrize("vendor, fast", [("AuthenticAMD", True), ("GenuineIntel", False), ("HygonGenuine", False)])
def test_the_vendor_and_whether_bf16_is_fast_come_from_the_first_cpu(tmp_path, monkeypatch, vendor, fast):
    """bf16's own kernel is the default only where the vendor's bf16 dot product beats its f32 FMAs (AMD's Zen 4;
    not issue 22's Intel Xeon, family 6 model 207); a CPU this cannot tell is not counted fast."""
    (tmp_path / "cpuinfo").write_text(_CPUINFO.format(vendor=vendor))
    monkeypatch.setattr(cpu, "CPUINFO", str(tmp_path / "cpuinfo"))
    cpu.vendor.cache_clear()
    try:
        assert cpu.cpuinfo()["model"] == "207" and cpu.cpuinfo()["flags"].split()[-1] == "avx512_bf16"
        assert (cpu.vendor(), cpu.bf16_dot_is_fast()) == (vendor, fast)
        monkeypatch.setattr(cpu, "CPUINFO", str(tmp_path / "missing"))  # not Linux
        cpu.vendor.cache_clear()
        assert (cpu.cpuinfo(), cpu.vendor(), cpu.bf16_dot_is_fast()) == ({}, None, False)
    finally:
        cpu.vendor.cache_clear()  # the next caller reads the real file


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(share, clock, most, got, seconds, each=0.1):
    """Computations of `each` seconds for `seconds`, on the threads `share` picks (at most `most`), each getting
    `got(threads)` CPUs' worth of time; the threads each one ran on."""
    used = []
    for _ in range(round(seconds / each)):
        n = share.threads(most)
        share.record(n, got(n) * each, each)
        clock.now += each
        used.append(n)
    return used


def test_cpu_share_keeps_every_thread_while_the_computations_get_their_cpus():
    clock = FakeClock()
    share = cpu.CpuShare(clock=clock)
    assert run(share, clock, 2, lambda n: 0.98 * n, 10) == [2] * 100
    # a neighbour busy half the time: r = 0.81 on 2 threads, where 2 threads were faster than 1
    assert set(run(share, clock, 2, lambda n: 0.81 * n, 10)) == {2}
    assert run(share, clock, 1, lambda n: 0.3, 2) == [1] * 20  # one thread: nothing to step back to


def test_cpu_share_steps_back_beside_a_busy_process_and_tries_again():
    clock = FakeClock()
    share = cpu.CpuShare(clock=clock)
    used = run(share, clock, 2, lambda n: 1.0, 10)  # 2 CPUs, one kept by a busy loop: one CPU's worth
    # SHARE_WINDOW (0.5 s) of computing on 2, then 1; tries 2 again after 0.5, 1 and then every 2 s
    assert used[:5] == [2] * 5 and used[5] == 1
    tries = [i for i, n in enumerate(used) if n == 2 and i >= 5]
    assert tries == [9, 19, 39, 59, 79, 99]  # 0.5 s after stepping back, then 1 s after, then every 2 s
    # the busy process stops: the next try stays on 2 threads
    used = run(share, clock, 2, lambda n: 0.98 * n, 3)
    assert 2 in used and used[used.index(2):] == [2] * (len(used) - used.index(2))


def test_cpu_share_uses_the_cpus_the_computations_got():
    clock = FakeClock()
    share = cpu.CpuShare(clock=clock)
    used = run(share, clock, 8, lambda n: min(n, 5.2), 0.9)  # 5.2 of 8 CPUs: 5 threads
    assert used == [8] * 5 + [5] * 4
    assert share.threads(4) == 4  # at most what it is asked for
