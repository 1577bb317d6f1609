"""The parent's side of the benchmark's child processes: starting them, talking to them, stopping them."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time

from . import child

READY_TIMEOUT = 900.0  # s for a worker to import, load and warm up (resnet152 at batch 16 on few cores)

# Runs child.py as a standalone module in a child process: `import pyggml_resnet` would otherwise be
# paid for (time and RSS) by the torch and ONNX Runtime processes too. The name differs from
# "pyggml_resnet.bench.child", but the bytecode cache is shared (it is keyed by the file's path).
_LAUNCH = ("import importlib.util as u; s = u.spec_from_file_location('pyggml_resnet_bench_child', {path!r}); "
           "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[1:]))")


def python_c(code: str) -> list[str]:
    """`python -c code`, with the directory that holds this package first on sys.path. `-c` puts the working
    directory there, where a source checkout's pyggml_resnet (without its built extension) would shadow the
    installed package the parent runs from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-c", f"import sys; sys.path[0] = {root!r}; {code}"]


def child_command(mode: str, engine: str, path, cfg, num_classes: int, **options) -> list[str]:
    """The command line of a child: `mode` ("worker", "cold" or "prepare") of `engine` on the model at `path`."""
    cmd = python_c(_LAUNCH.format(path=os.path.abspath(child.__file__)))
    cmd += [mode, "--engine", engine, "--path", str(path), "--block", cfg.block,
            "--layers", ",".join(map(str, cfg.layers)), "--groups", str(cfg.groups),
            "--width-per-group", str(cfg.width_per_group), "--classes", str(num_classes)]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value not in (None, False):
            cmd += [f"--{key}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return cmd


class WorkerError(Exception):
    pass


class Worker:
    """A long-lived engine process and its JSON-lines pipe, with a timeout on every answer."""

    def __init__(self, cmd: list[str], log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A session of its own: Ctrl-C reaches only the parent, which then ends every worker itself.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self._buf = b""

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._died()) from None

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerError(self._died())
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = _decode(line)
        if "error" in msg:
            raise WorkerError(msg["error"])
        return msg

    def request(self, msg: dict, timeout: float) -> dict:
        self.send(msg)
        return self.receive(timeout)

    def _died(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        why = f"exited with status {code}" if code is not None else "closed its output"
        if code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        tail = log_tail(self.log_path)
        return why + (f": {tail}" if tail else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self._log):
            with contextlib.suppress(Exception):
                f.close()


def start_worker(cmd: list[str], log_path: str) -> tuple[Worker, dict]:
    """The one way a worker starts: (the Worker, its ready message with load and warm-up times). A worker
    that does not get ready is stopped, and its WorkerError raised."""
    worker = Worker(cmd, log_path)
    try:
        return worker, worker.receive(READY_TIMEOUT)
    except BaseException:
        worker.stop()
        raise


def answer_timeout(estimate_s: float, iters: int) -> float:
    """Seconds to wait for `iters` timed iterations estimated at `estimate_s` each: generous enough for the
    contention cases, where a worker shares its CPUs with twice its threads or with busy processes, so that
    only a hung worker runs out of it."""
    return 60 + 60 * iters * estimate_s


def _decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    return msg if isinstance(msg, dict) else {"error": f"garbled answer {line[:200]!r}"}


def log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def run_child(cmd: list[str], log_path: str, timeout: float) -> tuple[dict, float]:
    """Runs a one-shot child to completion: (its JSON answer, the monotonic time just before it started)."""
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"did not finish within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = out.strip().splitlines()
    msg = _decode(lines[-1]) if lines else {"error": f"exited with status {proc.returncode}: "
                                                     f"{log_tail(log_path)}"}
    if "error" in msg:
        raise WorkerError(msg["error"])
    return msg, t0
