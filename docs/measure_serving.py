"""Measures the serving table in docs/benchmarks.md: latency and throughput of `pyggml-resnet serve` with 1, 4
and 16 concurrent clients, against the same model called in a plain Python loop.

    .venv/bin/python docs/measure_serving.py [--seconds 20] [--clients 1 4 16] [--threads 2] [--work /tmp/serving]

Made once in --work (and reused): a ResNet-50 with seeded random weights (NumPy, no torch) as f32 GGUF, and
a 500x375 JPEG (ImageNet's typical size). Two kinds of request, each a single image:

* jpeg: the file as a BYTES input (binary data, as tritonclient sends it), top-5 classification back. The
  server decodes and preprocesses; the plain loop does `model.classify(path, top_k=5)`, the same work;
* fp32: the preprocessed (1, 3, 224, 224) tensor as binary FP32, probabilities back (binary); the plain
  loop does `model.probabilities(x)`.

The plain loop runs in this process with the server stopped. Each server setup runs for --seconds after one
warm-up request per client; latency is each request's round trip as a client sees it, throughput the
requests answered over the wall time. The server runs in its own process (`pyggml-resnet serve --threads T
--log-level warning`), the clients are threads here with one keep-alive connection each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import pyggml_resnet
from pyggml_resnet import arch, bench, convert


def prepare(work: Path) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    model, photo = work / "resnet50.gguf", work / "photo.jpg"
    if not model.exists():
        convert.write_gguf(convert.Checkpoint.of(bench.random_state(arch.BY_NAME["resnet50"], 1000)), model,
                           progress=False)
    if not photo.exists():
        pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photo, quality=90)
    return model, photo


def request(name: str, data: bytes, datatype: str, shape: list, output: dict) -> tuple[bytes, dict]:
    """An infer request with its input as binary data (as tritonclient sends it)."""
    raw = data if datatype == "FP32" else len(data).to_bytes(4, "little") + data
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [output]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def plain(model_path: Path, photo: Path, x: np.ndarray, threads: int, seconds: float) -> dict:
    with pyggml_resnet.load(model_path, threads=threads) as model:
        calls = {"jpeg": lambda: model.classify(photo, top_k=5), "fp32": lambda: model.probabilities(x)}
        return {kind: timed_loop(call, seconds) for kind, call in calls.items()}


def timed_loop(call, seconds: float) -> dict:
    call()  # warm-up: the graph is built
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start)


def summary(latencies: list[float], wall: float) -> dict:
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"requests": len(latencies), "p50": p50, "p99": p99, "per_s": len(latencies) / wall}


def drive(port: int, body: tuple[bytes, dict], clients: int, seconds: float, path: str) -> dict:
    latencies, failures = [], []
    start_line = threading.Barrier(clients + 1)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        post(conn, path, body)  # warm-up
        start_line.wait()
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            status = post(conn, path, body)
            latencies.append(time.perf_counter() - t)
            if status != 200:
                failures.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    deadline = float("inf")
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    deadline = start + seconds
    for t in threads:
        t.join()
    result = summary(latencies, time.perf_counter() - start)
    result["failures"] = len(failures)
    return result


def post(conn, path: str, body: tuple[bytes, dict]) -> int:
    conn.request("POST", path, body=body[0], headers=body[1])
    response = conn.getresponse()
    response.read()
    return response.status


def serve(model_path: Path, threads: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pyggml_resnet", "serve", "--model", str(model_path),
                               "--port", str(port), "--threads", str(threads), "--log-level", "warning"])
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/serving"))
    args = p.parse_args()
    model_path, photo = prepare(args.work)
    with pyggml_resnet.load(model_path, threads=1) as model:
        x = model.preprocess(photo)[None]
    bodies = {"jpeg": request("image", photo.read_bytes(), "BYTES", [1],
                              {"name": "probabilities", "parameters": {"classification": 5}}),
              "fp32": request("input", x.tobytes(), "FP32", list(x.shape),
                              {"name": "probabilities", "parameters": {"binary_data": True}})}
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    rows = [("plain loop", 1, kind, r) for kind, r in plain(model_path, photo, x, args.threads, args.seconds).items()]
    server, port = serve(model_path, args.threads)
    try:
        for kind, body in bodies.items():
            for clients in args.clients:
                r = drive(port, body, clients, args.seconds, "/v2/models/resnet50/infer")
                rows.append(("server", clients, kind, r))
                print(rows[-1], file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    print("| setup | clients | request | requests | p50 ms | p99 ms | images/s | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for setup, clients, kind, r in rows:
        print(f"| {setup} | {clients} | {kind} | {r['requests']} | {r['p50'] * 1000:.0f} | {r['p99'] * 1000:.0f} | "
              f"{r['per_s']:.2f} | {r.get('failures', '-')} |")


if __name__ == "__main__":
    main()
