"""The CPUs this process may use and the default thread count (pyggml_resnet.cpu): OMP_NUM_THREADS, the
affinity mask and the cgroup CPU quota, with cgroup files written under a temporary root; and the CPU's
vendor, from a /proc/cpuinfo written there too."""

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


class FakeProc:
    """/proc/stat and /proc/self/stat written under a temporary directory, and a clock, for `cpu.CpuShare`:
    CPUs 0 and 1 are this process's, CPU 2 is not."""

    def __init__(self, tmp_path, monkeypatch):
        self.stat, self.own = tmp_path / "stat", tmp_path / "self_stat"
        monkeypatch.setattr(cpu, "PROC_STAT", str(self.stat))
        monkeypatch.setattr(cpu, "PROC_SELF_STAT", str(self.own))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setattr(os, "sysconf", lambda name: 100 if name == "SC_CLK_TCK" else os.sysconf(name))
        self.now, self.busy, self.mine = 1000.0, [0, 0], 0
        self.write()

    def write(self):
        # cpuN user nice system idle iowait irq softirq steal: the busy ticks spread over user, system and
        # softirq; idle, iowait and steal large and never counted; CPU 2 busy but not ours.
        lines = ["cpu  1 1 1 1 1 1 1 1 0 0"]
        for n, busy in enumerate(self.busy + [10**6]):
            lines.append(f"cpu{n} {busy - busy // 2 - busy // 4} 0 {busy // 2} 5000 700 0 {busy // 4} 900 0 0")
        self.stat.write_text("\n".join(lines + ["intr 1 2 3", "procs_running 3"]) + "\n")
        self.own.write_text(f"42 (a (strange) name) R 1 42 42 0 -1 0 0 0 0 0 {self.mine - self.mine // 3} "
                            f"{self.mine // 3} 0 0 20 0 3 0\n")

    def advance(self, seconds, others, mine=0.0):
        """`seconds` pass, in which other processes use `others` CPUs and this one `mine` (in ticks of 1/100 s)."""
        self.now += seconds
        ticks = round(others * seconds * 100), round(mine * seconds * 100)
        self.busy = [self.busy[0] + ticks[0] + ticks[1], self.busy[1]]
        self.mine += ticks[1]
        self.write()

    def share(self):
        return cpu.CpuShare(clock=lambda: self.now)


def test_cpu_share_counts_only_other_processes_on_this_processs_cpus(tmp_path, monkeypatch):
    proc = FakeProc(tmp_path, monkeypatch)
    share = proc.share()
    proc.advance(0.1, others=1.0)
    assert share.busy_elsewhere() is None  # too short a span to tell: the next one keeps counting
    proc.advance(0.4, others=0.5, mine=1.5)
    assert share.busy_elsewhere() == pytest.approx((10 + 20) / 50)
    proc.advance(1.0, others=0.0, mine=2.0)
    assert share.busy_elsewhere() == 0.0


@pytest.mark.parametrize("steps", [
    # (others over the last span, threads then), starting from the 2 CPUs: fewer once the free CPUs fall
    # half a CPU short of the threads, more once they exceed them by 0.4.
    [(0.0, 2), (0.45, 2), (0.55, 1), (0.7, 1), (0.55, 2)],
    [(1.0, 1), (2.0, 1), (0.0, 2)],
    [(0.6, 1), (0.65, 1), (0.6, 2)],
])
def test_cpu_share_picks_threads_for_the_cpus_others_leave(tmp_path, monkeypatch, steps):
    proc = FakeProc(tmp_path, monkeypatch)
    share = proc.share()
    for others, threads in steps:
        proc.advance(0.25, others)
        assert share.threads(8) == threads, (others, threads)
    assert share.threads(1) == 1


def test_cpu_share_without_proc_gives_every_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "PROC_STAT", str(tmp_path / "missing"))
    share = cpu.CpuShare(clock=lambda: 1e9)
    assert share.busy_elsewhere() is None and share.threads(2) == 2
