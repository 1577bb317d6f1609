"""`pyggml-resnet serve` as users start it (a process of its own), driven for a sustained period by several
concurrent clients: no request may fail, every response must be byte-identical to the response the same
request got alone, and the server's RSS must stay flat once warm.

CI runs it for PYGGML_SOAK_SECONDS (default 20) of load; docs/reliability.md has a longer run's figures.
The RSS bound: once a warm-up has run every batch size (1..--max-batch 4), the server holds all it will ever
need (its 4 cached graphs are exactly those batch sizes), so growth after warm-up can only be a leak. 16 MiB is far
below what leaking anything per request would add over hundreds of requests (an image's input tensor is
588 KiB, a JPEG request ~10 KiB), and well above the allocator's noise (a few MiB).
"""

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import pyggml_resnet  # noqa: E402

SECONDS = float(os.environ.get("PYGGML_SOAK_SECONDS", "20"))
CLIENTS = 4
RSS_GROWTH_LIMIT = 16 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn, path, request: tuple[bytes, dict]) -> tuple[int, bytes]:
    body, headers = request
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def fp32_request(x: np.ndarray, outputs: list) -> tuple[bytes, dict]:
    """An infer request for the float32 NCHW batch x, as binary data (as tritonclient sends it)."""
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    inp = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [inp], "outputs": outputs}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def payloads(model) -> list[tuple[bytes, dict]]:
    """Infer requests (body, headers): preprocessed tensors (FP32 as binary data, as tritonclient sends them)
    and image files (BYTES, base64 in JSON), asking for logits, and probabilities as top-3 classification."""
    rng = np.random.default_rng(8)
    outputs = [{"name": "logits"}, {"name": "probabilities", "parameters": {"classification": 3}}]
    requests = []
    for i in range(6):
        pixels = rng.integers(0, 256, (120 + 10 * i, 160, 3), dtype=np.uint8)
        if i < 3:
            requests.append(fp32_request(model.preprocess(pixels)[None], outputs))
            continue
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG" if i % 2 else "PNG")
        inp = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(buf.getvalue()).decode()]}
        requests.append((json.dumps({"inputs": [inp], "outputs": outputs}).encode(), {}))
    return requests


@pytest.fixture(scope="module")
def model_path(model_files):
    return str(model_files(18, 10)[2])


def start(model_path, port, *extra):
    return subprocess.Popen([sys.executable, "-m", "pyggml_resnet", "serve", "--model", model_path, "--port",
                             str(port), "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_ready(process, port, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def test_serve_command_refuses_a_missing_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pyggml_resnet", "serve", "--model", str(tmp_path / "no.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "no.gguf" in done.stderr


def test_soak(model_path):
    port = free_port()
    server = start(model_path, port, "--threads", "2", "--max-batch", str(CLIENTS))
    try:
        wait_ready(server, port)
        rss_start = rss(server.pid)
        with pyggml_resnet.load(model_path, threads=1) as model:
            requests = payloads(model)
            x = np.stack([model.preprocess(np.full((50, 50, 3), i, np.uint8)) for i in range(CLIENTS)])
        path = "/v2/models/resnet18/infer"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        # Warm-up: every batch size the soak can make (1..CLIENTS), so that each graph has been built
        for n in range(1, CLIENTS + 1):
            assert post(conn, path, fp32_request(x[:n], [{"name": "logits"}]))[0] == 200
        alone = [post(conn, path, r) for r in requests]  # each request alone, one at a time
        assert all(status == 200 for status, _ in alone), alone
        stats = drive(port, path, requests, [body for _, body in alone], server.pid)
        stats["rss_start"] = rss_start
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down cleanly
        out, err = server.communicate(timeout=60)
    print(f"\nsoak: {stats['requests']} requests from {CLIENTS} clients in {stats['seconds']:.0f} s, "
          f"p50 {stats['p50'] * 1000:.0f} ms, p99 {stats['p99'] * 1000:.0f} ms, RSS {stats['rss_start'] >> 20} MiB "
          f"at start, peaks of {stats['rss_warm'] >> 20} MiB warm (first half) and {stats['rss_end'] >> 20} MiB "
          "at the end (last quarter)")
    assert server.returncode == 0, err
    assert stats["failures"] == [], stats["failures"][:3]
    assert stats["requests"] >= 4 * CLIENTS
    assert stats["rss_end"] - stats["rss_warm"] < RSS_GROWTH_LIMIT, stats


def drive(port, path, requests, expected, pid) -> dict:
    """CLIENTS threads posting `requests` in turn for SECONDS; every answer must equal `expected`."""
    latencies, failures, rss_samples = [], [], []
    start = time.monotonic()
    deadline = start + SECONDS

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = k
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                status, body = post(conn, path, requests[i % len(requests)])
            except OSError as e:
                failures.append(repr(e))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            latencies.append(time.perf_counter() - t)
            if status != 200 or body != expected[i % len(requests)]:
                failures.append((status, body[:200]))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss_samples.append((time.monotonic() - start, rss(pid)))
        time.sleep(0.25)
    for t in threads:
        t.join()
    # Peaks, not single samples: RSS swings by a few MiB as requests come and go. A leak shows as a higher
    # peak in the last quarter than in the first half.
    warm = max(r for t, r in rss_samples if t < SECONDS / 2)
    end = max(r for t, r in rss_samples if t >= SECONDS * 3 / 4)
    p = np.percentile(latencies, [50, 99])
    return {"requests": len(latencies), "failures": failures, "seconds": time.monotonic() - start,
            "p50": p[0], "p99": p[1], "rss_warm": warm, "rss_end": end}
