"""Measures the table in docs/scaling.md: images/s of a plain loop and of Ray actors x threads on one machine.

    .venv/bin/python docs/measure_scaling.py [--images 256] [--rounds 3] [--work /tmp/scaling]

Made once in --work (and reused): a seeded ResNet-50 as f32 GGUF (tests/reference_resnet.py, needs torch)
and --images generated JPEGs of 500x375 (ImageNet's typical size). Then, in rounds that rotate the order so
that a shared machine's drift spreads over every setup:

* plain: one fresh process, `load(threads=2)` then the CLI's loop (preprocess, batches of 16); "plain1"
  the same with 1 thread (not run unless asked for with --setups);
* Ray AxT: A actors of T threads (`pyggml_resnet.ray.predict` on `read_paths`, batches of 16) in one local
  Ray session started with num_cpus=4, so that 2 actors x 2 threads can be placed on the 2 cores at all.

Three numbers per setup, all timed from the start of the work (for plain, once its process has imported
pyggml_resnet; for Ray, the driver's calls of `read_paths` and `predict`):

* images/s: images over the wall time from the start of the work to the last result, model loading
  included: for Ray this includes starting the actors' processes (Ray itself is already up; its start-up
  time and memory are reported apart, and so is Ray Data's first run in the session, which starts its own
  bookkeeping actors once: a no-op pipeline does that before any setup is timed, so that no setup pays it
  for being first in the order);
* first result: seconds from the start of the work to the end of the first batch (start-up, model load
  and one batch);
* steady images/s: the images computed from the first result to the last, per second. A batch that was
  being computed when the first result came (another actor's first batch) counts by the part of its time
  that lies after it; the time actors wait between batches counts as time. It is what a long run tends to.

Peak RSS is per process (each actor's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETUPS = ("plain", "2x1", "1x2", "2x2")  # "plain1" too on request
BATCH = 16


def prepare(work: Path, images: int) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    model = work / "resnet50-seeded.gguf"
    if not model.exists():
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from reference_resnet import make_model

        from pyggml_resnet import convert

        pth = work / "resnet50-seeded.pth"
        torch.save(make_model(50, seed=50).state_dict(), pth)
        convert.convert(pth, model, progress=False)
        pth.unlink()
    folder = work / f"images{images}"
    if not folder.exists():
        from PIL import Image

        tmp = work / f".images{images}.partial"
        tmp.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(images):  # smooth random colour fields plus noise: JPEGs of photo-like size
            small = rng.random((12, 16, 3)) * 255
            img = Image.fromarray(small.astype(np.uint8)).resize((500, 375), Image.Resampling.BICUBIC)
            noisy = np.asarray(img, np.float32) + rng.normal(0, 12, (375, 500, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(tmp / f"{i:05d}.jpg", quality=90)
        tmp.rename(folder)
    return model, folder


PLAIN = r"""
import json, sys, time
import numpy as np
import pyggml_resnet
from pyggml_resnet.bench.child import peak_rss_kib  # this process's own peak, not one inherited at fork
paths = sys.argv[3:]
start = time.perf_counter()
model = pyggml_resnet.load(sys.argv[1], threads=int(sys.argv[2]))
loaded = peak_rss_kib()
batches = []  # (began, done, images), seconds from the start
for i in range(0, len(paths), 16):
    began = time.perf_counter() - start
    model.probabilities(np.stack([model.preprocess(p) for p in paths[i:i + 16]]))
    batches.append((began, time.perf_counter() - start, len(paths[i:i + 16])))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_loaded_kib": loaded, "batches": batches,
                  "rss_peak_kib": peak_rss_kib()}))
"""


def run_plain(model: Path, paths: list[str], threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PLAIN, str(model), str(threads), *paths], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    return {**result, **timeline(result["batches"])}


def timeline(batches: list) -> dict:
    """first_result_s and steady_images_per_s (see the module's docstring) from (began, done, images) per
    batch, in seconds from the start of the work."""
    first = min(done for _, done, _ in batches)
    last = max(done for _, done, _ in batches)
    # a batch in progress at the first result counts by the part of its time after it
    images = sum(n * (done - max(began, first)) / (done - began) for began, done, n in batches if done > first)
    steady = images / (last - first) if last > first else float("nan")
    return {"first_result_s": first, "steady_images_per_s": steady}


def measuring():
    """Predictor that also reports its process's RSS after loading and its peak (Ray cannot import this
    script in its workers, so the class is made in a function and sent by value)."""
    import pyggml_resnet.ray as pr
    from pyggml_resnet.bench.child import peak_rss_kib

    class Measuring(pr.Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loaded = peak_rss_kib()

        def __call__(self, batch):
            began = time.time()
            out = super().__call__(batch)
            n = len(out["path"])
            out["pid"] = np.full(n, os.getpid())
            out["rss_loaded_kib"] = np.full(n, self.loaded)
            out["rss_peak_kib"] = np.full(n, peak_rss_kib())
            out["threads"] = np.full(n, self.model.threads)
            out["began"] = np.full(n, began)
            out["done"] = np.full(n, time.time())
            return out

    return Measuring


def run_ray(model: Path, paths: list[str], actors: int, threads: int) -> dict:
    import ray

    import pyggml_resnet.ray as pr

    start, wall = time.perf_counter(), time.time()
    ds = pr.predict(pr.read_paths(paths, batch_size=BATCH), str(model), cls=measuring(), actors=actors,
                    threads=threads, batch_size=BATCH)
    rows = ds.take_all()
    seconds = time.perf_counter() - start
    assert len(rows) == len(paths) and all(r["error"] is None for r in rows)
    assert {int(r["threads"]) for r in rows} == {threads}
    pids = {int(r["pid"]) for r in rows}
    batches = {}  # (pid, began) -> [began, done, images]: one per call
    for r in rows:
        batches.setdefault((int(r["pid"]), float(r["began"])), [r["began"] - wall, r["done"] - wall, 0])[2] += 1
    return {"seconds": seconds, "actors_used": len(pids), "batches": sorted(batches.values()),
            **timeline(list(batches.values())),
            "rss_loaded_kib": max(int(r["rss_loaded_kib"]) for r in rows),
            "rss_peak_kib": max(int(r["rss_peak_kib"]) for r in rows)}


def first_ray_data_run() -> float:
    """Runs a no-op pipeline on a 1-actor pool and returns its seconds: Ray Data's first run in a session
    starts its own actors (statistics, actor locations) in processes that import ray.data, which on 2 cores
    delays the first timed setup's actors by seconds. This pays it before any setup is timed."""
    import warnings

    import ray

    class Nothing:
        def __call__(self, batch):
            return batch

    start = time.perf_counter()
    with warnings.catch_warnings():  # max_restarts=0 as predict passes it (else Ray logs an error line)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        ds = ray.data.from_items([{"x": 0}]).map_batches(Nothing, compute=ray.data.ActorPoolStrategy(size=1),
                                                         max_restarts=0)
    ds.take_all()
    return time.perf_counter() - start


def ray_processes_rss_mib() -> float:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and ("ray" in cmd.split("/")[-1] or "/ray/" in cmd or "raylet" in cmd
                                     or "gcs_server" in cmd):
            total += p.info["memory_info"].rss
    return total / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pyggml-resnet-scaling"))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS + ("plain1",))
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)

    model, folder = prepare(args.work, args.images)
    paths = sorted(str(p) for p in folder.iterdir())
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"{cpu}; {os.cpu_count()} CPUs; python {platform.python_version()}; {len(paths)} images; "
          f"load average before Ray: {os.getloadavg()[0]:.1f}", flush=True)

    import ray

    before = ray_processes_rss_mib()
    start = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    startup = time.perf_counter() - start
    time.sleep(2)  # let its processes finish starting before reading their memory
    ray_mib = ray_processes_rss_mib() - before
    import logging

    import ray.data  # noqa: F401  (configures its logger, quietened next)

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    first_run = first_ray_data_run()
    print(f"ray.init: {startup:.1f} s; Ray's own processes: {ray_mib:.0f} MiB RSS; Ray Data's first run in the "
          f"session (a no-op pipeline): {first_run:.1f} s", flush=True)

    samples = []
    for r in range(args.rounds):
        order = args.setups[r % len(args.setups):] + args.setups[:r % len(args.setups)]
        for setup in order:
            load = os.getloadavg()[0]
            if setup.startswith("plain"):
                result = run_plain(model, paths, 1 if setup == "plain1" else 2)
            else:
                actors, threads = map(int, setup.split("x"))
                result = run_ray(model, paths, actors, threads)
            result.update(setup=setup, round=r, load_before=load, images_per_s=len(paths) / result["seconds"])
            samples.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "batches"}), flush=True)
    ray.shutdown()

    print(f"\n| setup (actors x threads) | images/s, median (min-max) of {args.rounds} | vs plain | "
          f"first result, s | steady images/s | steady vs plain | peak RSS per process |\n"
          f"|---|---|---|---|---|---|---|")

    def spread(key: str, setup: str) -> tuple[float, str]:
        values = [s[key] for s in samples if s["setup"] == setup]
        med = statistics.median(values)
        return med, f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"

    plain = {key: spread(key, "plain")[0] if "plain" in args.setups else float("nan")
             for key in ("images_per_s", "steady_images_per_s")}
    for setup in args.setups:
        rss = max(s["rss_peak_kib"] for s in samples if s["setup"] == setup) / 1024
        rate, rate_text = spread("images_per_s", setup)
        steady, steady_text = spread("steady_images_per_s", setup)
        print(f"| {setup} | {rate_text} | {rate / plain['images_per_s']:.2f}x | "
              f"{spread('first_result_s', setup)[1]} | {steady_text} | "
              f"{steady / plain['steady_images_per_s']:.2f}x | {rss:.0f} MiB |")
    print(f"\nload average (1 min) before each run: {min(s['load_before'] for s in samples):.1f}-"
          f"{max(s['load_before'] for s in samples):.1f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "ray_init_s": startup, "ray_rss_mib": ray_mib,
                                         "ray_data_first_run_s": first_run, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
