"""`pyggml-resnet bench --contention`: ggml against PyTorch when there are more runnable threads than CPUs.

After the main rounds, the ggml and PyTorch workers are timed again at batch 1 in four cases, each in
interleaved rounds of its own:

* quiet: `--threads` threads, nothing else started;
* 2x threads: twice as many threads (two more workers), nothing else started;
* 1 busy, 2 busy: `--threads` threads, with one or two busy processes (a Python loop each) beside them.

Each case gives ggml's ratio to PyTorch under the same conditions, and how that ratio compares with the
quiet one; the 2x case also gives ggml's time against its own quiet time. Whatever else runs on the
machine counts too: the load average is recorded with each case.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from .procs import Worker

BUSY_LOOP = "while True: pass  # a busy process of pyggml-resnet bench --contention"


def cases(threads: int) -> list[dict]:
    return [{"case": "quiet", "threads": threads, "busy": 0},
            {"case": "2x threads", "threads": 2 * threads, "busy": 0},
            {"case": "1 busy", "threads": threads, "busy": 1},
            {"case": "2 busy", "threads": threads, "busy": 2}]


def run_cases(run, ggml_row: str, progress) -> list[dict]:
    """Times the worker of `ggml_row` and PyTorch's in every case (`run` is the bench's Run, with both
    workers running); returns one entry per case, with its ratios."""
    a = run.args
    extra: dict[str, Worker] = {}  # the 2x-threads workers, ended here
    try:
        entries = [_case(run, c, ggml_row, extra, progress) for c in cases(a.threads)]
    finally:
        for w in extra.values():
            w.stop()
    quiet = entries[0]
    for e in entries:
        e["ratio_vs_quiet_ratio"] = e["ratio_to_torch"] / quiet["ratio_to_torch"]
        e["ggml_vs_quiet"] = e["ggml_ms"] / quiet["ggml_ms"]
        e["torch_vs_quiet"] = e["torch_ms"] / quiet["torch_ms"]
    return entries


def _case(run, c: dict, ggml_row: str, extra: dict, progress) -> dict:
    a = run.args
    workers = {}
    for row in (ggml_row, "torch"):
        if c["threads"] == a.threads:
            workers[row] = run.workers[row]
            continue
        name = f"{row}-{c['threads']}threads"
        if name not in extra:
            progress(f"starting {name} ...")
            extra[name], _ = run.start_worker(name, row, c["threads"], batches=[1])
        workers[row] = extra[name]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(c["busy"])]
    try:
        time.sleep(0.5 if busy else 0)  # the busy processes are running before the first sample
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        samples = {row: [] for row in workers}
        progress(f"contention, {c['case']} ({c['threads']} threads, {c['busy']} busy):", end="")
        for r in range(a.rounds):
            for row in (list(workers) if r % 2 == 0 else list(reversed(workers))):
                progress(f" {row}", end="")
                reply = workers[row].request({"cmd": "time", "batch": 1, "iters": a.iters},
                                             run.timeout(row, 1, a.iters))
                samples[row] += reply["times"]
        progress("")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    g, t = statistics.median(samples[ggml_row]), statistics.median(samples["torch"])
    return {**c, "load_average": load, "ggml_ms": g * 1e3, "torch_ms": t * 1e3, "ratio_to_torch": g / t,
            "ggml_samples_ms": [v * 1e3 for v in samples[ggml_row]],
            "torch_samples_ms": [v * 1e3 for v in samples["torch"]]}

