"""Threads: more threads than CPUs do not busy-wait (ggml's barrier sleeps after a short spin:
vendor/ggml-barrier.patch). The default thread count is tests/test_cpu.py's."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from pyggml_resnet.errors import InputError
from pyggml_resnet.ggml import Backend, Graph
from pyggml_resnet.model import lanes


# The oversubscribed case, checked by how threads wait rather than by time: a process pinned to one CPU
# runs a graph on 4 threads. With a busy-waiting barrier the 3 waiting threads keep running until the
# scheduler preempts them (involuntary context switches only); when they sleep, each wait is a voluntary
# context switch, counted by getrusage for the whole process, exited threads included.
OVERSUBSCRIBED = textwrap.dedent("""
    import os, resource, sys
    import numpy as np
    from pyggml_resnet.ggml import Backend, Graph

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with Backend(threads=4) as b, Graph(b) as g:
        x = g.input("x", (64, 64))
        y = x
        for _ in range(40):  # 40 nodes: a barrier after each
            y = g.relu(g.add(y, x))
        g.finalize(y)
        data = np.ones((64, 64), np.float32)
        g.set(x, data); g.compute()  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        for _ in range(10):
            g.set(x, data)
            g.compute()
        waits = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
        assert (g.get(y) == 41).all()  # 1, then 40 times + 1
    print(waits)
""")


def test_waiting_threads_sleep_when_there_are_more_threads_than_cpus():
    out = subprocess.run([sys.executable, "-c", OVERSUBSCRIBED], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    waits = int(out.stdout)
    # 10 computations of 80 nodes: a busy-waiting pool sleeps only to start and join its threads (about
    # 3 per computation); a sleeping barrier waits hundreds of times.
    assert waits > 10 * 40, waits


# Beside busy processes, an adapting backend computes on fewer threads: a process pinned to 2 CPUs starts 2
# busy loops there (they inherit the pinning) and computes until its computations have measured their share
# (cpu.SHARE_WINDOW seconds of them), or 20 s at most.
BESIDE_BUSY = textwrap.dedent("""
    import os, subprocess, sys, time
    import numpy as np
    from pyggml_resnet.ggml import Backend, Graph

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    with Backend(threads=2, adapt=True) as b, Graph(b) as g:
        x = g.input("x", (256, 256))
        y = x
        for _ in range(40):
            y = g.relu(g.add(y, x))
        g.finalize(y)
        data = np.ones((256, 256), np.float32)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            time.sleep(0.2)
            start = time.monotonic()
            while b.last_threads == 2 and time.monotonic() - start < 20:
                g.set(x, data)
                g.compute()
        finally:
            for p in busy:
                p.kill()
        assert (g.get(y) == 41).all()
        print(b.threads, b.last_threads)
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_an_adapting_backend_runs_fewer_threads_beside_busy_processes():
    out = subprocess.run([sys.executable, "-c", BESIDE_BUSY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [int(v) for v in out.stdout.split()] == [2, 1]  # the pool's threads, and those the computation ran on


FORKED = textwrap.dedent("""
    import os, signal, time
    import numpy as np
    from pyggml_resnet.ggml import Backend, Graph

    def chain(g):
        x = g.input("x", (64, 64))
        y = x
        for _ in range(10):
            y = g.relu(g.add(y, x))
        g.finalize(y)
        return x, y

    with Backend(threads=3) as b, Graph(b) as g, Graph(b.lane(0)) as g0, Graph(b.lane(1)) as g1:
        x, y = chain(g)
        (x0, y0), (x1, y1) = chain(g0), chain(g1)
        g.set(x, np.ones((64, 64), np.float32))
        g.compute()  # the pool's threads have run in the parent
        g0.set(x0, np.ones((64, 64), np.float32))
        g1.set(x1, np.ones((64, 64), np.float32))
        b.compute([g0, g1])  # and so has a lane's Python thread
        pid = os.fork()
        if pid == 0:
            g.set(x, np.full((64, 64), 2, np.float32))
            g.compute()
            ok = (g.get(y) == 22).all()
            g0.set(x0, np.full((64, 64), 4, np.float32))
            g1.set(x1, np.full((64, 64), 5, np.float32))
            b.compute([g0, g1])
            ok = ok and (g0.get(y0) == 44).all() and (g1.get(y1) == 55).all()
            b.threads = 2
            g.set(x, np.ones((64, 64), np.float32))
            g.compute()
            os._exit(0 if ok and (g.get(y) == 11).all() else 1)
        g.set(x, np.full((64, 64), 3, np.float32))
        g.compute()
        assert (g.get(y) == 33).all()
        for _ in range(1200):  # a child stuck waiting for threads it does not have never ends: kill it
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            print("hung")
""")


def test_a_forked_child_computes_with_its_parents_backend():
    # The pool's threads do not survive fork(), nor the Python thread that computed a lane: the child must get
    # its own instead of waiting for them.
    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]


def test_the_backend_keeps_its_own_pool_of_threads():
    # A pool of threads - 1 workers (the caller is the last) lives as long as the backend, instead of
    # ggml's default of new threads for every computation.
    def tasks():
        return len(os.listdir("/proc/self/task"))

    before = tasks()
    with Backend(threads=3) as b:
        assert tasks() == before + 2
        b.threads = 5
        assert tasks() == before + 4
    assert tasks() == before


def _doubling_graph(backend, adds: int):
    """A graph of `adds` adds on an input x: y = x * (adds + 1)."""
    g = Graph(backend)
    x = g.input("x", (64, 64))
    y = x
    for _ in range(adds):
        y = g.add(y, x)
    g.finalize(y)
    return g, x, y


def test_lanes_compute_graphs_side_by_side():
    # Three graphs at once: two on the lanes (each on its own thread), one on the backend's 2 threads after them.
    with Backend(threads=2) as b:
        made = [_doubling_graph(backend, adds) for backend, adds in ((b.lane(0), 3), (b.lane(1), 5), (b, 7))]
        assert b.lane(0) is made[0][0]._backend and b.lane(0).threads == 1
        data = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
        for g, x, _ in made:
            g.set(x, data)
        b.compute([g for g, _, _ in made])
        for (g, _, y), adds in zip(made, (3, 5, 7)):
            np.testing.assert_array_equal(g.get(y).reshape(64, 64), data * (adds + 1))
        lane0, lane1, own = (g for g, _, _ in made)
        # prepare runs on the thread that computes its graph: the lanes' on two threads; an exception in one
        # is raised once both are done.
        where = {}
        sets = [lambda g=g, x=x, i=i: (g.set(x, data + i), where.setdefault(i, threading.get_ident()))
                for i, (g, x, _) in enumerate(made[:2])]
        b.compute([lane0, lane1], sets)
        assert where[0] != where[1]
        np.testing.assert_array_equal(lane1.get(made[1][2]).reshape(64, 64), (data + 1) * 6)

        def fail():
            raise InputError("bad image")

        with pytest.raises(InputError, match="bad image"):
            b.compute([lane0, lane1], [sets[0], fail])
        with pytest.raises(InputError, match="prepare"):
            b.compute([lane0, lane1], [None])
        b.compute([lane0, lane1, own])  # the lanes' side by side, then the backend's own
        np.testing.assert_array_equal(own.get(made[2][2]).reshape(64, 64), data * 8)
        second = _doubling_graph(b.lane(0), 1)[0]
        with pytest.raises(InputError, match="one lane"):
            b.compute([lane0, second])
        with Backend(threads=2) as other, pytest.raises(InputError, match="its lanes"):
            other.compute([lane0])  # not one of other's lanes
        with pytest.raises(InputError, match="lane"):
            b.lane(2)
    with pytest.raises(InputError, match="closed"):
        lane0.compute()  # the lanes close with their backend


def test_a_batch_runs_in_equal_shares_on_lanes_and_the_rest_on_every_thread():
    assert lanes(8, 2) == [(0, 4, 0), (4, 8, 1)]
    assert lanes(3, 2) == [(0, 1, 0), (1, 2, 1), (2, 3, None)]
    assert lanes(2, 4) == [(0, 1, 0), (1, 2, 1)]
    assert lanes(7, 3) == [(0, 2, 0), (2, 4, 1), (4, 6, 2), (6, 7, None)]
    assert lanes(1, 2) == lanes(1, 1) == [(0, 1, None)]
    assert lanes(16, 1) == [(0, 16, None)]
